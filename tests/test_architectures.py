"""The packed scoring forward on every architecture it covers, against the model's own padded
forward: log-probs, entropy and every parameter's gradient (fp32 tolerance), with the LM head
whole and chunked.

The packed forward runs the model's own layers with our attention function (grpo.engine.packed);
so what is checked here is that, for each architecture, everything the layers do besides
attention (norms, q/k norms, biases, rotary or learned positions, sliding windows, softcapping,
MoE routing) sees the packed token list exactly as it would see the padded rows.
"""

import copy

import pytest
import torch

from grpo.engine import packed
from grpo.engine.generation import generate_groups
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import disable_dropout, position_ids_from_mask
from tiny_archs import ARCHS, build, group_batch

pytestmark = pytest.mark.usefixtures("one_thread_module")


def scored(model, batch, engine, chunk=0):
    """Log-probs, entropy (both masked) and parameter gradients of sum(w * (l + 0.1 H))."""
    pids, pmask, comp, cmask, w = batch
    model.zero_grad()
    lp, ent = completion_logprobs(model, pids, pmask, comp, cmask, temperature=0.9, compute_entropy=True,
                                  engine=engine, logprob_chunk_size=chunk)
    ((lp + 0.1 * ent) * cmask * w).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    return lp.detach() * cmask, ent.detach() * cmask, grads


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("name", list(ARCHS))
def test_packed_forward_equals_padded_forward(name, chunk, monkeypatch):
    monkeypatch.setattr(packed, "hand_written", lambda model, positions: False)  # the general path, always
    model = build(name).train()
    disable_dropout(model)
    oracle = copy.deepcopy(model)  # never switched to the packed attention
    batch = group_batch()
    assert packed.unsupported_reason(model) is None
    assert model.config.model_type in packed.PACKED_MODEL_TYPES
    lp, ent, grads = scored(model, batch, "auto", chunk)
    assert model.config._attn_implementation.startswith(packed.PREFIX)  # the packed path ran
    lp_ref, ent_ref, grads_ref = scored(oracle, batch, "plain")
    assert not oracle.config._attn_implementation.startswith(packed.PREFIX)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    assert any(g.abs().sum() > 0 for g in grads_ref)
    for (n, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)

    # Every other forward of the switched model is the original one, bit for bit (generation,
    # the plain path): the wrapper only acts on packed calls.
    pids, pmask, comp, _, _ = batch
    ids, attn = torch.cat([pids, comp], 1), torch.cat([pmask, torch.ones_like(comp)], 1)
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
        assert torch.equal(model(**kw).logits, oracle(**kw).logits)
    if chunk == 0:  # and generation, through the model's own KV cache
        gen = dict(group_size=2, max_new_tokens=5, eos_token_id=1, pad_token_id=0)
        a, b = (generate_groups(m.eval(), pids[::3], pmask[::3], generator=torch.Generator().manual_seed(0), **gen)
                for m in (model, oracle))
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral_window_4096"])
def test_hand_written_llama_forward_equals_the_general_one(name, monkeypatch):
    """Llama-style models take the hand-written packed forward (`packed.llama_hidden`) unless
    activation checkpointing is on; it gives the general forward's numbers, gradients included."""
    model = build(name).train()
    batch = group_batch(seed=5)
    assert packed.hand_written(model, 13)
    lp, ent, grads = scored(model, batch, "auto")
    assert not model.config._attn_implementation.startswith(packed.PREFIX)  # the general path did not run
    monkeypatch.setattr(packed, "hand_written", lambda model, positions: False)
    lp_g, ent_g, grads_g = scored(model, batch, "auto")
    assert model.config._attn_implementation.startswith(packed.PREFIX)
    torch.testing.assert_close(lp, lp_g, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_g, atol=1e-5, rtol=0)
    for a, b in zip(grads, grads_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_hand_written_forward_is_not_taken_where_it_would_compute_something_else():
    from grpo.engine.models import enable_gradient_checkpointing
    model = build("llama").train()
    assert packed.hand_written(model, 13)
    assert not packed.hand_written(build("mistral_window_4"), 13)
    assert not packed.hand_written(build("qwen3"), 13)  # q_norm / k_norm
    enable_gradient_checkpointing(model)  # it checkpoints its own layers then (tests/test_fastpaths.py)
    assert packed.hand_written(model, 13)


def test_other_architectures_fall_back_to_the_shared_prompt_path():
    """A model outside PACKED_MODEL_TYPES (BLOOM: ALiBi biases from the attention mask) keeps the
    KV-cache hand-over, with the plain forward's numbers."""
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=37, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                         bos_token_id=None, eos_token_id=1)).train()
    disable_dropout(model)
    assert "not among the tested" in packed.unsupported_reason(model)
    batch = group_batch(seed=1)
    lp, ent, grads = scored(model, batch, "auto")
    assert not model.config._attn_implementation.startswith(packed.PREFIX)
    lp_ref, ent_ref, grads_ref = scored(model, batch, "plain")
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_forward_refuses_a_model_that_drops_its_kwargs():
    """If an architecture did not hand `grpo_packed` down to its attention call, that layer would
    attend causally over the whole packed list: the forward raises instead of returning it."""
    model = build("qwen3").eval()
    attn = model.model.layers[1].self_attn
    forward = attn.forward

    def dropping(*args, **kwargs):
        kwargs.pop("grpo_packed", None)
        return forward(*args, **kwargs)
    attn.forward = dropping
    pids, pmask, comp, cmask, _ = group_batch()
    with pytest.raises(RuntimeError, match="1 of 2 attention layers"):
        completion_logprobs(model, pids, pmask, comp, cmask)


def test_attention_dropout_in_training_is_not_packed():
    model = build("llama", attention_dropout=0.1).train()
    assert "dropout" in packed.unsupported_reason(model)
    assert packed.unsupported_reason(model.eval()) is None
