"""The margins the learning tests assert, measured over what differs between machines.

A learning test must pass on any x86 CPU, whose float kernels differ from the one it was written
on, so the warm start it trains from differs too. This runs each learning test's recipe over
several warm starts (the tiny model's and the supervised stage's seeds) and intra-op thread counts
(which change the order of float reductions), and prints the gap each test asserts: the test's
bound must sit below the smallest gap in the table.

    .venv/bin/python -m bench.learning_margins                 # every recipe (~30 min on 2 cores)
    .venv/bin/python -m bench.learning_margins --recipe grpo   # only tests/test_learning.py's
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# (model/data seed, supervised seed, intra-op threads): the tests' own case first, then other
# warm starts and another reduction order.
CASES = [(0, 0, 1), (0, 1, 1), (0, 2, 1), (1, 1, 1), (2, 2, 1), (0, 0, 2)]


def grpo_case(seed: int, sft_seed: int, peft: bool, tmp: Path) -> dict:
    """tests/test_learning.py's recipe: supervised warm start, then GRPO; greedy held-out accuracy."""
    from test_learning import GRPO_BUDGET, LORA

    from grpo.config import SFTConfig, TrainConfig, build
    from grpo.recipes.addition import SFT
    from grpo.recipes.tasks import addition_problems, save_tiny_model, write_jsonl
    from grpo.supervised.sft import train_sft
    from grpo.train.loop import train

    train_rows, heldout_rows = addition_problems(seed=seed)
    files = {"train": str(write_jsonl(train_rows, tmp / "train.jsonl", completion=True)),
             "heldout": str(write_jsonl(heldout_rows, tmp / "heldout.jsonl"))}
    base = save_tiny_model(tmp / "base", seed=seed)
    train_sft(build(SFTConfig, {"model": str(base), "dataset": files["train"], "output_dir": str(tmp / "sft"),
                                **SFT, "seed": sft_seed}), quiet=True)
    cfg = {**GRPO_BUDGET, "model": str(tmp / "sft"), "dataset": files["train"], "eval_dataset": files["heldout"],
           "output_dir": str(tmp / "grpo"), **(LORA if peft else {})}
    train(build(TrainConfig, cfg), quiet=True)
    summary = json.loads((tmp / "grpo" / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    return {"before": before, "after": after, "gap": after - before}


def seed_pipeline_case(seed: int, sft_seed: int, tmp: Path) -> dict:
    """tests/test_reward_kinds.py's small-budget seed pipeline; the gap is the lowest held-out
    accuracy during training minus the warm start's, over both group kinds."""
    from test_reward_kinds import SEED_BUDGET

    from grpo.recipes.pipeline import run_seed_pipeline

    sft = {**SEED_BUDGET.get("sft_overrides", {}), "seed": sft_seed}
    summary = run_seed_pipeline(str(tmp / "seed"), seed=seed, quiet=True, **{**SEED_BUDGET, "sft_overrides": sft})
    rows = {name: v for name, v in summary["variants"].items()}
    return {name: {"before": v["accuracy_before"], "lowest": v["accuracy_lowest"], "after": v["accuracy_after"],
                   "gap": v["accuracy_lowest"] - v["accuracy_before"]} for name, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["grpo", "lora", "seed"], nargs="+", default=["grpo", "lora", "seed"])
    p.add_argument("--cases", type=int, default=len(CASES), help="the first N cases of the grid")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N cases (a run continued)")
    args = p.parse_args()
    from grpo.cli import quiet_libraries

    quiet_libraries()  # every case saves and loads models, whose progress bars would bury the table
    print("| recipe | model/data seed | sft seed | threads | before | after or lowest | gap | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    gaps = {}
    for recipe in args.recipe:
        for seed, sft_seed, threads in CASES[args.skip:args.cases]:
            torch.set_num_threads(threads)
            start = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                if recipe == "seed":
                    found = seed_pipeline_case(seed, sft_seed, Path(tmp))
                else:
                    found = {recipe: grpo_case(seed, sft_seed, recipe == "lora", Path(tmp))}
            for name, r in found.items():
                gaps.setdefault(name, []).append(r["gap"])
                shown = r.get("lowest", r["after"])
                print(f"| {name} | {seed} | {sft_seed} | {threads} | {r['before']:.3f} | {shown:.3f} | "
                      f"{r['gap']:+.3f} | {time.time() - start:.0f} |", flush=True)
    for name, g in gaps.items():
        print(f"{name}: smallest gap {min(g):+.3f}, median {statistics.median(g):+.3f} over {len(g)} cases")


if __name__ == "__main__":
    main()
