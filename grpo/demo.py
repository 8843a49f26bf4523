"""`grpo demo`: the whole method on a laptop CPU in a few minutes, with nothing downloaded.

1. Build a ~1M-parameter Llama-architecture model and a character tokenizer from a config.
2. Warm it up with `grpo sft` on two-number addition until it solves some held-out problems.
3. Train it with GRPO on the verifiable reward `exact_answer`.
4. Report greedy held-out accuracy on the same 500 problems before and after GRPO.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SFTConfig, TrainConfig, build
from .sft import train_sft
from .tasks import addition_problems, save_tiny_model, write_jsonl
from .trainer import train

# The supervised stage stops while accuracy is still low (about 27% held-out after 500 steps of
# this schedule), leaving GRPO room to show what a verifiable reward adds.
SFT = dict(max_steps=500, batch_size=64, learning_rate=1e-3, warmup_steps=50, lr_scheduler="constant",
           logging_steps=50, max_completion_length=8, max_prompt_length=16)
# 32 prompts x 8 completions per step: smaller batches or a larger learning rate were noisier
# and could collapse the tiny policy (see README, "The demo").
GRPO = dict(max_steps=200, prompts_per_step=32, group_size=8, max_completion_length=6,
            learning_rate=1e-4, warmup_steps=10, lr_scheduler="constant", temperature=1.0, beta=0.04,
            micro_batch_size=256, logging_steps=5, eval_steps=50, samples_steps=50, max_prompt_length=16,
            rewards=[{"function": "exact_answer"}])


@dataclass
class WarmStart:
    sft_dir: Path
    train_file: Path
    heldout_file: Path
    heldout_rows: list


def warm_start(out: Path, seed: int, sft_overrides: dict | None = None, log=print) -> WarmStart:
    """Steps 1-2, shared with the seed pipeline: tiny model, addition data, supervised warm start."""
    base = save_tiny_model(out / "base", seed=seed)
    train_rows, heldout_rows = addition_problems(seed=seed)
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl", completion=True)
    heldout_file = write_jsonl(heldout_rows, out / "data" / "heldout.jsonl")
    sft_cfg = build(SFTConfig, {"model": str(base), "dataset": str(train_file), "output_dir": str(out / "sft"),
                                "seed": seed, **SFT, **(sft_overrides or {})}, "demo sft")
    train_sft(sft_cfg, log=log)
    return WarmStart(out / "sft", train_file, heldout_file, heldout_rows)


def run_demo(output_dir: str = "runs/demo", seed: int = 0, quiet: bool = False, pipeline: str = "grpo",
             sft_overrides: dict | None = None, grpo_overrides: dict | None = None) -> dict:
    if pipeline == "seed":
        from .pipeline import run_seed_pipeline
        return run_seed_pipeline(output_dir, seed=seed, quiet=quiet)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    out = Path(output_dir)
    start = time.time()
    say = (lambda *a: None) if quiet else print

    t = time.time()
    say(f"[demo] tiny model, addition data and supervised warm start (grpo sft) under {out}")
    task = warm_start(out, seed, sft_overrides, log=say)
    sft_seconds = time.time() - t
    train_file, heldout_file, heldout_rows = task.train_file, task.heldout_file, task.heldout_rows

    grpo_cfg = build(TrainConfig, {"model": str(out / "sft"), "dataset": str(train_file),
                                   "eval_dataset": str(heldout_file), "eval_max_prompts": len(heldout_rows),
                                   "output_dir": str(out), "seed": seed, **GRPO, **(grpo_overrides or {})},
                     "demo grpo")
    say("[demo] GRPO on the exact-answer reward (grpo train)")
    train(grpo_cfg, quiet=quiet)
    run = json.loads((out / "summary.json").read_text())

    summary = {
        "accuracy_before": run["eval_before"]["eval_accuracy"],
        "accuracy_after": run["eval_after"]["eval_accuracy"],
        "heldout_prompts": len(heldout_rows),
        "train_seconds": run["train_seconds"],
        "sft_seconds": sft_seconds,
        "total_seconds": time.time() - start,
        "metrics": str(out / "metrics.jsonl"),
        "model": str(out),
        "sft": SFT | (sft_overrides or {}),
        "grpo": {k: v for k, v in GRPO.items()} | (grpo_overrides or {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from .report import ReportError, write_report
    try:
        summary["report"] = str(write_report([out]))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"[demo] report: {summary['report']}")
    except ReportError as e:  # e.g. matplotlib (the `report` extra) is not installed
        say(f"[demo] no report ({e})")
    say(f"[demo] held-out accuracy on {len(heldout_rows)} problems: {summary['accuracy_before']:.1%} -> "
        f"{summary['accuracy_after']:.1%}  (GRPO {summary['train_seconds']:.0f}s, total {summary['total_seconds']:.0f}s)")
    say(f"[demo] summary: {out / 'summary.json'}")
    return summary
