"""The trainer end to end: CLI runs, metrics, checkpoints, resume equivalence, every variant."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo.cli import main
from grpo.config import TrainConfig, build
from grpo.train.loop import train

METRIC_KEYS = {"step", "reward/mean", "reward/std", "reward/exact_answer/mean", "reward/exact_answer/std",
               "reward/exact_answer/zero_variance_frac",
               "reward/accuracy", "loss/total", "loss/kl", "loss/entropy", "loss/clip_frac_low", "loss/clip_frac_high",
               "rollout/completion_length_mean", "rollout/completion_length_max", "rollout/truncated_frac",
               "rollout/zero_variance_frac", "time/generate", "time/score", "time/update", "time/tokens_per_second",
               "loss/lr", "loss/grad_norm"}


def small(tiny_model_dir, addition_files, out, **kw):
    values = dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(out),
                  rewards=[{"function": "exact_answer"}, {"function": "answer_distance"}],
                  prompts_per_step=2, group_size=4, max_completion_length=4, max_steps=2, learning_rate=1e-3,
                  max_prompt_length=16)
    values.update(kw)
    return build(TrainConfig, values)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_cli_train_writes_metrics_checkpoints_and_a_loadable_model(tiny_model_dir, addition_files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_model_dir, "dataset": addition_files["train"],
                                      "output_dir": str(out),
                                      # A random model is never exactly right: the dense reward gives a signal.
                                      "rewards": [{"function": "exact_answer"}, {"function": "answer_distance"}],
                                      "prompts_per_step": 2, "group_size": 4, "max_completion_length": 4,
                                      "max_steps": 4, "save_steps": 2}))
    assert main(["train", "--config", str(config), "--set", "learning_rate=1e-3", "--quiet"]) == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert METRIC_KEYS <= set(lines[0])
    assert all(v == v for l in lines for v in l.values() if isinstance(v, float))  # no NaN
    ckpt = out / "checkpoint-2"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (ckpt / name).is_file()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert {"optimizer", "scheduler", "rng", "sampler", "step"} <= set(state) and state["step"] == 2
    assert json.loads((out / "train_config.json").read_text())["group_size"] == 4
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # the model's, untouched
    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))


@pytest.mark.parametrize("extra", [
    {},
    {"num_iterations": 2, "num_minibatches": 2, "micro_batch_size": 3, "beta": 0.1, "kl_estimator": "k2"},
    # fp16: float32 master weights and the loss scaler's state must both survive the checkpoint.
    {"dtype": "float16", "beta": 0.04},
])
def test_resume_halfway_gives_the_same_weights(tiny_model_dir, addition_files, tmp_path, extra):
    full = small(tiny_model_dir, addition_files, tmp_path / "full", max_steps=4, save_steps=2, **extra)
    train(full, quiet=True)
    # An interrupted run leaves exactly checkpoint-2 behind; resume it elsewhere.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", part / "checkpoint-2")
    (part / "metrics.jsonl").write_text("".join(
        l + "\n" for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[:3]))  # one line too many
    resumed = small(tiny_model_dir, addition_files, part, max_steps=4, save_steps=2, **extra)
    train(resumed, resume=True, quiet=True)
    a, b = weights(tmp_path / "full"), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_runs_are_reproducible_with_a_seed(tiny_model_dir, addition_files, tmp_path):
    train(small(tiny_model_dir, addition_files, tmp_path / "a"), quiet=True)
    train(small(tiny_model_dir, addition_files, tmp_path / "b"), quiet=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [
    {"preset": "dapo"},
    {"preset": "dr_grpo"},
    {"preset": "gspo"},
    {"preset": "cispo"},
    {"generation": "beam"},
    {"ratio_anchor": "reference", "beta": 0.0},
    {"scale_rewards": "batch", "loss_aggregation": "group_sum", "kl_estimator": "k1"},
    {"mask_truncated_completions": True, "max_completion_length": 2, "top_k": 5, "top_p": 0.9, "temperature": 0.7},
    {"lr_scheduler": "cosine", "warmup_steps": 1, "num_minibatches": 2, "weight_decay": 0.1},
    {"rewards": [{"function": "exact_answer", "weight": 1.0}, {"function": "answer_distance", "weight": 0.5}]},
])
def test_every_variant_trains(tiny_model_dir, addition_files, tmp_path, extra):
    out = train(small(tiny_model_dir, addition_files, tmp_path / "run", **extra), quiet=True)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(l["loss/total"] == l["loss/total"] for l in lines)
    if extra.get("generation") == "beam":
        assert "rollout/zero_variance_frac" in lines[0]
    if "mask_truncated_completions" in extra:
        assert lines[0]["rollout/truncated_frac"] > 0  # 2 tokens is too short for most answers + EOS


def test_beta_zero_loads_no_reference_model(tiny_model_dir, addition_files, tmp_path, monkeypatch):
    import grpo.runs.models as trainer
    loads = []
    real = trainer.load_causal_lm
    monkeypatch.setattr(trainer, "load_causal_lm", lambda *a, **k: loads.append(k) or real(*a, **k))
    train(small(tiny_model_dir, addition_files, tmp_path / "a", beta=0.0), quiet=True)
    assert loads == [{"storage_dtype": None, "quantization_config": None}]  # the policy only (float32 master weights)
    loads.clear()
    train(small(tiny_model_dir, addition_files, tmp_path / "b", beta=0.04), quiet=True)
    assert loads == [{"storage_dtype": None, "quantization_config": None}, {"trainable": False}]


def test_sft_command_learns_completion_tokens_only(tiny_model_dir, addition_files, tmp_path):
    from grpo.supervised.sft import collate
    ids, mask, labels = collate([([5, 6], [7, 1]), ([5], [8, 9, 1])], pad_id=0, device="cpu")
    assert labels.tolist() == [[-100, -100, 7, 1], [-100, 8, 9, 1]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]] and ids[0].tolist() == [5, 6, 7, 1]
    out = tmp_path / "sft"
    assert main(["sft", "--set", f"model={tiny_model_dir}", "--set", f"dataset={addition_files['train']}",
                 "--set", f"output_dir={out}", "--set", "max_steps=30", "--set", "batch_size=16",
                 "--set", "micro_batch_size=8", "--quiet"]) == 0
    losses = [json.loads(l)["loss/total"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] * 0.7
    assert (out / "model.safetensors").is_file()


def test_heldout_evaluation_before_during_after(tiny_model_dir, addition_files, tmp_path):
    out = train(small(tiny_model_dir, addition_files, tmp_path / "run", eval_dataset=addition_files["heldout"],
                      eval_max_prompts=20, eval_steps=1), quiet=True)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2]
    assert all(0.0 <= l["eval/accuracy"] <= 1.0 for l in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_before"]["eval_accuracy"] == lines[0]["eval/accuracy"]
    assert summary["eval_after"]["eval_accuracy"] == lines[-1]["eval/accuracy"]  # same weights, same greedy set
    assert summary["train_seconds"] > 0
