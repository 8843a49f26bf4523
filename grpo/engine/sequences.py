"""What a generation call returns (`Generation`), and the per-step distribution every strategy
draws from: softmax(logits / temperature) within top-k / top-p / min-p, blocked tokens excluded.
Shared by `generation.py` (sampling, beam search) and `stochastic_beam.py`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Generation:
    """G completions per prompt, right-padded to the longest one actually generated (T <= max_new_tokens)."""
    completion_ids: Tensor   # [P*G, T] long, pad_token_id after EOS
    completion_mask: Tensor  # [P*G, T] long, 1 on generated tokens up to and including EOS
    logprobs: Tensor         # [P*G, T] float32, log-prob of each token (0 where the mask is 0)
    truncated: Tensor        # [P*G] bool, True if no EOS within max_new_tokens
    # [P*G, T] float32: log-prob of each token under the distribution it was actually drawn from
    # (tempered, then top-k/top-p filtered and renormalised); equal to `logprobs` without filters.
    # None for beam search, which draws nothing.
    sampling_logprobs: Tensor | None = None
    # [P*G] float64, stochastic_beam only: q_i(kappa), the probability that completion i is in a
    # group drawn without replacement given the group's threshold (stochastic_beam.py).
    inclusion_probs: Tensor | None = None
    # With keep_cache (sampling on the group decoder): per row, the keys and values (RoPE
    # applied) of the tokens it read, its prompt's and its completion's but the last
    # (`decoders.KeptRow`), for a later call that continues the row (decoders.prefill_after).
    cache: list | None = None

    def outside_inference(self) -> "Generation":
        """Its tensors cloned outside torch.inference_mode (where they are made), as autograd
        needs them; the kept cache as it is."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})

    def select(self, rows: Tensor) -> "Generation":
        """The rows `rows` (e.g. the completions of some groups), same padding."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return Generation(self.completion_ids[rows], self.completion_mask[rows], self.logprobs[rows],
                          self.truncated[rows], pick(self.sampling_logprobs), pick(self.inclusion_probs))

    @staticmethod
    def cat(parts: list["Generation"], pad_token_id: int) -> "Generation":
        """Rows of several generations one after another, right-padded to the longest."""
        T = max(g.completion_ids.shape[1] for g in parts)

        def pad(x: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

        def cat_optional(name: str, value):
            xs = [getattr(g, name) for g in parts]
            if any(x is None for x in xs):
                return None
            return torch.cat([pad(x, value) if x.dim() == 2 else x for x in xs])

        return Generation(torch.cat([pad(g.completion_ids, pad_token_id) for g in parts]),
                          torch.cat([pad(g.completion_mask, 0) for g in parts]),
                          torch.cat([pad(g.logprobs, 0.0) for g in parts]),
                          torch.cat([g.truncated for g in parts]),
                          cat_optional("sampling_logprobs", 0.0), cat_optional("inclusion_probs", None))


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  blocked: Tensor | None = None) -> Tensor:
    """Set to -inf every blocked logit, and every logit outside the top-k tokens, the top-p
    nucleus and the min-p floor, in that order (Hugging Face's order of warpers).

    `blocked` [V] bool: tokens never sampled (padding, and BOS mid-completion: see
    `backend.blocked_token_ids`). top_k = 0, top_p = 1 and min_p = 0 disable the others. Top-p
    keeps the smallest set of most likely tokens whose probability reaches top_p (always at least
    one token), the same rule as Hugging Face's warper. Ties at the k-th value are all kept. Min-p
    keeps the tokens whose probability is at least min_p times the most likely one's (its ratio
    test is the same before or after renormalising what top-k/top-p kept).
    """
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token if the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        # log p_i < log(min_p) + log p_max  <=>  p_i < min_p * p_max (logits or log-probs alike).
        floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def standard_exponential(shape, generator, device, dtype=torch.float32) -> Tensor:
    """E ~ Exp(1) by inversion, -log(1 - U) with U ~ Uniform[0, 1) from `generator`, kept above 0
    (U = 0 would give E = 0). `Tensor.exponential_` draws the same distribution at several times
    the cost of the uniforms on a CPU, and sampling draws a [rows, vocabulary] of them at every
    decode step."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return torch.log1p(-u).neg_().clamp_min_(torch.finfo(dtype).tiny)


def gumbel(shape, generator, device, dtype=torch.float32) -> Tensor:
    """Standard Gumbel noise, -log(E) with E ~ Exp(1), from `generator`."""
    return -standard_exponential(shape, generator, device, dtype).log()


def categorical(logp: Tensor, generator) -> Tensor:
    """One index per row [B, 1] from the categorical distribution softmax(logp) [B, V], -inf never
    drawn: the exponential race that `torch.multinomial` runs for one sample, argmax_i p_i / E_i
    with E_i ~ Exp(1) i.i.d., in log space the Gumbel-max trick (no exp of logp needed)."""
    return (logp + gumbel(logp.shape, generator, logp.device)).argmax(-1, keepdim=True)


def filters_on(top_k: int, top_p: float, vocab_size: int, min_p: float = 0.0, blocked: Tensor | None = None) -> bool:
    return 0 < top_k < vocab_size or top_p < 1.0 or min_p > 0.0 or (blocked is not None and bool(blocked.any()))


def penalize_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Hugging Face's and vLLM's repetition penalty: the logit of every token already in the
    prompt or the completion (`seen` [B, V] bool) is divided by `penalty` when positive and
    multiplied by it when negative, so penalty > 1 makes it less likely either way."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sampling_distribution(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
                          blocked: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(full, filtered) log-probs [B, V]: log softmax(logits / temperature), and the distribution a
    token is actually drawn from, the same restricted by `filter_logits` and renormalised (-inf
    outside). Without filters the two are the same tensor."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if not filters_on(top_k, top_p, logits.shape[-1], min_p, blocked):
        return logp, logp
    # Filtering log-probs is filtering logits (same order, same softmax).
    return logp, torch.log_softmax(filter_logits(logp, top_k, top_p, min_p, blocked), dim=-1)


def gather_beams(x: Tensor, idx: Tensor) -> Tensor:
    """x [P, K, ...] -> x[p, idx[p, g], ...] for idx [P, G]: pick (and reorder) beams per prompt."""
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, idx)
