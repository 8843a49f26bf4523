"""Behaviour: GRPO on the exact-answer reward raises held-out accuracy of the warmed-up tiny model,
with full fine-tuning and with a LoRA adapter.

The demo's recipe at a smaller budget: supervised warm start until the model solves some problems,
then GRPO. Held-out accuracy is greedy, on the same 300 problems before and after.
"""

import json

import pytest

from grpo.cli import main
from grpo.config import TrainConfig, build
from grpo.recipes.addition import GRPO
from grpo.train.loop import train


# The recipe at the tests' budget. Its margin is measured over other warm starts and thread counts
# (what differs on another CPU) by bench/learning_margins.py; docs/benchmarks.md has the table.
GRPO_BUDGET = {**GRPO, "eval_max_prompts": 300, "max_steps": 80, "eval_steps": 0}
LORA = {"peft": {"r": 16, "alpha": 32}, "learning_rate": 1e-3}


@pytest.mark.parametrize("extra", [{}, LORA], ids=["full", "lora"])
def test_grpo_raises_heldout_accuracy(addition_warm_start, addition_files, tmp_path, extra):
    cfg = build(TrainConfig, {**GRPO_BUDGET, "model": str(addition_warm_start.sft_dir),
                              "dataset": addition_files["train"], "eval_dataset": addition_files["heldout"],
                              "output_dir": str(tmp_path / "grpo"), **extra})
    train(cfg, quiet=True)
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    assert 0.05 < before < 0.8, f"the warm start should leave room to learn: {before}"
    assert after >= before + 0.10, f"held-out accuracy {before:.3f} -> {after:.3f}"


def test_demo_takes_grpo_keys_and_the_seed_pipeline_refuses_them(monkeypatch, capsys):
    import grpo.recipes.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.update(k))
    assert main(["demo", "--set", "peft={r: 16, alpha: 32}", "--set", "learning_rate=0.001"]) == 0
    assert seen["grpo_overrides"] == {"peft": {"r": 16, "alpha": 32}, "learning_rate": 1e-3}
    assert main(["demo", "--pipeline", "seed", "--set", "beta=0"]) == 2
    assert "--set: only the plain demo" in capsys.readouterr().err
