"""The GRPO objective of one (micro-)batch: aggregate(L_t + beta * KL_t) over the batch's tokens.

DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) eq. 3 and its variants; the surrogate L_t comes
from the registered policy loss (`policy_losses.py`), the KL term from `kl.py`. Conventions:

- N = P * G sequences: P prompts, G = ``group_size`` completions each; rows p*G .. p*G+G-1 are
  prompt p's group. T completion positions.
- ``mask[i, t]`` is 1 on the generated tokens of o_i (up to and including EOS) and 0 on padding.
  Values at masked positions are never trusted (padding may hold garbage, even -inf): they are
  selected away with ``torch.where`` before any arithmetic, so they reach neither the loss nor the
  gradient. (Multiplying by the mask would not do: 0 * inf is NaN, forward and backward.)
- ``l_t = log pi(o_t | x, o_<t)`` per token, shape [N, T].

Aggregation and the ratio anchor are small fixed choices: plain branches, not registries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import KL_ESTIMATORS, kl_penalty
from .policy_losses import POLICY_LOSSES, RATIO_LEVELS
from .registry import check_choice

AGGREGATIONS = ("sequence_mean", "token_mean", "constant_normalizer", "group_sum")
RATIO_ANCHORS = ("old", "reference")


def loss_mask(completion_mask: Tensor, truncated: Tensor, mask_truncated: bool) -> Tensor:
    """The float mask of the tokens that enter the loss: [N, T].

    With ``mask_truncated`` a completion cut at max_completion_length (no EOS) is left out
    entirely: DAPO's overlong filtering (section 3.4), since a cut-off completion says nothing
    reliable about its answer. It still counts in N for the aggregation's normaliser.
    """
    mask = completion_mask.float()
    if mask_truncated:
        mask = mask * (~truncated).float().unsqueeze(1)
    return mask


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
    check_choice("mode", mode, AGGREGATIONS)
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
    loss_mode: str = "ppo_clip",
    ratio_level: str = "token",
    ratio_anchor: str = "old",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "sequence_mean",
    delta: float | None = None,
    num_sequences: int,
    num_tokens: int | float,
    group_size: int,
    max_completion_length: int,
    pg_mask: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss of one (micro-)batch: the negated DeepSeekMath eq. 3 objective and its variants.

    loss = aggregate(L_t + beta * KL_t), L_t the surrogate of the registered policy loss
    ``loss_mode`` (config key `policy_loss`; ``ppo_clip`` is DeepSeekMath's) on the ratio to the
    anchor, and KL_t the ``kl_estimator`` estimate of KL(pi_theta || pi_ref), all [N_micro, T].
    (The defaults are DeepSeekMath's; a run passes every value from its config.) ``delta``, when
    given, is passed to the surrogate (ppo_clip's two-sided clipping).

    The ratio anchor (``ratio_anchor``): ``old`` is pi_old (the papers): ``old_logprobs``, or,
    when they are None, ``logprobs.detach()``. That is the special case of one update per
    rollout, where pi_old equals the current policy and a second forward pass would give the same
    numbers. ``reference`` is pi_ref (the seed notes' "Loss" section, written with pi_ref).
    ``ref_logprobs`` may be None when beta == 0 and the anchor is ``old``.

    Two optional per-token factors act on the surrogate only (`token_weights`), never on the KL
    term or the normalisers: ``is_weights`` [N_micro, T], truncated importance weights
    pi_old / pi_sampler (off-policy correction; constants), and ``pg_mask`` [N_micro, T] bool, the
    tokens that get a policy gradient at all (high-entropy selection): L_t -> 1[pg_mask] * w_t * L_t.

    Returns ``(loss, stats)``. The stats are detached scalars, each a SUM over this micro-batch's
    valid tokens, so the caller adds them over micro-batches and divides once: ``kl_sum``,
    ``clip_low_sum``, ``clip_high_sum``, ``ratio_sum``, ``token_count``, and with the factors above
    ``pg_token_count`` (tokens with a policy gradient) and ``is_weight_sum``; plus ``policy_loss``
    and ``kl_loss``, the surrogate and the (beta-less) KL terms aggregated with the same
    normaliser, which also sum over micro-batches.
    """
    surrogate = POLICY_LOSSES.get(loss_mode)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    check_choice("ratio_anchor", ratio_anchor, RATIO_ANCHORS)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (log-probs of the frozen reference model)")
    if ratio_anchor == "reference" and ref_logprobs is None:
        raise ValueError("ratio_anchor='reference' needs ref_logprobs")
    normalisers = dict(
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        group_size=group_size,
        max_completion_length=max_completion_length,
    )
    valid = mask.bool()
    if ratio_anchor == "reference":
        anchor = ref_logprobs
    else:
        anchor = old_logprobs if old_logprobs is not None else logprobs
    # The anchor is a constant of the objective: only pi_theta is optimised.
    surrogate_t, ratio, clipped_low, clipped_high = surrogate(
        logprobs, anchor.detach(), advantages.detach(), valid,
        ratio_level=ratio_level, eps_low=eps_low, eps_high=eps_high, **({} if delta is None else {"delta": delta}))
    if is_weights is not None:
        surrogate_t = surrogate_t * torch.where(valid, is_weights.detach(), 1.0)
    pg_valid = valid if pg_mask is None else valid & pg_mask.bool()
    if pg_mask is not None:
        surrogate_t = torch.where(pg_valid, surrogate_t, 0.0)
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
    if pg_mask is not None:
        stats["pg_token_count"] = pg_valid.sum().to(ratio.dtype)
    if is_weights is not None:
        stats["is_weight_sum"] = masked_sum(is_weights)
    return loss, stats
