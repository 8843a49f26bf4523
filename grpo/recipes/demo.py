"""`grpo demo`: the whole method on a laptop CPU in a few minutes, with nothing downloaded.

1. Build a ~1M-parameter Llama-architecture model and a character tokenizer from a config.
2. Warm it up with `grpo sft` on two-number addition until it solves some held-out problems.
3. Train it with GRPO on the verifiable reward `exact_answer`.
4. Report greedy held-out accuracy on the same 500 problems before and after GRPO.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from grpo.config import TrainConfig, build
from grpo.observe.report import ReportError, write_report
from grpo.train.loop import train

from .addition import GRPO, SFT, claim_recipe_dir, warm_start


def run_demo(output_dir: str = "runs/demo", seed: int = 0, quiet: bool = False,
             sft_overrides: dict | None = None, grpo_overrides: dict | None = None, overwrite: bool = False) -> dict:
    """Everything under `output_dir`: base/ (the tiny model), data/, sft/ (the warm start),
    grpo/ (the GRPO run), summary.json and report.html."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    out = Path(output_dir)
    with claim_recipe_dir(out, "demo", overwrite):  # locked until the recipe ends
        start = time.time()
        say = (lambda *a: None) if quiet else print

        t = time.time()
        say(f"[demo] tiny model, addition data and supervised warm start (grpo sft) under {out}")
        task = warm_start(out, seed, sft_overrides, quiet=quiet)
        sft_seconds = time.time() - t
        train_file, heldout_file, heldout_rows = task.train_file, task.heldout_file, task.heldout_rows

        grpo_cfg = build(TrainConfig, {"model": str(out / "sft"), "dataset": str(train_file),
                                       "eval_dataset": str(heldout_file), "eval_max_prompts": len(heldout_rows),
                                       "output_dir": str(out / "grpo"), "seed": seed, **GRPO, **(grpo_overrides or {})},
                         "demo grpo")
        say("[demo] GRPO on the exact-answer reward (grpo train)")
        train(grpo_cfg, quiet=quiet)
        run = json.loads((out / "grpo" / "summary.json").read_text())

        summary = {
            "accuracy_before": run["eval_before"]["eval_accuracy"],
            "accuracy_after": run["eval_after"]["eval_accuracy"],
            "heldout_prompts": len(heldout_rows),
            "train_seconds": run["train_seconds"],
            "sft_seconds": sft_seconds,
            "total_seconds": time.time() - start,
            "metrics": str(out / "grpo" / "metrics.jsonl"),
            "model": str(out / "grpo"),
            "sft": SFT | (sft_overrides or {}),
            "grpo": {k: v for k, v in GRPO.items()} | (grpo_overrides or {}),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            summary["report"] = str(write_report([out / "grpo"], out / "report.html"))
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            say(f"[demo] report: {summary['report']}")
        except ReportError as e:  # e.g. matplotlib (the `report` extra) is not installed
            say(f"[demo] no report ({e})")
        say(f"[demo] held-out accuracy on {len(heldout_rows)} problems: {summary['accuracy_before']:.1%} -> "
            f"{summary['accuracy_after']:.1%}  (GRPO {summary['train_seconds']:.0f}s, "
            f"total {summary['total_seconds']:.0f}s)")
        say(f"[demo] summary: {out / 'summary.json'}")
        return summary
