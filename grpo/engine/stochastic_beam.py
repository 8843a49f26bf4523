"""Stochastic beam search: G distinct completions per prompt, sampled WITHOUT replacement.

Kool, van Hoof and Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k Trick for
Sampling Sequences Without Replacement", ICML 2019 (arXiv:1903.06059).

The Gumbel-top-k trick: perturb the log-probability phi_y of every complete sequence y with its
own Gumbel noise, G_y = phi_y + Gumbel(0); the k largest G_y are a sample of k sequences without
replacement, in the order successive sampling would draw them (the first is an ordinary sample
from p, the second one from p restricted to the rest, ...). There are V^L sequences, so the
perturbations are sampled top-down instead (section 3): a prefix's perturbed value is the
maximum of its completions', G_S = max_{y under S} G_y ~ Gumbel(phi_S), and given G_S the
children's values are Gumbels conditioned to have maximum exactly G_S ("truncated Gumbels"):

    G~_S' = -log(exp(-G_S) - exp(-Z) + exp(-G_phi_S')),  G_phi_S' ~ Gumbel(phi_S'), Z = max_S' G_phi_S'

computed in the numerically stable form of their appendix B.3. A beam of the k prefixes with the
largest perturbed values (finished sequences stay in it and compete as they are) then holds the
ancestors of the k largest leaves at every depth, so the search is exact, not an approximation:
its output is distributed exactly as k draws without replacement (tests/test_stochastic_beam.py
checks this against brute-force enumeration). The root's value is drawn as Gumbel(0) (log of
total probability 1) rather than fixed at 0: the set drawn is the same either way (a shift
changes no ordering), but only with a random root are the leaves' perturbed values independent
Gumbel(phi_y), which the estimator below relies on.

Estimator weights (section 4.2, after Duffield et al. 2007's priority sampling): with kappa the
(k+1)-th largest perturbed value over all sequences,

    q_i(kappa) = P(G_phi_i > kappa) = 1 - exp(-exp(phi_i - kappa)),   w_i = p(o_i) / q_i(kappa),

and sum_{i in group} w_i f(o_i) is an UNBIASED estimate of E_p[f] for any f (the mean of f
under the policy, as an i.i.d. group's plain mean is). kappa comes for free: every sequence
outside the group lies under some prefix the search pruned, and a prefix's value is the maximum
of its leaves', so kappa is the largest value ever pruned (the (k+1)-th candidate of each step).
`Generation.inclusion_probs` holds q_i(kappa); `priority_weights` gives w_i, and
`advantage_estimator: priority` uses them.

What the PLAIN group-normalised advantage does with such a group: it treats the G distinct
completions as if they were i.i.d. draws, each weighing 1/G in the gradient whatever its
probability. A completion is in the group with probability pi_y (sum_y pi_y = G), which
saturates at 1 for likely ones and is about G times p_y (at most) for unlikely ones, so the
gradient is that of the expected reward under the FLATTENED distribution pi_y / G, not under p:
biased towards the low-probability tail (like sampling at a higher temperature) and against the
mode. A mode of probability 0.9 counts 1/8 in a group of 8 instead of 0.9; the group mean, a
baseline of distinct completions, is not an estimate of E_p[r] either. The debiased estimator
(`priority`) reweights each completion by w_i and takes the weighted mean as baseline. In return
groups of distinct completions rarely tie, so almost no group is wasted.

The search runs on the decode states of `decoders.py` (`step`, `reorder`), as beam search does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decoders import start
from .sequences import Generation, gather_beams, gumbel, sampling_distribution

NEG = float("-inf")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def truncated_gumbel(target: Tensor, z: Tensor, g: Tensor) -> Tensor:
    """Gumbels g (with maximum z) shifted to have maximum exactly `target`, broadcasting:
    -log(exp(-target) - exp(-z) + exp(-g)), in Kool et al.'s stable form (appendix B.3):
    v = target - g + log(1 - exp(g - z)), result = target - max(0, v) - log(1 + exp(-|v|)).
    The child with g = z gets exactly `target`; order among children is kept."""
    v = target - g + _log1mexp(g - z)
    return target - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))


def inclusion_probs(sequence_logprobs: Tensor, kappa: Tensor) -> Tensor:
    """q_i(kappa) = 1 - exp(-exp(phi_i - kappa)) (float64); kappa = -inf (nothing was left out) gives 1."""
    return -torch.expm1(-torch.exp(sequence_logprobs.double() - kappa.double()))


def priority_weights(gen: Generation) -> Tensor:
    """w_i = p(o_i) / q_i(kappa) [N] float64, p under the distribution sampled from: the weights
    of the unbiased estimate sum_i w_i f(o_i) of E_p[f] over each group."""
    if gen.inclusion_probs is None or gen.sampling_logprobs is None:
        raise ValueError("priority weights need a stochastic_beam generation (inclusion_probs is None)")
    phi = (gen.sampling_logprobs.double() * gen.completion_mask).sum(-1)
    return torch.exp(phi - gen.inclusion_probs.log())


@torch.no_grad()
def stochastic_beam(model, prompt_ids: Tensor, prompt_mask: Tensor, G: int, max_new_tokens: int, eos_ids: Tensor,
                    pad_token_id: int, temperature: float, top_p: float, top_k: int,
                    generator: torch.Generator | None, fast: bool, min_p: float = 0.0,
                    blocked: Tensor | None = None) -> Generation:
    """G completions per prompt without replacement from softmax(logits / temperature) (within
    top-k / top-p / min-p when set, blocked tokens excluded), rows p*G .. p*G+G-1 in the order
    drawn; a completion that reaches max_new_tokens without EOS is a leaf (truncated), as in
    sampling.

    Per prompt a beam of G slots, each a prefix with phi (its log-prob under the sampling
    distribution) and key (its perturbed log-prob); finished slots compete as they are. At the
    start one slot holds the empty prefix, key ~ Gumbel(0), the others -inf.
    """
    device = prompt_ids.device
    P, L = prompt_ids.shape[0], max_new_tokens
    state, logits, next_pos = start(model, prompt_ids, prompt_mask, G, L, fast)
    V = logits.shape[-1]
    K = min(G + 1, V)  # children kept per slot: enough for the G survivors and the best pruned
    is_eos_token = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos_token[eos_ids] = True
    rows = torch.arange(P, device=device)

    phi = torch.full((P, G), NEG, dtype=torch.float64, device=device)
    phi[:, 0] = 0.0
    key = torch.full((P, G), NEG, dtype=torch.float64, device=device)
    key[:, 0] = gumbel((P,), generator, device, torch.float64)
    ended = torch.zeros(P, G, dtype=torch.bool, device=device)
    ids = torch.full((P, G, L), pad_token_id, dtype=torch.long, device=device)
    lp = torch.zeros(P, G, L, device=device)
    slp = torch.zeros(P, G, L, device=device)
    length = torch.zeros(P, G, dtype=torch.long, device=device)
    kappa = torch.full((P,), NEG, dtype=torch.float64, device=device)

    for t in range(L):
        full_lp, samp_lp = (x.view(P, G, V) for x in sampling_distribution(logits, temperature, top_k, top_p,
                                                                                       min_p, blocked))
        alive = ~ended & torch.isfinite(key)
        # Children of every slot: G_phi ~ Gumbel(phi + log p(token)); only the K best can matter.
        perturbed = phi.float().unsqueeze(-1) + samp_lp + gumbel((P, G, V), generator, device)
        vals, tok = perturbed.topk(K, dim=-1)
        z = vals[..., :1].double()  # the maximum over all V children
        child_key = truncated_gumbel(key.unsqueeze(-1), z, vals.double())
        child_key = torch.where(alive.unsqueeze(-1) & torch.isfinite(vals), child_key, NEG)
        carried = torch.where(ended & torch.isfinite(key), key, NEG)
        cand = torch.cat([carried, child_key.view(P, G * K)], dim=1)  # [P, G + G*K]

        top_vals, top_idx = cand.topk(min(G + 1, cand.shape[1]), dim=1)
        if top_vals.shape[1] > G:  # the best candidate left out: the largest pruned value so far
            kappa = torch.maximum(kappa, top_vals[:, G])
        key, sel = top_vals[:, :G], top_idx[:, :G]
        extend = (sel >= G) & torch.isfinite(key)
        child = (sel - G).clamp(min=0)
        parent = torch.where(sel >= G, child // K, sel)
        new_tok = torch.where(extend, tok.view(P, G * K).gather(1, child), pad_token_id)

        ids, lp, slp = gather_beams(ids, parent), gather_beams(lp, parent), gather_beams(slp, parent)
        phi, length, ended = phi.gather(1, parent), length.gather(1, parent), ended.gather(1, parent)
        token_full = gather_beams(full_lp, parent).gather(2, new_tok.unsqueeze(-1)).squeeze(-1)
        token_samp = gather_beams(samp_lp, parent).gather(2, new_tok.unsqueeze(-1)).squeeze(-1)
        ids[:, :, t] = torch.where(extend, new_tok, ids[:, :, t])
        lp[:, :, t] = torch.where(extend, token_full, lp[:, :, t])
        slp[:, :, t] = torch.where(extend, token_samp, slp[:, :, t])
        phi = torch.where(extend, phi + token_samp.double(), phi)
        length = torch.where(extend, t + 1, length)
        ended = torch.where(extend, is_eos_token[new_tok], ended)

        if t == L - 1 or bool((ended | ~torch.isfinite(key)).all()):
            break
        # Each slot continues from its parent's cache (rows are p * G + g); finished ones ride along.
        state.reorder((parent + rows.unsqueeze(1) * G).view(-1), t)
        logits = state.step(new_tok.view(-1), next_pos, t)
        next_pos = next_pos + 1

    if not bool(torch.isfinite(key).all()):
        raise ValueError(f"group_size={G} is more than the number of distinct completions of at most "
                         f"max_new_tokens={L} tokens with non-zero probability")
    T = int(length.max())
    mask = (torch.arange(T, device=device) < length.unsqueeze(-1)).long().view(P * G, T)
    return Generation(ids[:, :, :T].reshape(P * G, T).masked_fill(mask == 0, pad_token_id), mask,
                      lp[:, :, :T].reshape(P * G, T) * mask, (~ended).view(-1),
                      slp[:, :, :T].reshape(P * G, T) * mask,
                      inclusion_probs(phi.view(-1), kappa.repeat_interleave(G)))
