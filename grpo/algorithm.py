"""The GRPO maths: advantages, importance ratios, clipped surrogate, KL penalty, loss aggregation.

Small pure functions over tensors and masks, each variant chosen by name (the names are the config
values of DESIGN.md, "The maths"). Conventions:

- N = P * G sequences: P prompts, G = ``group_size`` completions each; rows p*G .. p*G+G-1 are
  prompt p's group. T completion positions.
- ``mask[i, t]`` is 1 on the generated tokens of o_i (up to and including EOS) and 0 on padding.
  Values at masked positions are never trusted (padding may hold garbage, even -inf): they are
  selected away with ``torch.where`` before any arithmetic, so they reach neither the loss nor the
  gradient. (Multiplying by the mask would not do: 0 * inf is NaN, forward and backward.)
- ``l_t = log pi(o_t | x, o_<t)`` per token, shape [N, T].

References:
- DeepSeekMath, Shao et al. 2024, arXiv:2402.03300: GRPO; eq. 3 the objective, eq. 4 the KL estimator.
- DAPO, Yu et al. 2025, arXiv:2503.14476: asymmetric "clip-higher" band, token-level loss.
- Dr. GRPO, Liu et al. 2025, arXiv:2503.20783: no std scaling, constant length normaliser.
- GSPO, Zheng et al. 2025, arXiv:2507.18071: sequence-level importance ratio.
- J. Schulman, "Approximating KL Divergence", 2020: the k1, k2, k3 estimators.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("sequence_mean", "token_mean", "constant_normalizer", "group_sum")
RATIO_LEVELS = ("token", "sequence")

# exp(20) ~ 5e8: far beyond any useful penalty, far below float32 overflow (~exp(88)).
KL_LOG_RATIO_CLAMP = 20.0


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """View rewards [N] as [P, G], checking that the layout makes sense."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, N = P * group_size entries; got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group is its own baseline); got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"number of rewards N={rewards.numel()} is not divisible by group_size={group_size}")
    return rewards.reshape(-1, group_size)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[P] bool, True where all G rewards of prompt p's group are equal.

    Such a group gives every completion A_i = 0, so it contributes no policy gradient (DAPO's
    "dynamic sampling" filters them out; here they are counted and reported).
    """
    r = _groups(rewards, group_size)
    return (r == r[:, :1]).all(dim=1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages A_i, one per completion: [N] -> [N].

    The group mean is the baseline, replacing PPO's value model (DeepSeekMath, section 4.1.2,
    outcome supervision: A_i = (r_i - mean(r)) / std(r), given to every token of o_i). ``scale``:

    - ``group``: (r_i - mu_g) / (sigma_g + eps), sigma over the G rewards of the group (DeepSeekMath).
    - ``batch``: (r_i - mu_g) / (sigma_batch + eps), sigma over all N rewards of the step; keeps
      the baseline per group but stops easy/hard groups (small sigma_g) from being up-weighted.
    - ``none``: r_i - mu_g (Dr. GRPO: dividing by sigma_g biases towards too easy/too hard prompts).

    sigma uses Bessel's correction (``torch.std`` default). A group whose rewards are all equal
    gets exactly 0, never NaN: its mean can differ from its members by a rounding error (the mean
    of three 0.1 is not 0.1), which a division by sigma + eps ~ 1e-4 would inflate to a signal.
    """
    _check_choice("scale", scale, ADVANTAGE_SCALES)
    r = _groups(rewards, group_size)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (r.std() + eps)
    constant = zero_variance_groups(rewards, group_size)
    return torch.where(constant[:, None], 0.0, advantages).reshape(-1)


# --------------------------------------------------------------------------------------------
# Importance ratio and clipped surrogate
# --------------------------------------------------------------------------------------------


def importance_ratio(logprobs: Tensor, anchor_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """Importance ratio rho_t of the current policy to the anchor policy pi_a: [N, T] -> [N, T].

    - ``token`` (DeepSeekMath eq. 3, PPO): rho_t = pi_theta(o_t) / pi_a(o_t) = exp(l_t - l^a_t).
    - ``sequence`` (GSPO): rho_t = s_i = exp(sum_t m_t (l_t - l^a_t) / sum_t m_t) for every t of
      o_i, the length-normalised (geometric-mean) sequence likelihood ratio, so that clipping acts
      on whole completions, matching the sequence-level reward. A row with no valid token gets
      s_i = 1 (denominator clamped to 1).

    The anchor is pi_old (PPO/GRPO) or pi_ref (the seed's literal variant); with one update per
    rollout pass ``logprobs.detach()``: the ratio is then 1 in value but carries the gradient.
    Masked positions get log-ratio 0 (ratio 1 for ``token``) whatever they hold.
    """
    _check_choice("level", level, RATIO_LEVELS)
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - anchor_logprobs, 0.0)
    if level == "sequence":
        length = valid.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(dim=-1, keepdim=True) / length).expand_as(log_ratio)
    return log_ratio.exp()


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate as a per-token loss (DeepSeekMath eq. 3, with DAPO's asymmetric band).

    L_t = -min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i)

    ``advantages`` [N] is broadcast over the T positions of each row (a [N, T] tensor is used as
    is). DAPO raises eps_high above eps_low ("clip-higher", 0.2/0.28) so that unlikely tokens with
    positive advantage can still gain probability, which keeps entropy from collapsing.

    Returns ``(loss_t, clipped_low, clipped_high)``; the two bool masks [N, T] mark where the
    clipped branch is the minimum and is constant, i.e. where the gradient is exactly zero:
    rho < 1 - eps_low with A < 0, and rho > 1 + eps_high with A > 0. (On the other side of the
    band the unclipped term is the smaller one, so the update is never blocked from undoing itself.)
    """
    a = advantages.unsqueeze(-1) if advantages.dim() == ratio.dim() - 1 else advantages
    unclipped = ratio * a
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a
    loss_t = -torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1.0 - eps_low) & (a < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (a > 0)
    return loss_t, clipped_low, clipped_high


# --------------------------------------------------------------------------------------------
# KL penalty to the frozen reference policy
# --------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta: [N, T].

    With d_t = l^ref_t - l_t = log(pi_ref / pi_theta) at the sampled token (Schulman 2020):

    - ``k1`` = -d: unbiased, high variance, can be negative per token.
    - ``k2`` = d^2 / 2: biased, low variance, >= 0.
    - ``k3`` = exp(d) - d - 1 (DeepSeekMath eq. 4): unbiased and >= 0, since E[exp(d)] = 1
      under pi_theta; its gradient vanishes at pi_theta = pi_ref.

    For ``k3`` d is clamped to [-20, 20] before exp, so a token the reference finds impossible
    (l^ref = -inf) gives a large finite penalty rather than inf/NaN; beyond the clamp the penalty's
    gradient is zero, a deliberate trade of exactness for stability (as in verl's ``low_var_kl``).
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    d = d.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


# --------------------------------------------------------------------------------------------
# Aggregation of per-token losses into the scalar that is differentiated
# --------------------------------------------------------------------------------------------


def aggregate(
    loss_t: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_sequences: int,
    num_tokens: int | float,
    group_size: int,
    max_completion_length: int,
) -> Tensor:
    """Reduce a per-token loss [N_micro, T] to a scalar, with the normaliser of the whole batch.

    N = ``num_sequences`` and ``num_tokens`` = sum of the mask are those of the whole optimizer
    batch, not of the rows passed in, so the values returned for the micro-batches of one
    optimizer step sum to the full-batch value: the gradient does not depend on how the batch is
    split for gradient accumulation. Every mode is linear in loss_t.

    - ``sequence_mean`` (DeepSeekMath eq. 3): (1/N) sum_i (sum_t m L / sum_t m). Each completion
      weighs the same, so tokens of long completions weigh less (Dr. GRPO's "length bias").
    - ``token_mean`` (DAPO): sum_i sum_t m L / num_tokens. Each token weighs the same.
    - ``constant_normalizer`` (Dr. GRPO): sum_i sum_t m L / (N * max_completion_length); a
      constant, so neither completion length nor batch token count rescales the gradient.
    - ``group_sum`` (the seed: sum over the group, mean over prompts): (1/P) sum_i (sum_t m L /
      sum_t m) with P = N / G, i.e. G * sequence_mean.

    A row with no valid token contributes 0 (its length is clamped to 1) but still counts in N.
    """
    _check_choice("mode", mode, AGGREGATIONS)
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1; got {num_sequences}")
    valid = mask.bool()
    row_sums = torch.where(valid, loss_t, 0.0).sum(dim=-1)
    if mode == "token_mean":
        return row_sums.sum() / max(num_tokens, 1)
    if mode == "constant_normalizer":
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1; got {max_completion_length}")
        return row_sums.sum() / (num_sequences * max_completion_length)
    row_means = row_sums / valid.sum(dim=-1).clamp(min=1)
    if mode == "sequence_mean":
        return row_means.sum() / num_sequences
    if group_size < 1 or num_sequences % group_size:
        raise ValueError(f"num_sequences={num_sequences} is not divisible by group_size={group_size}")
    return row_means.sum() / (num_sequences // group_size)


# --------------------------------------------------------------------------------------------
# The full objective
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ratio_level: str = "token",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "sequence_mean",
    num_sequences: int,
    num_tokens: int | float,
    group_size: int,
    max_completion_length: int,
    anchor_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss of one (micro-)batch: the negated DeepSeekMath eq. 3 objective and its variants.

    loss = aggregate(L_t + beta * KL_t), L_t the clipped surrogate of the ratio to the anchor
    and KL_t the ``kl_estimator`` estimate of KL(pi_theta || pi_ref), all [N_micro, T].

    The ratio anchor is ``anchor_logprobs`` when given (the seed's literal ``ratio_anchor:
    reference`` variant, anchor pi_ref), else ``old_logprobs`` (pi_old, the papers), else, with
    one update per rollout where pi_old = pi_theta, ``logprobs.detach()``, saving a forward pass.
    ``ref_logprobs`` may be None when beta == 0 (no reference model loaded).

    Returns ``(loss, stats)``. The stats are detached scalars, each a SUM over this micro-batch's
    valid tokens, so the caller adds them over micro-batches and divides once: ``kl_sum``,
    ``clip_low_sum``, ``clip_high_sum``, ``ratio_sum``, ``token_count``; plus ``policy_loss`` and
    ``kl_loss``, the surrogate and the (beta-less) KL terms aggregated with the same normaliser,
    which also sum over micro-batches.
    """
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (log-probs of the frozen reference model)")
    normalisers = dict(
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        group_size=group_size,
        max_completion_length=max_completion_length,
    )
    valid = mask.bool()
    if anchor_logprobs is None:
        anchor_logprobs = old_logprobs if old_logprobs is not None else logprobs
    # The anchor is a constant of the objective: only pi_theta is optimised.
    ratio = importance_ratio(logprobs, anchor_logprobs.detach(), valid, ratio_level)
    surrogate_t, clipped_low, clipped_high = clipped_surrogate(ratio, advantages.detach(), eps_low, eps_high)
    pg_loss = aggregate(surrogate_t, valid, aggregation, **normalisers)

    if ref_logprobs is None:
        kl_t = torch.zeros_like(ratio)
    else:
        # Select padding away first, so garbage there cannot become NaN in the KL's backward pass.
        l_valid = torch.where(valid, logprobs, 0.0)
        kl_t = kl_penalty(l_valid, torch.where(valid, ref_logprobs, 0.0), kl_estimator)
    kl_loss = aggregate(kl_t, valid, aggregation, **normalisers)
    # Skip the KL term at beta = 0 rather than multiply it by 0: 0 * inf would be NaN.
    loss = pg_loss + beta * kl_loss if beta != 0 else pg_loss

    def masked_sum(x: Tensor) -> Tensor:
        return torch.where(valid, x, 0).sum().detach().to(ratio.dtype)

    stats = {
        "kl_sum": masked_sum(kl_t),
        "clip_low_sum": masked_sum(clipped_low),
        "clip_high_sum": masked_sum(clipped_high),
        "ratio_sum": masked_sum(ratio),
        "token_count": valid.sum().to(ratio.dtype),
        "policy_loss": pg_loss.detach(),
        "kl_loss": kl_loss.detach(),
    }
    return loss, stats
