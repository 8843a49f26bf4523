"""Per-token weights on the policy-gradient term: off-policy correction and high-entropy selection.

Both multiply the surrogate L_t of `policy_losses` inside `objective.policy_loss` (never the KL
term, and never the normalisers: a token weighted 0 still counts in `num_tokens`).

- `truncated_is_weights`: truncated importance sampling (TIS) between the distribution the
  completions were actually sampled from and the trainer's pi_old, for rollouts that are stale,
  come from another engine, or were sampled in lower precision or under top-k / top-p.
- `high_entropy_mask`: only the top-rho fraction of tokens by entropy get the policy gradient
  (Wang et al. 2025, "Beyond the 80/20 rule", arXiv:2506.01939).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import check_choice

OFF_POLICY_CORRECTIONS = ("none", "token", "sequence")


def truncated_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, level: str = "token",
                         cap: float = 2.0) -> Tensor:
    """Truncated importance weights w = min(pi_old / pi_sampler, C): [N, T], detached, 1 at masked positions.

    The PPO ratio is taken against pi_old, the trainer's own log-probs; the completions were drawn
    from pi_sampler, which differs from it when the rollout engine computes differently (bf16,
    another kernel, vLLM), when it is stale (asynchronous rollouts), or when top-k / top-p
    truncated the distribution that was sampled. E_sampler[w L] with w = pi_old / pi_sampler
    is the on-policy objective again; truncating the weight at C bounds its variance at the price
    of a small bias (Ionides 2008; Yao et al. 2025's TIS, verl's rollout correction, TRL's
    `vllm_importance_sampling_correction` with `vllm_importance_sampling_cap`, called
    `vllm_importance_sampling_clip_max` since TRL 1.x, default 3; verl's threshold defaults to 2):

    - ``token``: w_t = min(exp(l^old_t - l^samp_t), C), one weight per token (TRL's
      `token_truncate`, verl's `rollout_is: token`).
    - ``sequence``: w_i = min(exp(sum_t m_t (l^old_t - l^samp_t)), C) on every token of o_i: the
      ratio of the whole sequence's probabilities, a product of token ratios (TRL's
      `sequence_truncate`, verl's `rollout_is: sequence`).

    When sampler and trainer agree (the same log-probs), every weight is exactly 1. Garbage at
    masked positions never reaches the result.
    """
    check_choice("level", level, ("token", "sequence"))
    if not cap > 0:
        raise ValueError(f"cap must be > 0; got {cap}")
    valid = mask.bool()
    log_ratio = torch.where(valid, old_logprobs - sampler_logprobs, 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
    # exp may overflow to inf for a token the sampler found very unlikely; the cap takes it back to C.
    weights = log_ratio.exp().clamp(max=cap)
    return torch.where(valid, weights, 1.0).detach()


def sampler_mismatch(old_logprobs: Tensor, sampler_logprobs: Tensor, is_weights: Tensor, mask: Tensor,
                     cap: float) -> tuple[float, float]:
    """(sum of l^samp_t - l^old_t, number of tokens whose weight the cap C truncated), over the
    valid tokens: how far the sampling engine is from the trainer, per step, as TRL's
    sampling/importance_sampling_ratio and verl's rollout-correction metrics watch it."""
    valid = mask.bool()
    diff = torch.where(valid, sampler_logprobs - old_logprobs, 0.0).sum()
    capped = (valid & (is_weights >= cap)).sum()
    return float(diff), float(capped)


def entropy_threshold(population: Tensor, rho: float) -> Tensor:
    """tau = the (1 - rho)-quantile of the entropies in `population` (1-D: the valid tokens of the
    whole optimizer batch over every process), linearly interpolated (torch.quantile's default,
    TRL's choice). rho = 1 gives the minimum: every token is selected."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1]; got {rho}")
    if population.numel() == 0:
        return population.new_full((), float("inf"))
    return torch.quantile(population.float(), 1.0 - rho)


def high_entropy_mask(entropy: Tensor, mask: Tensor, rho: float, threshold: Tensor | None = None) -> Tensor:
    """Bool [N, T]: the valid tokens whose entropy is at least `threshold` (`entropy_threshold`).

    Wang et al. 2025 (arXiv:2506.01939): DAPO's objective with the indicator 1[H_t >= tau_rho]
    inside the token sum, J = (1 / sum_i |o_i|) sum_i sum_t 1[H_t >= tau_rho] * surrogate_t,
    tau_rho the entropy above which a fraction rho of the batch's tokens lie (rho = 0.2 in the
    paper), H_t the entropy of the current policy's next-token distribution: the policy gradient
    only on the "forking" tokens, the normaliser still over every token. TRL's
    `top_entropy_quantile` is rho (its threshold is the 1 - rho quantile of the non-padding
    tokens, gathered over processes, H >= tau kept).

    `threshold` defaults to the one of the valid entries of `entropy` itself. The trainer passes
    the threshold of the whole optimizer batch's entropies, gathered over processes, so that the
    selection (like the normalisers) does not depend on micro_batch_size or on the number of
    processes; TRL computes it per micro-batch.
    """
    valid = mask.bool()
    if rho >= 1:
        return valid
    tau = entropy_threshold(entropy.detach()[valid], rho) if threshold is None else threshold
    return valid & (torch.where(valid, entropy.detach().float(), float("-inf")) >= tau)
