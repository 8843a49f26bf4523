"""From the last hidden states to per-token log-probs and entropy, optionally a chunk at a time.

The LM head turns K scored positions into [K, V] logits; with Qwen2's 151,936-token vocabulary
and K = 8 x 8 x 128 scored tokens that is 8k x 152k float32 = 5 GB for the logits alone, plus
the softmax that the backward keeps. `chunked_token_stats` never holds more than
[chunk, V] of it: each chunk runs the head, the log-softmax gather and the entropy, and under
grad the backward recomputes that chunk's logits instead of keeping them (saved for the
backward: the hidden states and one log-normaliser per token). Values and gradients are those of
the whole-logits path (tests/test_lmhead.py).

Two ways to the same gradients. A plain `nn.Linear` head (Llama, Qwen, Mistral, ...; a scale or
divisor folded in) goes through `_LinearHeadStats`, which writes the backward by hand: per chunk
d logits = g * (onehot - softmax) (plus the entropy's term), then d hidden = d logits @ W and
dW += d logits^T @ hidden *in place*. Through autograd instead (`torch.utils.checkpoint` per
chunk, the path for every other head: softcapping, a sharded or adapter-wrapped head) each
chunk's dW is a fresh [V, D] tensor added into W.grad afterwards: for Qwen2's tied 151,936 x 896
embedding that is 0.54 GB more at the backward's peak (bench/memory.py).

The head is the model's own output layer followed by what its forward does to the logits after
it: final-logit softcapping (Gemma 2/3), a scale (Cohere's `logit_scale`) or a divisor
(Granite's `logits_scaling`). `check_head` compares this against the model's own logits once
per model and raises if they differ, so an unknown transform cannot silently change the numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .models import accumulate_matmul, cast, compute_dtype, unwrap


def token_stats(logits: Tensor, targets: Tensor, temperature: float, compute_entropy: bool,
                entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
    """log-prob of each target [...] under logits [..., V] / temperature, and the entropy."""
    # float32 maths whatever the model dtype (bf16 log-probs are too coarse for ratios near 1).
    logits = logits.float() / temperature
    # log_softmax(z)[o] = z[o] - logsumexp(z): gather first, so no [N, T, V] log-prob tensor is
    # ever materialised next to the logits (the vocabulary can be 150k wide).
    lse = torch.logsumexp(logits, dim=-1)
    token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if compute_entropy:
        # H = -sum p log p = logsumexp(z) - sum p z, with p = softmax(z). When it is only a
        # metric (entropy_grad=False) it is computed without grad, so autograd does not keep
        # [N, T, V] softmax outputs alive until the backward (with a 150k vocabulary, gigabytes).
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            z = logits if entropy_grad else logits.detach()
            probs = torch.softmax(z, dim=-1)
            entropy = (lse if entropy_grad else lse.detach()) - (probs * z).sum(-1)
    return token_logprobs, entropy


def head_logits(model, hidden: Tensor) -> Tensor:
    """The model's logits for final hidden states [..., D]: its output layer, then the final
    transform its forward applies (softcapping, a scale)."""
    base = unwrap(model)
    cfg = base.config
    logits = base.get_output_embeddings()(hidden)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:                                   # Gemma 2/3: cap * tanh(logits / cap)
        logits = torch.tanh(logits / cap) * cap
    if getattr(base, "logit_scale", None) is not None:    # Cohere: logits * logit_scale
        logits = logits * base.logit_scale
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        logits = logits / cfg.logits_scaling
    return logits


def check_head(model, hidden: Tensor, model_logits: Tensor) -> None:
    """`head_logits(hidden)` must be the model's own logits `model_logits` for the same rows."""
    with torch.no_grad():
        ours = head_logits(model, hidden).float()
    theirs = model_logits.detach().float()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise ValueError(f"logprob_chunk_size: the chunked LM head does not reproduce the logits of "
                         f"{type(unwrap(model)).__name__} (its forward transforms them in a way "
                         f"grpo.engine.lmhead.head_logits does not know); set logprob_chunk_size: 0")


def linear_head(model) -> tuple[torch.nn.Linear, float] | None:
    """(the output layer, the scale its forward multiplies the logits by) when the head is a
    plain `nn.Linear` followed by at most a constant scale; None otherwise (softcapping, an
    adapter-wrapped or FSDP2-sharded head): those take the autograd path."""
    base = unwrap(model)
    head, cfg = base.get_output_embeddings(), base.config
    if type(head) is not torch.nn.Linear or getattr(cfg, "final_logit_softcapping", None) is not None:
        return None
    if type(head.weight) is not torch.nn.Parameter and type(head.weight) is not Tensor:
        return None  # a DTensor (FSDP2): its whole weight exists only inside the module's own call
    scale = 1.0
    if getattr(base, "logit_scale", None) is not None:
        if isinstance(base.logit_scale, Tensor):
            return None  # a learned scale would need its own gradient
        scale *= float(base.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    return head, scale


ROWS = 32


def _normaliser_and_entropy(z: Tensor, compute_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """logsumexp(z) and the entropy lse - sum softmax(z) z of logits z [c, V], ROWS rows at a
    time: torch.logsumexp and softmax would each make [c, V] temporaries beside z (two and one),
    this makes [ROWS, V] ones. With m the row max and e = exp(z - m): lse = m + log sum e,
    H = lse - sum e z / sum e."""
    lses, ents = [], []
    for r in range(0, z.shape[0], ROWS):
        zr = z[r:r + ROWS]
        m = zr.amax(-1, keepdim=True)
        e = torch.sub(zr, m).exp_()
        total = e.sum(-1)
        lse = m.squeeze(-1) + total.log()
        lses.append(lse)
        if compute_entropy:
            ents.append(lse - e.mul_(zr).sum(-1) / total)
        del e  # freed before the next rows' e exists
    return torch.cat(lses), (torch.cat(ents) if compute_entropy else None)


class _LinearHeadStats(torch.autograd.Function):
    """token log-probs and entropy of `(hidden @ W^T + b) * scale` at temperature, `chunk` rows at
    a time, the backward written out (module docstring). With z = logits * scale / temperature,
    p = softmax(z), lp = z_t - lse(z), H = lse(z) - sum p z:
        d lp / d z = onehot(t) - p,     d H / d z = -p * (log p + H) = -p * (z - lse + H),
    and d logits = d z * scale / temperature. Matmuls run in the autocast dtype (as the module
    would), the softmax maths in float32; dW and db accumulate in W's own dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, factor, chunk, compute_entropy, entropy_grad):
        dtype = compute_dtype(hidden)
        w, b = weight.to(dtype), cast(bias, dtype)
        lps, lses, ents = [], [], []
        for s in range(0, hidden.shape[0], chunk):
            z = torch.nn.functional.linear(hidden[s:s + chunk].to(dtype), w, b).float().mul_(factor)
            lse, ent = _normaliser_and_entropy(z, compute_entropy)
            lps.append(z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse)
            lses.append(lse)
            if compute_entropy:
                ents.append(ent)
            del z  # freed before the next chunk's z exists
        lp, lse = torch.cat(lps), torch.cat(lses)
        ent = torch.cat(ents) if compute_entropy else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent if entropy_grad else None)
        ctx.factor, ctx.chunk, ctx.dtype, ctx.entropy_grad = factor, chunk, dtype, entropy_grad
        if compute_entropy and not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        dtype, chunk, factor = ctx.dtype, ctx.chunk, ctx.factor
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, b = weight.to(dtype), cast(bias, dtype)
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight) if need_w else None
        d_bias = torch.zeros_like(bias) if need_b else None
        with_entropy = ctx.entropy_grad and g_ent is not None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk]
            z = torch.nn.functional.linear(h, w, b).float().mul_(factor)
            log_p = z.sub_(lse[s:s + chunk, None])              # z - lse, in place: z is not needed again
            p = log_p.exp() if with_entropy else log_p.exp_()   # one [chunk, V] buffer unless H needs log p
            g = g_lp[s:s + chunk, None].float()
            if with_entropy:
                g_h = g_ent[s:s + chunk, None].float()
                # d z = g (onehot - p) - g_H p (log p + H)
                d_z = p.mul_(log_p.add_(ent[s:s + chunk, None]).mul_(g_h).add_(g)).neg_()
            else:
                d_z = p.mul_(g).neg_()
            d_z.scatter_add_(-1, t[:, None], g)
            d_logits = d_z.mul_(factor).to(dtype)
            if need_h:
                d_hidden[s:s + chunk] = d_logits @ w
            if need_w:
                accumulate_matmul(d_weight, d_logits.T, h)
            if need_b:
                d_bias.add_(d_logits.sum(0))
            del z, log_p, p, d_z, d_logits  # one [chunk, V] buffer at a time, not the last chunk's too
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def chunked_token_stats(model, hidden: Tensor, targets: Tensor, temperature: float, compute_entropy: bool,
                        entropy_grad: bool, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """`token_stats(head_logits(hidden), targets)` for hidden [K, D], targets [K], chunk_size
    rows of logits at a time, in the forward and (recomputed) in the backward."""
    def stats(h, t):
        return token_stats(head_logits(model, h), t, temperature, compute_entropy, entropy_grad)

    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in unwrap(model).get_output_embeddings().parameters()))
    # A plain head takes the written-out path with or without grad: its forward is lighter than
    # `token_stats` (one [chunk, V] buffer, the logits scaled in place, where that makes four),
    # and scoring (no grad) then computes exactly what the update's forward will.
    linear = linear_head(model) if hidden.shape[0] else None
    if linear is not None:
        head, scale = linear
        return _LinearHeadStats.apply(hidden, head.weight, head.bias, targets, scale / temperature, chunk_size,
                                      compute_entropy, entropy_grad)
    lps, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        lp, ent = checkpoint(stats, h, t, use_reentrant=False) if grad else stats(h, t)
        lps.append(lp)
        ents.append(ent)
    if not lps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if compute_entropy else None)
    return torch.cat(lps), (torch.cat(ents) if compute_entropy else None)


class _Capture:
    """Forward hook on the model's decoder: keeps its output's last hidden state (what the
    causal-LM forward feeds its LM head)."""

    def __init__(self, model):
        self.hidden = None
        self.handle = unwrap(model).get_decoder().register_forward_hook(self)

    def __call__(self, module, args, output):
        self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def forward_hidden(model, keep: Tensor | None = None, **kwargs):
    """`model(**kwargs)` with its LM head on the positions `keep` only (1-D tensor; None or empty:
    on none) and its final hidden states [B, L, D] captured. Returns (hidden, output)."""
    device = kwargs["input_ids"].device
    keep = torch.zeros(0, dtype=torch.long, device=device) if keep is None else keep
    with _Capture(model) as cap:
        out = model(**kwargs, logits_to_keep=keep)
    if cap.hidden is None:
        raise RuntimeError("logprob_chunk_size: could not read the final hidden states of "
                           f"{type(unwrap(model)).__name__}")
    return cap.hidden, out
