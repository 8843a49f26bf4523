"""Log-probs without the full logits: the chunked LM head equals the whole one (values and
gradients), and no [tokens x vocab] tensor is ever made, in the forward or the backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from grpo.engine import lmhead
from grpo.engine.lmhead import chunked_token_stats, head_logits, linear_head, token_stats
from grpo.engine.logprobs import completion_logprobs
from tiny_archs import build, group_batch

pytestmark = pytest.mark.usefixtures("one_thread_module")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns while active (autograd's backward ops included)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), (func.__name__, tuple(t.shape))
        return out


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_chunked_stats_equal_whole_logits_with_gradients(entropy_grad):
    model = build("gemma2", vocab_size=301)  # final-logit softcapping in the head
    K, D = 23, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(K, D, generator=g, dtype=torch.float64).float().requires_grad_()
    targets = torch.randint(0, 301, (K,), generator=g)
    w_lp, w_ent = torch.randn(K, generator=g), torch.randn(K, generator=g)

    def run(chunk):
        model.zero_grad()
        hidden.grad = None
        if chunk:
            lp, ent = chunked_token_stats(model, hidden, targets, 0.7, True, entropy_grad, chunk)
        else:
            lp, ent = token_stats(head_logits(model, hidden), targets, 0.7, True, entropy_grad)
        ((lp * w_lp) + (ent * w_ent if entropy_grad else 0)).sum().backward()
        return lp.detach(), ent.detach(), hidden.grad.clone(), model.lm_head.weight.grad.clone()

    whole, chunked = run(0), run(5)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The head really is Gemma 2's: the model's own logits for these hidden states.
    with torch.no_grad():
        cap = model.config.final_logit_softcapping
        capped = cap * torch.tanh(model.lm_head(hidden) / cap)
        torch.testing.assert_close(head_logits(model, hidden), capped)


def _head_case(tied: bool, bias: bool, scale: bool, seed: int = 0):
    model = build("llama", vocab_size=301, tie_word_embeddings=tied)
    if bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(301) * 0.1)
    if scale:
        model.config.logits_scaling = 2.5  # Granite's divisor
    g = torch.Generator().manual_seed(seed)
    K, D = 23, model.config.hidden_size
    hidden = torch.randn(K, D, generator=g).requires_grad_()
    return (model, hidden, torch.randint(0, 301, (K,), generator=g), torch.randn(K, generator=g),
            torch.randn(K, generator=g))


def _chunked(model, hidden, targets, entropy_grad, chunk, fused=True):
    """chunked_token_stats at temperature 0.7; fused=False: through autograd's path
    (checkpoint per chunk), as a head `linear_head` turns away would go."""
    if fused:
        return chunked_token_stats(model, hidden, targets, 0.7, True, entropy_grad, chunk)
    real = lmhead.linear_head
    lmhead.linear_head = lambda m: None
    try:
        return chunked_token_stats(model, hidden, targets, 0.7, True, entropy_grad, chunk)
    finally:
        lmhead.linear_head = real


def _stats_and_grads(model, hidden, targets, w_lp, w_ent, entropy_grad, chunk, fused=True):
    model.zero_grad()
    hidden.grad = None
    if not chunk:
        lp, ent = token_stats(head_logits(model, hidden), targets, 0.7, True, entropy_grad)
    else:
        lp, ent = _chunked(model, hidden, targets, entropy_grad, chunk, fused)
    ((lp * w_lp) + (ent * w_ent if entropy_grad else 0)).sum().backward()
    grads = [hidden.grad.clone(), model.lm_head.weight.grad.clone()]
    if model.lm_head.bias is not None:
        grads.append(model.lm_head.bias.grad.clone())
    return [lp.detach(), ent.detach(), *grads]


@pytest.mark.parametrize("entropy_grad", [True, False])
@pytest.mark.parametrize("tied,bias,scale", [(True, False, False), (False, True, True)])
@pytest.mark.parametrize("rows", [32, 2])
def test_the_hand_written_head_backward_equals_autograd_on_whole_logits(entropy_grad, tied, bias, scale, rows,
                                                                        monkeypatch):
    """The plain Linear head takes `_LinearHeadStats`: log-probs, entropy and the gradients of
    hidden, W (tied to the embedding or not) and a bias equal those of the whole logits, also
    with its normaliser and entropy taken a few rows of a chunk at a time (rows 2: chunks of 5
    rows in 2, 2 and 1)."""
    monkeypatch.setattr(lmhead, "ROWS", rows)
    model, hidden, targets, w_lp, w_ent = _head_case(tied, bias, scale)
    assert linear_head(model) == (model.lm_head, 1 / 2.5 if scale else 1.0)
    whole = _stats_and_grads(model, hidden, targets, w_lp, w_ent, entropy_grad, 0)
    fused = _stats_and_grads(model, hidden, targets, w_lp, w_ent, entropy_grad, 5)
    for a, b in zip(fused, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert linear_head(build("gemma2")) is None  # softcapping: the autograd path


def test_the_hand_written_head_backward_makes_one_weight_sized_gradient():
    """Autograd's chunked backward makes a fresh [V, D] weight gradient per chunk (then adds it
    into W.grad); the hand-written one accumulates in place into a single buffer."""
    model, hidden, targets, w_lp, w_ent = _head_case(True, False, False)
    V, D = model.lm_head.weight.shape

    class WeightSized(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            # In place (addmm_) or a new handle on the same storage (AccumulateGrad's detach): nothing new.
            if not name.endswith("_") and name not in ("detach", "alias"):
                self.count += sum(isinstance(t, torch.Tensor) and tuple(t.shape) == (V, D) and not t._is_view()
                                  for t in tree_flatten(out)[0])
            return out

    def count(fused):
        model.zero_grad()
        lp, _ = _chunked(model, hidden, targets, False, 5, fused)
        loss = (lp * w_lp).sum()
        with WeightSized() as mode:
            loss.backward()
        return mode.count

    assert count(fused=False) >= 5  # one per chunk of 23 tokens (the check can fail)
    assert count(fused=True) == 1


def test_the_hand_written_head_backward_under_bfloat16_autocast():
    """Under autocast the matmuls run in bfloat16 (as the module would), the softmax maths in
    float32: the same numbers as autograd's chunked path within bfloat16's precision."""
    model, hidden, targets, w_lp, w_ent = _head_case(True, False, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _stats_and_grads(model, hidden, targets, w_lp, w_ent, False, 5)
        plain = _stats_and_grads(model, hidden, targets, w_lp, w_ent, False, 5, fused=False)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_no_tokens_x_vocab_tensor_in_forward_or_backward():
    """A 4096-token vocabulary and ~100 scored tokens: the unchunked update makes [K, V] logits
    (the check can fail); with logprob_chunk_size=4 no op in the forward or the backward returns
    a tensor with a quarter of that many elements, and the gradients are the same."""
    V = 4096
    model = build("llama", vocab_size=V, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                  num_key_value_heads=1).train()
    pids, pmask, comp, cmask, w = group_batch(seed=2, P=4, G=4, T=12)
    K = int(cmask.sum())
    assert K / 4 > 2 * model.config.hidden_size  # a quarter of [K, V] is larger than any weight [V, D]

    def step(chunk):
        model.zero_grad()
        with LargestTensor() as forward:
            lp, ent = completion_logprobs(model, pids, pmask, comp, cmask, compute_entropy=True,
                                          entropy_grad=False, logprob_chunk_size=chunk)
            loss = (lp * cmask * w).sum()
        with LargestTensor() as backward:
            loss.backward()
        return lp.detach() * cmask, ent * cmask, [p.grad.clone() for p in model.parameters()], forward, backward

    lp, ent, grads, fwd, bwd = step(0)
    assert fwd.numel >= K * V and bwd.numel >= K * V
    lp_c, ent_c, grads_c, fwd_c, bwd_c = step(4)
    assert fwd_c.numel < K * V / 4, fwd_c.op
    assert bwd_c.numel < K * V / 4, bwd_c.op
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_c, ent, atol=1e-5, rtol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("engine", ["auto", "plain"])
def test_chunked_head_on_every_path(engine):
    """The plain forward, the packed forward (Llama) and the KV-cache hand-over (BLOOM) all take
    the chunked head, with the unchunked numbers."""
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=37, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                         bos_token_id=None, eos_token_id=1, hidden_dropout=0.0,
                                         attention_dropout=0.0))
    for model in (build("llama"), bloom):
        pids, pmask, comp, cmask, _ = group_batch(seed=3)
        with torch.no_grad():
            whole = completion_logprobs(model, pids, pmask, comp, cmask, compute_entropy=True, engine=engine)
            chunked = completion_logprobs(model, pids, pmask, comp, cmask, compute_entropy=True, engine=engine,
                                          logprob_chunk_size=3)
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a * cmask, b * cmask, atol=1e-5, rtol=0)


def test_a_head_transform_it_does_not_know_is_refused():
    """A model whose forward rescales its logits in a way head_logits does not reproduce: the
    first chunked call compares against the model's own logits and raises."""
    model = build("llama").eval()
    model.config.logits_scaling = None
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out
    model.forward = scaled
    pids, pmask, comp, cmask, _ = group_batch()
    with torch.no_grad(), pytest.raises(ValueError, match="logprob_chunk_size"):
        completion_logprobs(model, pids, pmask, comp, cmask, logprob_chunk_size=4)


def test_rejects_bad_chunk_size():
    model = build("llama")
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        completion_logprobs(model, *group_batch()[:4], logprob_chunk_size=-1)
