"""The built-in addition task end to end: the tiny model, its data and its supervised warm start,
with the settings the demo and the seed pipeline share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpo.config import SFTConfig, build
from grpo.runs.run_dir import RunLock, check_output_dir, claim_output_dir
from grpo.supervised.sft import train_sft

from .tasks import addition_problems, save_tiny_model, write_jsonl

# The supervised stage stops while accuracy is still low (about a quarter of the held-out problems
# after 500 steps of this schedule), leaving GRPO room to show what a verifiable reward adds.
SFT = dict(max_steps=500, batch_size=64, learning_rate=1e-3, warmup_steps=50, lr_scheduler="constant",
           logging_steps=50, max_completion_length=8, max_prompt_length=16)
# 32 prompts x 8 completions per step: smaller batches or a larger learning rate were noisier
# and could collapse the tiny policy (docs/getting-started.md, "The demo").
GRPO = dict(max_steps=200, prompts_per_step=32, group_size=8, max_completion_length=6,
            learning_rate=1e-4, warmup_steps=10, lr_scheduler="constant", temperature=1.0, beta=0.04,
            micro_batch_size=256, logging_steps=5, eval_steps=50, samples_steps=50, max_prompt_length=16,
            rewards=[{"function": "exact_answer"}])


RECIPES = {"demo": "grpo demo", "seed pipeline": "grpo demo --pipeline seed",
           "calculator demo": "grpo demo --task calculator", "steps demo": "grpo demo --task steps"}


def claim_recipe_dir(out: Path, recipe: str, overwrite: bool) -> RunLock:
    """A recipe (the demo, the seed pipeline) claims its output directory as a run does
    (runs.run_dir: locked, marked): it replaces what an earlier run of the same recipe wrote
    there without being asked, anything else grpo wrote only when told `overwrite`, and never a
    file grpo did not write (then it refuses, with or without `overwrite`). Returns the held
    lock: the recipe holds it until it ends."""
    command = RECIPES[recipe]
    check_output_dir(out, inputs={}, resume=False, overwrite=overwrite, replace_own=command)
    return claim_output_dir(out, command, inputs={}, resume=False, overwrite=overwrite, replace_own=command)


@dataclass
class WarmStart:
    sft_dir: Path
    train_file: Path
    heldout_file: Path
    heldout_rows: list


def warm_start(out: Path, seed: int, sft_overrides: dict | None = None, quiet: bool = True) -> WarmStart:
    """Tiny model, addition data (train / held-out, disjoint), supervised warm start under `out`."""
    base = save_tiny_model(out / "base", seed=seed)
    train_rows, heldout_rows = addition_problems(seed=seed)
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl", completion=True)
    heldout_file = write_jsonl(heldout_rows, out / "data" / "heldout.jsonl")
    sft_cfg = build(SFTConfig, {"model": str(base), "dataset": str(train_file), "output_dir": str(out / "sft"),
                                "seed": seed, **SFT, **(sft_overrides or {})}, "demo sft")
    train_sft(sft_cfg, quiet=quiet)
    return WarmStart(out / "sft", train_file, heldout_file, heldout_rows)
