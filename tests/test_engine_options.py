"""Model-level engine options: dropout fully off, `model_init_kwargs`, gradient checkpointing
reaching every scoring forward, and which models the group decoder takes."""

import pytest
import torch

from grpo.engine import llama
from grpo.engine.generation import generate_groups
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import checkpointing_active, disable_dropout, enable_gradient_checkpointing, load_causal_lm
from grpo.errors import ConfigError
from tiny_archs import PAD, build, group_batch, record_decoders

pytestmark = pytest.mark.usefixtures("one_thread_module")
CPU = torch.device("cpu")


def logprobs(model, batch, engine="auto", **kw):
    return completion_logprobs(model, *batch[:4], engine=engine, **kw)[0] * batch[3]


@pytest.mark.parametrize("name,dropout", [("llama", dict(attention_dropout=0.1)),
                                          ("gpt2", dict(attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)),
                                          ("gpt_neox", dict(attention_dropout=0.1, hidden_dropout=0.1))])
def test_config_dropout_is_off_in_training_mode(tmp_path, name, dropout):
    """A config with attention (and other) dropout: the modules copied it at init, so it was still
    applied to training log-prob passes after nn.Dropout modules were zeroed. Loaded through
    load_causal_lm, two training-mode passes are identical, on both engines."""
    model = build(name, **dropout).train()
    batch = group_batch()
    with torch.no_grad():  # the control: with dropout on, two passes differ
        assert not torch.equal(logprobs(model, batch, "plain"), logprobs(model, batch, "plain"))
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path), CPU, torch.float32)
    assert loaded.training
    assert all(getattr(loaded.config, k) == 0.0 for k in dropout)
    with torch.no_grad():
        for engine in ("plain", "auto"):
            assert torch.equal(logprobs(loaded, batch, engine), logprobs(loaded, batch, engine))


def test_model_init_kwargs_attn_implementation_eager_equals_sdpa(tmp_path):
    build("qwen3").save_pretrained(tmp_path)
    batch = group_batch(seed=1)
    out = {}
    for impl in ("eager", "sdpa"):
        model = load_causal_lm(str(tmp_path), CPU, torch.float32, model_init_kwargs={"attn_implementation": impl})
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            out[impl] = {e: logprobs(model, batch, e) for e in ("auto", "plain")}
    for engine in ("auto", "plain"):
        torch.testing.assert_close(out["eager"][engine], out["sdpa"][engine], atol=1e-5, rtol=0)
    assert not torch.equal(out["sdpa"]["auto"], torch.zeros_like(out["sdpa"]["auto"]))


def test_model_init_kwargs_dtype_and_bad_values(tmp_path):
    build("llama").save_pretrained(tmp_path)
    for key in ("dtype", "torch_dtype"):
        model = load_causal_lm(str(tmp_path), CPU, torch.float32, model_init_kwargs={key: "bfloat16"})
        assert next(model.parameters()).dtype == torch.bfloat16
    frozen = load_causal_lm(str(tmp_path), CPU, torch.bfloat16, trainable=False)
    assert next(frozen.parameters()).dtype == torch.bfloat16 and not frozen.training
    with pytest.raises(ConfigError, match="model_init_kwargs.dtype"):
        load_causal_lm(str(tmp_path), CPU, torch.float32, model_init_kwargs={"dtype": "float8"})
    with pytest.raises(ConfigError, match="dtype or torch_dtype"):
        load_causal_lm(str(tmp_path), CPU, torch.float32,
                       model_init_kwargs={"dtype": "float32", "torch_dtype": "float32"})
    with pytest.raises(ConfigError, match="model_init_kwargs"):
        load_causal_lm(str(tmp_path), CPU, torch.float32, model_init_kwargs={"attn_implementation": "no_such_thing"})


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=37, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                        bos_token_id=None, eos_token_id=1))


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3_moe", "bloom"])
def test_gradient_checkpointing_changes_no_gradient(name):
    """Hugging Face's activation checkpointing reaches the packed forward (Llama, GPT-2, an MoE:
    each layer really runs twice) and the fallback (BLOOM: the KV-cache hand-over would lose its
    cache under checkpointing, so the plain forward runs); the gradients are the same."""
    model = (_bloom() if name == "bloom" else build(name)).train()
    disable_dropout(model)
    pids, pmask, comp, cmask, w = group_batch(seed=4)
    mlp = next(m for n, m in model.named_modules() if n.endswith(("mlp", "self_attention")) and ".0." in n)
    calls = []
    mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # (a recompute stops early, after its last saved tensor)

    def grads():
        model.zero_grad()
        calls.clear()
        lp, ent = completion_logprobs(model, pids, pmask, comp, cmask, compute_entropy=True, entropy_grad=False)
        (lp * cmask * w).sum().backward()
        return len(calls), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    n_plain, plain = grads()
    enable_gradient_checkpointing(model)
    assert checkpointing_active(model)
    n_ckpt, ckpt = grads()
    # One forward (packed, or BLOOM's plain one instead of its two KV-cache passes), then the
    # layer's recompute in the backward.
    assert (n_plain, n_ckpt) == ((2 if name == "bloom" else 1), 2)
    assert len(plain) == len(ckpt) == len(list(model.parameters()))
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_unsupported_model_is_a_config_error():
    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(NoCheckpointing())


def test_group_decoder_takes_a_sliding_window_longer_than_the_positions(monkeypatch):
    """Mistral with a 4096-token window: every key is inside every window, so the group decoder is
    exact and takes it; a window of 4 is not (the model's own cache decoder then runs)."""
    long_window = build("mistral_window_4096").eval()
    short_window = build("mistral_window_4").eval()
    assert llama.supported(long_window, 30) and not llama.supported(long_window, 5000)
    assert not llama.supported(short_window, 30)
    pids, pmask = group_batch()[:2]
    ids, mask = pids[::3], pmask[::3]
    kw = dict(group_size=3, max_new_tokens=8, eos_token_id=1, pad_token_id=PAD)
    states = record_decoders(monkeypatch)
    for model in (long_window, short_window):
        plain = generate_groups(model, ids, mask, engine="plain", generator=torch.Generator().manual_seed(0), **kw)
        fast = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(plain.completion_ids, fast.completion_ids)
        torch.testing.assert_close(plain.logprobs, fast.logprobs, atol=1e-5, rtol=0)
    assert states == ["CacheDecoder", "GroupDecoder", "CacheDecoder", "CacheDecoder"]
