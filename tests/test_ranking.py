"""Ranking feedback: the `rank` estimator and the Plackett-Luce loss, against hand-worked values
and naive loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from grpo.algorithm import (ADVANTAGE_ESTIMATORS, bradley_terry_loss, compute_advantages, mean_ranks,
                            plackett_luce_loss, tiers_to_scores)


def naive_rank(rewards, G, eps=1e-4):
    """Centred mid-ranks over their standard deviation, one group at a time, plain floats."""
    out = []
    for p in range(len(rewards) // G):
        g = [float(x) for x in rewards[p * G:(p + 1) * G]]
        ranks = [sum(y < x for y in g) + (sum(y == x for y in g) - 1) / 2 for x in g]
        m = sum(ranks) / G
        sd = math.sqrt(sum((x - m) ** 2 for x in ranks) / (G - 1))
        out += [0.0 if all(x == g[0] for x in g) else (x - m) / (sd + eps) for x in ranks]
    return out


def test_rank_is_registered():
    assert "rank" in ADVANTAGE_ESTIMATORS.names()


def test_mid_ranks_by_hand():
    # (3, 1, 3, 0): 0 is lowest (rank 0), 1 next (1), the two 3s share places 2 and 3 -> 2.5.
    assert mean_ranks(torch.tensor([[3.0, 1.0, 3.0, 0.0]])).tolist() == [[2.5, 1.0, 2.5, 0.0]]


def test_rank_advantages_by_hand():
    # Ranks (2.5, 1, 2.5, 0), mean 1.5 -> centred (1, -0.5, 1, -1.5); sum of squares 4.5,
    # std = sqrt(4.5 / 3) = sqrt(1.5).
    a = compute_advantages("rank", torch.tensor([3.0, 1.0, 3.0, 0.0]), 4, eps=0.0)
    s = math.sqrt(1.5)
    assert a.tolist() == pytest.approx([1 / s, -0.5 / s, 1 / s, -1.5 / s])


def test_rank_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    for G in (2, 3, 5, 8):
        r = torch.randint(0, 4, (6 * G,), generator=g).float()  # small integers: many ties
        assert compute_advantages("rank", r, G, eps=1e-4).tolist() == pytest.approx(naive_rank(r.tolist(), G), abs=1e-6)


def test_rank_is_blind_to_increasing_transforms():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(-3, 4, (40,), generator=g).float()
    base = compute_advantages("rank", r, 8, eps=1e-4)
    for f in (lambda x: x * 1000 + 7, torch.exp, lambda x: x ** 3, torch.sigmoid, lambda x: torch.atan(x) - 5):
        assert torch.equal(compute_advantages("rank", f(r), 8, eps=1e-4), base)
    # Not so for the group estimator, which reads the values.
    assert not torch.allclose(compute_advantages("group", torch.exp(r), 8, eps=1e-4),
                              compute_advantages("group", r, 8, eps=1e-4))


def test_rank_equals_group_on_two_valued_rewards():
    # A verifier's 0 / 1: ranks are an affine function of the rewards, so both estimators agree
    # (eps aside, which each adds to a spread of its own scale).
    r = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    assert torch.allclose(compute_advantages("rank", r, 4, eps=0.0), compute_advantages("group", r, 4, eps=0.0))


def test_tied_group_gets_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 3.0, 2.0, 1.0])
    a = compute_advantages("rank", r, 3, eps=1e-4)
    assert a[:3].tolist() == [0.0, 0.0, 0.0] and a[3:].tolist() == pytest.approx([0.9999, 0.0, -0.9999], abs=1e-4)


def test_tiers_to_scores_by_hand():
    # [[2], [0, 3], [1]]: 2 first (place 0), 0 and 3 share places 1, 2 (1.5), 1 last (place 3).
    assert tiers_to_scores([[2], [0, 3], [1]], 4) == pytest.approx([0.5, 0.0, 1.0, 0.5])
    assert tiers_to_scores([[0]], 1) == [0.5]


# ----------------------------------------------------------------------------------------------
# Plackett-Luce


def naive_pl(scores, tiers):
    """-log P of one ranking, choice by choice over its tie groups (Breslow's ties)."""
    groups = sorted(set(tiers))
    total = 0.0
    for g in groups[:-1]:
        rest = [s for s, t in zip(scores, tiers) if t >= g]
        for s, t in zip(scores, tiers):
            if t == g:
                total -= s - math.log(sum(math.exp(x) for x in rest))
    return total


def test_pl_by_hand():
    # Scores (2, 1, 0) ranked in that order: -[2 - log(e^2 + e + 1)] - [1 - log(e + 1)].
    s = torch.tensor([[2.0, 1.0, 0.0]])
    expected = -(2 - math.log(math.e ** 2 + math.e + 1)) - (1 - math.log(math.e + 1))
    assert plackett_luce_loss(s, torch.tensor([[0, 1, 2]])).item() == pytest.approx(expected, rel=1e-6)


def test_pl_at_two_is_bradley_terry():
    g = torch.Generator().manual_seed(2)
    chosen, rejected = torch.randn(16, generator=g), torch.randn(16, generator=g)
    pl = plackett_luce_loss(torch.stack([chosen, rejected], dim=1), torch.tensor([[0, 1]] * 16))
    assert pl.item() == pytest.approx(bradley_terry_loss(chosen, rejected).item(), abs=1e-6)


def test_pl_matches_a_naive_loop_with_ties_and_padding():
    g = torch.Generator().manual_seed(3)
    lists = [([0.3, -1.0, 2.0, 0.5], [0, 1, 1, 2]), ([1.0, 0.0], [0, 1]), ([0.2, 0.1, -0.4], [0, 0, 1]),
             ([0.7, 0.7, 0.1], [0, 0, 0])]
    K = 4
    scores = torch.zeros(len(lists), K)
    tiers = torch.zeros(len(lists), K, dtype=torch.long)
    mask = torch.zeros(len(lists), K, dtype=torch.bool)
    for b, (s, t) in enumerate(lists):
        scores[b, :len(s)], tiers[b, :len(t)], mask[b, :len(s)] = torch.tensor(s), torch.tensor(t), True
    scores[~mask] = torch.randn(int((~mask).sum()), generator=g) * 100  # padding must not matter
    expected = sum(naive_pl(s, t) for s, t in lists) / len(lists)
    assert plackett_luce_loss(scores, tiers, mask).item() == pytest.approx(expected, rel=1e-6)


def test_pl_gradient_matches_a_naive_loop():
    # dL/ds_j = sum over choices whose set holds j of softmax_j(set) - [j was chosen there].
    s = [0.3, -1.0, 2.0, 0.5, 1.1]
    tiers = [1, 0, 2, 1, 3]
    x = torch.tensor([s], dtype=torch.float64, requires_grad=True)
    plackett_luce_loss(x, torch.tensor([tiers])).backward()
    grad = [0.0] * len(s)
    for g in sorted(set(tiers))[:-1]:
        rest = [j for j in range(len(s)) if tiers[j] >= g]
        z = sum(math.exp(s[j]) for j in rest)
        for i in (i for i in range(len(s)) if tiers[i] == g):
            for j in rest:
                grad[j] += math.exp(s[j]) / z
            grad[i] -= 1.0
    assert x.grad[0].tolist() == pytest.approx(grad, rel=1e-6)


def test_pl_of_a_full_order_is_a_distribution():
    # Without ties the probabilities of all K! orders sum to 1.
    s = torch.tensor([[0.4, -0.3, 1.2, 0.0]])
    total = sum(math.exp(-plackett_luce_loss(s[:, list(p)], torch.tensor([[0, 1, 2, 3]])).item())
                for p in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, rel=1e-6)
