"""Policy losses: the per-token surrogate L_t that the objective aggregates, registered by name.

Each is a pure function (config key `policy_loss`)

    fn(logprobs [N, T], anchor_logprobs [N, T], advantages [N], mask [N, T] bool, *,
       ratio_level, eps_low, eps_high) -> Surrogate

with ``anchor_logprobs`` already detached (pi_old, or pi_ref for the seed's literal variant) and
``mask`` True on scored tokens. Values at masked positions may be garbage; a loss must not let
them reach its output there as NaN (`torch.where`, never a multiplication by the mask).

Adding a loss is one function here plus its test (docs/design.md, "Adding a policy loss").
Registered: ppo_clip (PPO / DeepSeekMath), cispo (MiniMax-M1), gmpo (geometric mean, GMPO).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .registry import Registry, check_choice

POLICY_LOSSES = Registry("policy_loss")
register_policy_loss = POLICY_LOSSES.register

RATIO_LEVELS = ("token", "sequence")


class Surrogate(NamedTuple):
    loss_t: Tensor        # [N, T] per-token loss (to be aggregated)
    ratio: Tensor         # [N, T] importance ratio pi_theta / pi_anchor (1 at masked positions)
    clipped_low: Tensor   # [N, T] bool: the clip is active below the band
    clipped_high: Tensor  # [N, T] bool: the clip is active above the band


def importance_ratio(logprobs: Tensor, anchor_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """Importance ratio rho_t of the current policy to the anchor policy pi_a: [N, T] -> [N, T].

    - ``token`` (DeepSeekMath eq. 3, PPO): rho_t = pi_theta(o_t) / pi_a(o_t) = exp(l_t - l^a_t).
    - ``sequence`` (GSPO, Zheng et al. 2025, arXiv:2507.18071): rho_t = s_i =
      exp(sum_t m_t (l_t - l^a_t) / sum_t m_t) for every t of o_i, the length-normalised
      (geometric-mean) sequence likelihood ratio, so that clipping acts on whole completions,
      matching the sequence-level reward. A row with no valid token gets s_i = 1.

    With one update per rollout the anchor is ``logprobs.detach()``: the ratio is then 1 in value
    but carries the gradient. Masked positions get log-ratio 0 (ratio 1 for ``token``).
    """
    check_choice("level", level, RATIO_LEVELS)
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - anchor_logprobs, 0.0)
    if level == "sequence":
        length = valid.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(dim=-1, keepdim=True) / length).expand_as(log_ratio)
    return log_ratio.exp()


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, delta: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate as a per-token loss (DeepSeekMath eq. 3, with DAPO's asymmetric band).

    L_t = -min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i)

    ``advantages`` [N] is broadcast over the T positions of each row (a [N, T] tensor is used as
    is). DAPO (Yu et al. 2025, arXiv:2503.14476) raises eps_high above eps_low ("clip-higher",
    0.2/0.28) so that unlikely tokens with positive advantage can still gain probability, which
    keeps entropy from collapsing.

    Returns ``(loss_t, clipped_low, clipped_high)``; the two bool masks [N, T] mark where the
    clipped branch is the minimum and is constant, i.e. where the gradient is exactly zero:
    rho < 1 - eps_low with A < 0, and rho > 1 + eps_high with A > 0. (On the other side of the
    band the unclipped term is the smaller one, so the update is never blocked from undoing itself.)

    ``delta`` (two-sided clipping, INTELLECT-2, arXiv:2505.07291; TRL's `delta`): the unclipped
    term uses min(rho_t, delta), so with A < 0 a huge ratio no longer makes a huge loss: the
    gradient is zero there too (counted in ``clipped_high``). None: one-sided, as PPO.
    """
    a = advantages.unsqueeze(-1) if advantages.dim() == ratio.dim() - 1 else advantages
    unclipped = (ratio if delta is None else ratio.clamp(max=delta)) * a
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a
    loss_t = -torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1.0 - eps_low) & (a < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (a > 0)
    if delta is not None:
        clipped_high = clipped_high | ((ratio > delta) & (a < 0))
    return loss_t, clipped_low, clipped_high


@register_policy_loss("ppo_clip")
def ppo_clip(logprobs: Tensor, anchor_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
             ratio_level: str, eps_low: float, eps_high: float, delta: float | None = None) -> Surrogate:
    """PPO's clipped surrogate (Schulman et al. 2017), as GRPO uses it (DeepSeekMath eq. 3);
    `delta` caps the unclipped ratio too (two-sided clipping, `clipped_surrogate`)."""
    ratio = importance_ratio(logprobs, anchor_logprobs, mask, ratio_level)
    loss_t, low, high = clipped_surrogate(ratio, advantages, eps_low, eps_high, delta)
    return Surrogate(loss_t, ratio, low, high)


@register_policy_loss("cispo")
def cispo(logprobs: Tensor, anchor_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
          ratio_level: str, eps_low: float, eps_high: float) -> Surrogate:
    """CISPO (MiniMax-M1, Chen et al. 2025, arXiv:2506.13585, eq. 4-5): clip the importance
    weight, not the update.

    L_t = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A_i * l_t

    The clipped ratio is a constant weight on the REINFORCE term, so every token keeps a gradient
    (-w_t * A_i): PPO's clip zeroes the gradient of tokens whose ratio left the band, which after
    the first update are often the rare, high-entropy "fork" tokens. The paper sets no lower
    bound (eps_low = 1 here: clip at 0, which a ratio never goes below) and tunes eps_high.
    At one update per rollout rho = 1 and the gradient equals PPO's; the loss value is -A_i l_t.
    `clipped_low` / `clipped_high` mark where the weight is capped (the gradient is not zero there).
    """
    ratio = importance_ratio(logprobs, anchor_logprobs, mask, ratio_level)
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high).detach()
    a = advantages.unsqueeze(-1) if advantages.dim() == ratio.dim() - 1 else advantages
    l_t = torch.where(mask, logprobs, 0.0)  # masked garbage (even -inf) never enters the product
    loss_t = -weight * a * l_t
    return Surrogate(loss_t, ratio, ratio < 1.0 - eps_low, ratio > 1.0 + eps_high)


@register_policy_loss("gmpo")
def gmpo(logprobs: Tensor, anchor_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
         ratio_level: str, eps_low: float, eps_high: float) -> Surrogate:
    """GMPO (Zhao et al. 2025, arXiv:2507.20673): maximise the GEOMETRIC mean of the
    token-level clipped terms instead of their arithmetic mean,

        J_i = sgn(A_i) * prod_t |min(rho_t A_i, clip(rho_t, e^-eps_low, e^eps_high) A_i)|^(1/|o_i|)
            = A_i * exp( (1/|o_i|) sum_t c_t ),
        c_t = sgn(A_i) * min(sgn(A_i) d_t, sgn(A_i) clip(d_t, -eps_low, eps_high)),  d_t = l_t - l^old_t.

    The clip acts on each token's LOG-ratio, before the mean (so ``epsilon_low`` / ``epsilon_high``
    are log-space bounds here: the paper's (e^-0.4, e^0.4) is 0.4 / 0.4), and only on the side
    PPO's pessimism picks: for A > 0 a log-ratio above eps_high is capped (its gradient stops),
    for A < 0 one below -eps_low is floored; on the other side it is left alone, so an update
    can always undo itself. A single extreme token moves the geometric mean by d_t / |o_i| only,
    which is why the band can be wider than PPO's.

    L_t = -A_i * s_i on every valid token of o_i, s_i = exp(mean_t c_t) the clipped geometric-mean
    ratio; with ``sequence_mean`` aggregation that is the paper's (1/G) sum_i over the group. Its
    gradient is -A_i s_i / |o_i| on each unclipped token (0 on clipped ones), and at one update
    per rollout (s_i = 1) -A_i / |o_i|: sequence_mean PPO's. The advantage must be one per
    sequence, and the ratio is already a per-sequence one: ``ratio_level`` must be ``token``
    (the level at which the clip acts). `ratio` is the token ratio exp(d_t), for the statistics.
    """
    if ratio_level != "token":
        raise ValueError("gmpo clips token log-ratios before their geometric mean; ratio_level must be "
                         f"'token', got {ratio_level!r}")
    if advantages.dim() != 1:
        raise ValueError(f"gmpo needs one advantage per sequence ([N]); got shape {tuple(advantages.shape)}")
    valid = mask.bool()
    d = torch.where(valid, logprobs - anchor_logprobs, 0.0)
    a = advantages.unsqueeze(-1)
    sign = torch.sign(a)
    c = sign * torch.minimum(sign * d, sign * d.clamp(-eps_low, eps_high))
    length = valid.sum(dim=-1, keepdim=True).clamp(min=1)
    s = (torch.where(valid, c, 0.0).sum(dim=-1, keepdim=True) / length).exp()
    loss_t = torch.where(valid, -a * s, 0.0)
    clipped_low = valid & (d < -eps_low) & (a < 0)
    clipped_high = valid & (d > eps_high) & (a > 0)
    return Surrogate(loss_t, d.exp(), clipped_low, clipped_high)
