"""Behaviour: GRPO on the exact-answer reward raises held-out accuracy of the warmed-up tiny model.

The demo's recipe at a smaller budget: supervised warm start until the model solves some problems,
then GRPO. Held-out accuracy is greedy, on the same 300 problems before and after.
"""

import json

from grpo.config import SFTConfig, TrainConfig, build
from grpo.recipes.addition import GRPO, SFT
from grpo.train.sft import train_sft
from grpo.train.loop import train


def test_grpo_raises_heldout_accuracy(tiny_model_dir, addition_files, tmp_path):
    sft = build(SFTConfig, {"model": tiny_model_dir, "dataset": addition_files["train"],
                            "output_dir": str(tmp_path / "sft"), **SFT})
    train_sft(sft, quiet=True)
    cfg = build(TrainConfig, {**GRPO, "model": str(tmp_path / "sft"), "dataset": addition_files["train"],
                              "eval_dataset": addition_files["heldout"], "eval_max_prompts": 300,
                              "output_dir": str(tmp_path / "grpo"), "max_steps": 80, "eval_steps": 0})
    train(cfg, quiet=True)
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    assert 0.05 < before < 0.8, f"the warm start should leave room to learn: {before}"
    assert after >= before + 0.10, f"held-out accuracy {before:.3f} -> {after:.3f}"
