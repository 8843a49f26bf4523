"""LoRA through peft: only the adapter trains, the reference is the base model exactly (the same
modules with the adapter off), and the fast paths (packed scoring, the group decoder) run on the
adapted layers with the plain paths' numbers; merge-and-unload gives a plain transformers model."""

import copy
import json

import pytest
import torch

from grpo.engine import adapters, llama, packed
from grpo.engine.generation import generate_groups
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import enable_gradient_checkpointing
from grpo.errors import ConfigError
from tiny_archs import PAD, build, group_batch, record_decoders

pytestmark = pytest.mark.usefixtures("one_thread_module")


def with_nonzero_b(model):
    """The adapter's B drawn non-zero (a fresh one is exactly zero, so the adapter would not show)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def lora(name="llama", r=4, **kw):
    """A tiny model with a LoRA adapter whose B is non-zero (a fresh one is exactly zero)."""
    base = build(name).train()
    model = adapters.add_lora(copy.deepcopy(base), r=r, alpha=8, **kw)
    return base, with_nonzero_b(model)


def test_only_the_adapter_trains():
    base, model = lora(r=4)
    r = 4
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    expected = sum(r * (m.in_features + m.out_features) for m in linears)
    assert adapters.trainable_parameters(model) == expected
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert adapters.trainable_parameters(base) == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("engine", ["auto", "plain"])
def test_reference_is_the_base_model_exactly(engine):
    base, model = lora("qwen3")
    batch = group_batch()
    with torch.no_grad():
        expected = completion_logprobs(base, *batch[:4], engine=engine)[0]
        with adapters.reference_policy(model) as ref:
            got = completion_logprobs(ref, *batch[:4], engine=engine)[0]
        adapted = completion_logprobs(model, *batch[:4], engine=engine)[0]
    assert torch.equal(got, expected)
    assert not torch.allclose(adapted * batch[3], expected * batch[3], atol=1e-3)  # the adapter matters
    with adapters.reference_policy(base) as same:  # no adapter: the model itself
        assert same is base


@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral"])
def test_packed_scoring_on_lora_layers_equals_plain(name):
    _, model = lora(name)
    oracle = copy.deepcopy(model)
    pids, pmask, comp, cmask, w = group_batch(seed=2)
    assert packed.supported(model)

    def run(m, engine, chunk=0):
        m.zero_grad()
        lp, ent = completion_logprobs(m, pids, pmask, comp, cmask, compute_entropy=True, engine=engine,
                                      logprob_chunk_size=chunk)
        ((lp + 0.1 * ent) * cmask * w).sum().backward()
        return lp.detach() * cmask, [p.grad.clone() for p in m.parameters() if p.requires_grad]

    lp, grads = run(model, "auto")
    switched = model.get_base_model().config._attn_implementation.startswith(packed.PREFIX)
    # Llama takes the hand-written packed forward (calling the adapted projections), the others
    # the general one (the model's own layers).
    assert adapters.is_peft(model) and switched == (name != "llama") == (not packed.hand_written(model, 13))
    lp_ref, grads_ref = run(oracle, "plain")
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # Gradient checkpointing and the chunked LM head on the wrapped model: the same numbers.
    enable_gradient_checkpointing(model)
    lp_c, grads_c = run(model, "auto", chunk=3)
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def assert_group_decoder_equals_plain(model, pids, pmask, monkeypatch):
    """Sampling from one prompt per group of `pids`: the group decoder runs (not the fallback) and
    gives the model's own KV cache's tokens and log-probs under the same seed."""
    states = record_decoders(monkeypatch)
    kw = dict(group_size=3, max_new_tokens=8, eos_token_id=1, pad_token_id=PAD)
    plain = generate_groups(model, pids[::3], pmask[::3], engine="plain", generator=torch.Generator().manual_seed(0),
                            **kw)
    fast = generate_groups(model, pids[::3], pmask[::3], generator=torch.Generator().manual_seed(0), **kw)
    assert states == ["CacheDecoder", "GroupDecoder"]
    assert torch.equal(plain.completion_ids, fast.completion_ids)
    torch.testing.assert_close(plain.logprobs, fast.logprobs, atol=1e-5, rtol=0)


def test_group_decoder_runs_on_the_adapted_layers(monkeypatch):
    _, model = lora("llama")
    model.eval()
    assert llama.supported(model, 20)
    pids, pmask = group_batch()[:2]
    assert_group_decoder_equals_plain(model, pids, pmask, monkeypatch)


def test_merge_and_unload_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    _, model = lora("qwen2")
    model.eval()
    batch = group_batch()
    with torch.no_grad():
        adapted = completion_logprobs(model, *batch[:4])[0]  # switches the model to the packed attention
    merged = adapters.merge_and_unload(model)
    assert not adapters.is_peft(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path)
    assert "grpo" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = completion_logprobs(reloaded, *batch[:4], engine="plain")[0]
    torch.testing.assert_close(got * batch[3], adapted * batch[3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [(dict(r=0), "peft.r"), (dict(alpha=-1), "peft.alpha"),
                                          (dict(dropout=1.0), "peft.dropout"),
                                          (dict(target_modules="everything"), "peft.target_modules"),
                                          (dict(target_modules=["no_such_proj"]), "peft.target_modules")])
def test_bad_lora_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        adapters.add_lora(build("llama"), **kwargs)


def test_a_lora_step_scores_its_reference_with_the_adapter_off(tiny_model_dir):
    """collect_rollout with reference=policy (a LoRA policy): pi_ref is the base model exactly,
    also through the chunked head (cfg.logprob_chunk_size); the update then moves the adapter
    only."""
    from grpo.config import TrainConfig
    from grpo.engine.models import load_causal_lm, load_tokenizer
    from grpo.rewards import Reward, exact_answer
    from grpo.runtime.distributed import World
    from grpo.runtime.optim import make_optimizer, make_scheduler
    from grpo.train.rollout import collect_rollout
    from grpo.train.update import update

    cpu = torch.device("cpu")
    cfg = TrainConfig(model=tiny_model_dir, prompts_per_step=2, group_size=4, max_completion_length=6, beta=0.04,
                      micro_batch_size=8, learning_rate=1e-2, rewards=["exact_answer"])
    base = load_causal_lm(tiny_model_dir, cpu, torch.float32, trainable=False)
    policy = adapters.add_lora(load_causal_lm(tiny_model_dir, cpu, torch.float32), r=4, alpha=8)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    rows = [{"prompt": "12+7=", "answer": "19"}, {"prompt": "3+4=", "answer": "7"}]
    rewards, tokenizer = [Reward("exact_answer", exact_answer)], load_tokenizer(tiny_model_dir)
    ref = {}
    for chunk in (0, 3):
        cfg.logprob_chunk_size = chunk
        rollout = collect_rollout(policy, policy, tokenizer, rows, rewards, cfg, torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = completion_logprobs(base, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                           rollout.completion_mask, cfg.temperature)[0]
            adapted = completion_logprobs(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                          rollout.completion_mask, cfg.temperature)[0]
        m = rollout.completion_mask.bool()
        torch.testing.assert_close(rollout.ref_logprobs[m], expected[m], atol=1e-5 if chunk else 0, rtol=0)
        assert not torch.allclose(rollout.ref_logprobs[m], adapted[m], atol=1e-3)
        ref[chunk] = rollout

    frozen = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(policy, cfg)
    rollout = ref[3]
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)  # a gradient whatever the rewards
    metrics = update(policy, optimizer, make_scheduler(optimizer, cfg, 1), rollout, cfg, World(),
                     torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, lora_before[n]) for n, p in policy.named_parameters() if p.requires_grad)


def qlora(tmp_path, name="qwen2", quantization="nf4", double_quant=False):
    """A tiny model saved and loaded back with its Linear layers in 4 bits (bitsandbytes), with a
    LoRA adapter whose B is non-zero: (the 4-bit base alone, the adapted model)."""
    from grpo.engine.models import load_causal_lm
    build(name).save_pretrained(tmp_path / name)
    config = adapters.quantization_config(quantization, double_quant, torch.float32)
    load = lambda: load_causal_lm(str(tmp_path / name), torch.device("cpu"), torch.float32, quantization_config=config)
    base, model = load().train(), adapters.add_lora(load(), r=4, alpha=8)
    return base, with_nonzero_b(model)


@pytest.mark.parametrize("quantization,double_quant", [("nf4", False), ("fp4", True)])
def test_qlora_stores_the_base_in_4_bits_and_its_reference_is_that_base_exactly(tmp_path, quantization, double_quant):
    import bitsandbytes as bnb
    base, model = qlora(tmp_path, quantization=quantization, double_quant=double_quant)
    four_bit = [m for m in adapters.unwrap(model).modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 layers x q,k,v,o,gate,up,down
    assert len(four_bit) == 2 * 7 and all(m.weight.dtype == torch.uint8 for m in four_bit)
    assert all(m.weight.quant_state.quant_type == quantization for m in four_bit)
    assert adapters.unwrap(model).is_loaded_in_4bit
    assert all("lora_" in n and p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    batch = group_batch()
    with torch.no_grad():
        expected = completion_logprobs(base, *batch[:4], engine="plain")[0]
        with adapters.reference_policy(model) as ref:
            got = completion_logprobs(ref, *batch[:4])[0]
        adapted = completion_logprobs(model, *batch[:4])[0]
    m = batch[3].bool()
    torch.testing.assert_close(got[m], expected[m], atol=1e-5, rtol=0)
    assert not torch.allclose(adapted[m], expected[m], atol=1e-3)  # the adapter matters


def test_qlora_fast_paths_equal_the_plain_ones(tmp_path, monkeypatch):
    """The packed scoring forward (hand-written for Qwen2: it calls the 4-bit projections, whose
    MLP is not the fused one) and the group decoder give the plain paths' numbers on a 4-bit base,
    gradients included, also under checkpointing with the chunked LM head."""
    _, model = qlora(tmp_path)
    pids, pmask, comp, cmask, w = group_batch(seed=2)
    assert packed.hand_written(model, 13)

    def run(engine, chunk=0):
        model.zero_grad()
        lp, ent = completion_logprobs(model, pids, pmask, comp, cmask, compute_entropy=True, engine=engine,
                                      logprob_chunk_size=chunk, recompute_mlp=True)
        ((lp + 0.1 * ent) * cmask * w).sum().backward()
        return lp.detach() * cmask, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    lp_ref, grads_ref = run("plain")
    lp, grads = run("auto")
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads)
    enable_gradient_checkpointing(model)
    lp_c, grads_c = run("auto", chunk=3)
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    model.eval()
    assert_group_decoder_equals_plain(model, pids, pmask, monkeypatch)


def test_a_no_grad_eval_pass_leaves_a_4bit_base_trainable(tmp_path):
    """GRPO samples in no-grad passes between its training steps. bitsandbytes would repack a 4-bit
    layer for inference on the first eval-mode no-grad call on CPUs with AVX512-BF16, after which
    the layer's backward no longer reaches the adapter's input (`models.keep_trainable_layout`
    turns that off): the gradients after such a pass are those of a model that never made one."""
    _, fresh = qlora(tmp_path)
    _, used = qlora(tmp_path)
    pids, pmask, comp, cmask, w = group_batch(seed=2)
    used.eval()
    with torch.no_grad():
        completion_logprobs(used, pids, pmask, comp, cmask, engine="plain")
    grads = []
    for model in (fresh, used):
        model.train()
        lp, _ = completion_logprobs(model, pids, pmask, comp, cmask, engine="plain")
        (lp * cmask * w).sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bad_quantization_settings_are_config_errors(monkeypatch):
    import sys
    with pytest.raises(ConfigError, match="peft.quantization: expected one of nf4, fp4"):
        adapters.quantization_config("int8", False, torch.float32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ConfigError, match=r"bitsandbytes.*grpo\[qlora\]"):
        adapters.quantization_config("nf4", False, torch.float32)
