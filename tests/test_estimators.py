"""The advantage estimators beyond group / batch / none: RLOO, REINFORCE++ (and with baseline),
and the priority-weighted estimator of stochastic-beam groups. Hand-worked values and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm import ADVANTAGE_ESTIMATORS, compute_advantages
from test_algorithm import SHAPES, close, random_batch, t


def naive(name, rewards, G, eps, batch_rewards=None, weights=None):
    """Each estimator as a loop over plain floats, written from its paper's formula."""
    r = [float(x) for x in rewards]
    b = r if batch_rewards is None else [float(x) for x in batch_rewards]

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    def centred(xs):
        out = []
        for p in range(len(xs) // G):
            g = xs[p * G:(p + 1) * G]
            out += [x - sum(g) / G for x in g]
        return out

    out = []
    for p in range(len(r) // G):
        g = r[p * G:(p + 1) * G]
        tied = all(x == g[0] for x in g)
        for i, x in enumerate(g):
            if name == "rloo":
                out.append(0.0 if tied else x - sum(g[j] for j in range(G) if j != i) / (G - 1))
            elif name == "reinforce_pp":
                out.append(0.0 if all(y == b[0] for y in b) else (x - sum(b) / len(b)) / (std(b) + eps))
            elif name == "reinforce_pp_baseline":
                c = centred(b)
                out.append(0.0 if tied else (x - sum(g) / G - sum(c) / len(c)) / (std(c) + eps))
            elif name == "priority":
                w = [float(v) for v in weights[p * G:(p + 1) * G]]
                w = [v / sum(w) for v in w]
                base = sum(wj * rj for wj, rj in zip(w, g))
                s = math.sqrt(G / (G - 1) * sum(wj * (rj - base) ** 2 for wj, rj in zip(w, g)))
                out.append(0.0 if tied else G * w[i] * (x - base) / (s + eps))
    return out


NEW = ("rloo", "reinforce_pp", "reinforce_pp_baseline", "priority")


def test_registered_beside_the_old_ones():
    assert set(NEW) | {"group", "batch", "none"} <= set(ADVANTAGE_ESTIMATORS.names())


def test_rloo_by_hand():
    # Group (1, 0, 0, 1): the baseline of a 1 is (0 + 0 + 1) / 3, of a 0 it is 2/3 -> +-2/3.
    # Group (3, 0, 0), G = 3: 3 - 0 = 3 and 0 - 1.5 = -1.5 (= G/(G-1) (r - mu) = 1.5 * (2, -1, -1)).
    a = compute_advantages("rloo", t([1.0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5]), 4, eps=1e-4)
    assert close(a, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], 1e-6)
    assert close(compute_advantages("rloo", t([3.0, 0, 0]), 3, eps=1e-4), [3.0, -1.5, -1.5])


def test_reinforce_pp_by_hand():
    # The batch (1,0,0,1, 1,1,1,1): mean 3/4, sum of squares 6/16 + 2 * 9/16 = 3/2, std = sqrt(3/14).
    # This process holds only the first group; the statistics are the whole batch's.
    batch = t([1.0, 0, 0, 1, 1, 1, 1, 1])
    a = compute_advantages("reinforce_pp", batch[:4], 4, eps=0.0, batch_rewards=batch)
    s = math.sqrt(3 / 14)
    assert close(a, [0.25 / s, -0.75 / s, -0.75 / s, 0.25 / s], 1e-6)
    # No group baseline: the all-ones group is above the batch mean and gets a positive advantage.
    assert (compute_advantages("reinforce_pp", batch[4:], 4, eps=0.0, batch_rewards=batch) > 0).all()


def test_reinforce_pp_baseline_by_hand():
    # Centred: (.5,-.5,-.5,.5) and (.25,.25,.25,-.75); their std over the batch: sqrt(1.75 / 7) = 1/2.
    r = t([1.0, 0, 0, 1, 1, 1, 1, 0])
    a = compute_advantages("reinforce_pp_baseline", r, 4, eps=0.0)
    assert close(a, [1, -1, -1, 1, 0.5, 0.5, 0.5, -1.5], 1e-6)
    # Over two processes, each normalises by the global std, and the halves equal the whole.
    halves = [compute_advantages("reinforce_pp_baseline", r[i:i + 4], 4, eps=0.0, batch_rewards=r) for i in (0, 4)]
    assert close(torch.cat(halves), a, 1e-6)


def test_priority_by_hand_and_equal_weights_give_group():
    # G = 3, rewards (1, 0, 0), weights (2, 1, 1) -> w~ = (.5, .25, .25), b = .5,
    # s^2 = 3/2 * (.5 * .25 + .25 * .25 + .25 * .25) = .375 -> A = 3 w~ (r - b) / s.
    a = compute_advantages("priority", t([1.0, 0, 0]), 3, eps=0.0, weights=t([2.0, 1, 1]))
    s = math.sqrt(0.375)
    assert close(a, [0.75 / s, -0.375 / s, -0.375 / s], 1e-6)
    r = t([1.0, 0, 0, 2, 5, 1, 0.3, 0.3, 0.3])
    for eps in (0.0, 1e-4):
        equal = compute_advantages("priority", r, 3, eps=eps, weights=torch.full((9,), 0.07, dtype=torch.float64))
        assert close(equal, compute_advantages("group", r, 3, eps=eps), 1e-6)


def test_priority_needs_weights_and_others_ignore_them():
    with pytest.raises(ValueError, match="stochastic_beam"):
        compute_advantages("priority", t([1.0, 0]), 2, eps=1e-4)
    r = t([1.0, 0, 0, 1])
    assert close(compute_advantages("group", r, 2, eps=1e-4, weights=t([5.0, 1, 1, 1])),
                 compute_advantages("group", r, 2, eps=1e-4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NEW)
def test_matches_naive_loop(shape, name):
    b = random_batch(*shape, seed=11 + sum(shape))
    if b.G < 2:
        return
    g = torch.Generator().manual_seed(sum(shape))
    weights = torch.rand(b.N, generator=g, dtype=torch.float64) + 0.05 if name == "priority" else None
    # A second process's rewards beside these: the batch statistics are over both.
    other = random_batch(*shape, seed=99 + sum(shape)).rewards
    batch = torch.cat([b.rewards, other])
    for eps in (1e-4, 0.0):
        a = compute_advantages(name, b.rewards, b.G, eps=eps, batch_rewards=batch, weights=weights)
        assert close(a, naive(name, b.rewards, b.G, eps, batch, weights), 1e-5), (name, eps)
        if name != "reinforce_pp":  # the others are group-relative: a tied group gets exactly 0
            assert (a[:b.G] == 0).all()
