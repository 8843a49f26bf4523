"""Mixed precision (`grpo.runtime.precision.Precision`): float32 master weights, half-precision compute.

bf16 is what `dtype: auto` picks on CUDA. These tests run its code paths on the CPU (CPU autocast
supports bf16 and fp16), on models small enough for that to be quick.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import TrainConfig, build
from grpo.engine.generation import generate_groups
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import load_causal_lm
from grpo.recipes.tasks import save_tiny_model
from grpo.runtime.precision import Precision
from grpo.train.loop import train

from test_fastpaths import EOS, PAD, llama, prompts, qwen2

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("p") / "m", hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64))


def changed_fraction(before: dict, after: dict) -> float:
    """Share of weights that differ, comparing in the saved (lower) precision of the two."""
    changed = sum(int((before[k].to(after[k].dtype) != after[k]).sum()) for k in before)
    return changed / sum(t.numel() for t in before.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_training_moves_float32_master_weights(small_model, addition_files, tmp_path, dtype,
                                                              monkeypatch):
    # At a GRPO learning rate of 1e-6 an AdamW step is ~100x smaller than bf16's spacing near a
    # weight of 0.02: weights stored in bf16 mostly round back to where they were. With float32
    # master weights nearly all of them move.
    import grpo.runs.models

    def run(name):
        cfg = build(TrainConfig, dict(model=small_model, dataset=addition_files["train"],
                                      output_dir=str(tmp_path / name),
                                      rewards=[{"function": "answer_distance"}], prompts_per_step=2, group_size=4,
                                      max_completion_length=4, max_steps=2, learning_rate=1e-6, beta=0.04,
                                      max_prompt_length=16, dtype=dtype))
        return train(cfg, quiet=True)
    out = run("master")
    before, after = load_file(f"{small_model}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in after.values())
    assert changed_fraction(before, after) > 0.95
    if dtype == "bfloat16":  # the same run with the policy stored in bf16, as before the fix
        real = grpo.runs.models.load_causal_lm
        monkeypatch.setattr(grpo.runs.models, "load_causal_lm", lambda path, device, dt, trainable=True, **kw:
                            real(path, device, dt, trainable, **kw).to(torch.bfloat16))
        stored = load_file(str(run("stored_bf16") / "model.safetensors"))
        assert next(iter(stored.values())).dtype == torch.bfloat16
        assert changed_fraction(before, stored) < 0.1
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # pi_ref is computed exactly like pi_theta: before the first update the KL is exactly 0.
    assert lines[0]["loss/kl"] == 0.0
    assert all(v == v and abs(v) != float("inf") for l in lines for v in l.values() if isinstance(v, float))


def test_load_keeps_trainable_models_in_float32_and_frozen_ones_in_the_compute_dtype(small_model):
    cpu = torch.device("cpu")
    assert {p.dtype for p in load_causal_lm(small_model, cpu, torch.bfloat16).parameters()} == {torch.float32}
    frozen = load_causal_lm(small_model, cpu, torch.bfloat16, trainable=False)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_autocast_generation_and_logprobs_agree_across_engines(make, monkeypatch):
    """Under bf16 autocast over float32 weights (the policy on CUDA): the group engine and the plain
    loop, the packed forward and the plain forward agree to bf16 rounding, and both are close to
    the float32 result; log-probs come back in float32; the group engine's KV caches are bf16."""
    import grpo.engine.decoders
    decoders, init = [], grpo.engine.decoders.GroupDecoder.__init__
    monkeypatch.setattr(grpo.engine.decoders.GroupDecoder, "__init__",
                        lambda self, *a, **k: decoders.append(self) or init(self, *a, **k))
    model = make()
    precision = Precision(torch.device("cpu"), torch.bfloat16)
    ids, mask = prompts()
    P, M = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    with precision.autocast():
        out = {engine: generate_groups(model, ids, mask, group_size=4, max_new_tokens=10, eos_token_id=EOS,
                                       pad_token_id=PAD, generator=torch.Generator().manual_seed(5), engine=engine)
               for engine in ("plain", "auto")}
        gen = out["auto"]
        cm = gen.completion_mask.float()
        half = {engine: completion_logprobs(model, P, M, gen.completion_ids, cm, 1.0, engine=engine)[0]
                for engine in ("plain", "auto")}
    full = completion_logprobs(model, P, M, gen.completion_ids, cm, 1.0, engine="plain")[0]
    on = cm.bool()
    assert half["auto"].dtype == torch.float32 and gen.logprobs.dtype == torch.float32
    assert decoders and {lay[k].dtype for lay in decoders[0].layers for k in ("kp", "vp", "kc", "vc")} \
        == {torch.bfloat16}
    # The same tokens on both engines where bf16 rounding does not flip a draw; here it does not.
    assert torch.equal(out["plain"].completion_ids, gen.completion_ids)
    torch.testing.assert_close(half["auto"][on], half["plain"][on], atol=2e-2, rtol=0)
    torch.testing.assert_close(gen.logprobs[on], half["auto"][on], atol=2e-2, rtol=0)
    torch.testing.assert_close(half["auto"][on], full[on], atol=3e-2, rtol=0)
    assert (half["auto"][on] - full[on]).abs().max() > 0  # really computed in bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_with_a_nonfinite_gradient_is_skipped_in_every_precision(dtype):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    precision = Precision(torch.device("cpu"), dtype)
    (w * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    assert not torch.isfinite(precision.step(opt, [w], 1.0))
    assert torch.equal(w.detach(), torch.ones(3))
    opt.zero_grad()
    precision.backward(w.sum())
    precision.step(opt, [w], None)
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.9))


def test_fp16_loss_scaling_skips_a_step_with_inf_gradients_and_keeps_weights_finite():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)  # the step is the gradient itself: an unscaled one shows
    precision = Precision(torch.device("cpu"), torch.float16)
    (w.sum() * float("inf")).backward()
    precision.step(opt, [w], 1.0)
    assert torch.equal(w.detach(), torch.ones(3))  # skipped, not NaN
    assert precision.scaler.get_scale() < 65536.0  # and the scale backed off
    opt.zero_grad()
    precision.backward(w.sum())
    precision.step(opt, [w], None)
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.9))  # d(sum)/dw = 1, applied unscaled


@pytest.mark.parametrize("command", ["sft", "reward-model"])
def test_sft_and_reward_model_also_train_float32_master_weights_under_bf16(small_model, addition_files, tmp_path,
                                                                            command):
    from grpo.cli import main
    out = tmp_path / command
    common = ["--set", f"model={small_model}", "--set", f"output_dir={out}", "--set", "dtype=bfloat16",
              "--set", "learning_rate=1e-6", "--set", "max_steps=2", "--quiet"]
    if command == "sft":
        assert main(["sft", "--set", f"dataset={addition_files['train']}", "--set", "batch_size=8", *common]) == 0
    else:
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)})
                                 + "\n" for a in range(20)))
        assert main(["reward-model", "train", "--set", f"dataset={pairs}", "--set", "batch_size=8", *common]) == 0
    before, after = load_file(f"{small_model}/model.safetensors"), load_file(str(out / "model.safetensors"))
    shared = [k for k in before if k in after and not k.startswith("lm_head")]
    assert len(shared) > 10 and all(after[k].dtype == torch.float32 for k in shared)
    changed = sum(int((before[k] != after[k]).sum()) for k in shared)
    assert changed > 0.9 * sum(before[k].numel() for k in shared)


def test_fp16_resume_restores_the_loss_scale(small_model, addition_files, tmp_path, monkeypatch):
    import shutil

    import grpo.runtime.setup
    made = []

    class Growing(Precision):  # the scale doubles after every step (far from overflow), so its state shows
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
            self.scaler.scale(torch.ones(()))
            made.append(self)
    monkeypatch.setattr(grpo.runtime.setup, "Precision", Growing)

    def cfg(out):
        return build(TrainConfig, dict(model=small_model, dataset=addition_files["train"], output_dir=str(out),
                                       rewards=[{"function": "answer_distance"}], prompts_per_step=2, group_size=4,
                                       max_completion_length=4, max_steps=4, save_steps=2, learning_rate=1e-3,
                                       max_prompt_length=16, dtype="float16"))
    train(cfg(tmp_path / "full"), quiet=True)
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    train(cfg(tmp_path / "part"), resume=True, quiet=True)
    state = torch.load(tmp_path / "full" / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 4.0
    assert made[0].scaler.get_scale() == made[1].scaler.get_scale() == 16.0  # not 4.0 from a fresh scaler
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
