"""Ranks within a group: the `rank` advantage estimator and the ranking <-> score conversions.

Centred-rank fitness shaping (Salimans et al. 2017, arXiv:1703.03864, section 2.2; Wierstra et
al. 2014, "Natural Evolution Strategies", section 3.3): an estimator that sees only the ORDER of
the rewards within a group, never their values, so that any strictly increasing transform of the
rewards (a reward model whose scale drifts, a judge's arbitrary points) gives the same advantages.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .advantages import _groups, register_adv_est, zero_variance_groups


def mean_ranks(rewards: Tensor) -> Tensor:
    """[P, G] -> [P, G] ranks within each row, 0 = lowest reward, ties sharing their mean rank.

    rank_i = #{j : r_j < r_i} + (#{j : r_j == r_i} - 1) / 2, the mid-rank of statistics (two
    rewards tied for places 1 and 2 both get 1.5). O(G^2) comparisons, nothing sorted, so that
    tied values never depend on a sort's order.
    """
    below = (rewards[:, None, :] < rewards[:, :, None]).sum(-1)
    equal = (rewards[:, None, :] == rewards[:, :, None]).sum(-1)
    return below.to(torch.get_default_dtype()) + (equal - 1).to(torch.get_default_dtype()) / 2


@register_adv_est("rank")
def centred_ranks(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """A_i = (rank_i - mean_g(rank)) / (std_g(rank) + eps), ranks within the group, ties at their
    mean rank (Salimans et al. 2017, arXiv:1703.03864, centred ranks).

    Salimans et al. map ranks to [-0.5, 0.5]; here the centred ranks are divided by their own
    standard deviation (Bessel's correction, as `group`), so that the step size matches the group
    estimator's, and a group with only two distinct reward values (a verifier's 0 / 1) gets the
    group estimator's advantages (exactly at eps = 0): its ranks are an affine function of its
    rewards.
    Invariant to every strictly increasing transform of the rewards; a tied group gets exactly 0.
    """
    r = _groups(rewards, group_size)
    ranks = mean_ranks(r)
    centred = ranks - ranks.mean(dim=1, keepdim=True)
    advantages = centred / (ranks.std(dim=1, keepdim=True) + eps)
    constant = zero_variance_groups(rewards, group_size)
    return torch.where(constant[:, None], 0.0, advantages).reshape(-1)


def tiers_to_scores(tiers: list[list[int]], size: int) -> list[float]:
    """A ranking with ties -> one score per item in [0, 1]: 1 for the best, 0 for the worst.

    `tiers` lists the items' indices best first, one list per tie group ([[2], [0, 3], [1]]:
    item 2 first, 0 and 3 tied second, 1 last). score_i = 1 - position_i / (size - 1), with
    position_i the mean of the places its tie group takes (0-based), so ties share a score and
    the scores are the ranking's mean ranks, scaled. One item alone scores 0.5 (no comparison).
    """
    scores, place = [0.0] * size, 0
    for tier in tiers:
        position = place + (len(tier) - 1) / 2
        for i in tier:
            scores[i] = 0.5 if size == 1 else 1.0 - position / (size - 1)
        place += len(tier)
    return scores
