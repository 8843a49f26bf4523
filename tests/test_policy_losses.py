"""The registered policy losses beyond PPO's clip: CISPO (MiniMax-M1, arXiv:2506.13585) and GMPO
(geometric mean, arXiv:2507.20673).

Each loss: hand-worked values, a naive per-token loop, and the gradient the maths fixes.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm import AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS, group_advantages, policy_loss
from test_algorithm import SHAPES, close, naive_aggregate, naive_ratio, random_batch, t


def naive_cispo(l, old, A, m, level, eps_low, eps_high, mode, N, ntok, G, Lmax):
    ratio = naive_ratio(l, old, m, level)
    L, lo, hi = [], [], []
    for i, row in enumerate(ratio):
        L.append([-min(max(r, 1 - eps_low), 1 + eps_high) * A[i] * l[i][t_] if m[i][t_] else 0.0
                  for t_, r in enumerate(row)])
        lo.append([r < 1 - eps_low for r in row])
        hi.append([r > 1 + eps_high for r in row])
    cells = [(i, t_) for i in range(len(l)) for t_ in range(len(l[0])) if m[i][t_]]
    stats = {"clip_low_sum": sum(lo[i][t_] for i, t_ in cells), "clip_high_sum": sum(hi[i][t_] for i, t_ in cells),
             "ratio_sum": sum(ratio[i][t_] for i, t_ in cells), "token_count": len(cells)}
    return naive_aggregate(L, m, mode, N, ntok, G, Lmax), stats


def test_cispo_is_registered():
    assert {"ppo_clip", "cispo"} <= set(POLICY_LOSSES.names())


def test_cispo_by_hand():
    # One row of two tokens, A = 2; ratios e^0.5 = 1.6487 (above 1 + 0.28: weight capped at 1.28)
    # and e^-1 = 0.3679 (no lower bound with eps_low = 1: weight 0.3679).
    l = t([[-1.0, -2.0]]).requires_grad_()
    old = t([[-1.5, -1.0]])
    A = t([2.0])
    m = t([[1, 1]]).bool()
    loss, stats = policy_loss(l, old, None, A, m, loss_mode="cispo", eps_low=1.0, eps_high=0.28,
                              aggregation="token_mean", num_sequences=1, num_tokens=2, group_size=1,
                              max_completion_length=2)
    w = [1.28, math.exp(-1)]
    # L_t = -w_t * A * l_t = (2.56, 4 w_2); token_mean divides by 2.
    assert close(loss, (1.28 * 2 * 1 + w[1] * 2 * 2) / 2)
    assert stats["clip_high_sum"] == 1 and stats["clip_low_sum"] == 0
    (g,) = torch.autograd.grad(loss, l)
    # The weight is a constant: d/dl_t = -w_t * A / 2, whatever the ratio's own derivative.
    assert close(g, [[-1.28, -w[1]]])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_cispo_matches_naive_and_its_gradient_is_the_weighted_policy_gradient(shape, aggregation, level):
    b = random_batch(*shape, seed=7 + sum(shape))
    A = group_advantages(b.rewards, b.G)
    l = b.logprobs.clone().requires_grad_()
    loss, stats = policy_loss(l, b.old, None, A, b.mask, loss_mode="cispo", ratio_level=level, eps_low=0.3,
                              eps_high=0.1, aggregation=aggregation, **b.norm())
    nloss, nstats = naive_cispo(b.logprobs.tolist(), b.old.tolist(), A.tolist(), b.mask.tolist(), level, 0.3, 0.1,
                                aggregation, b.N, int(b.mask.sum()), b.G, b.T)
    assert close(loss, nloss, 1e-10)
    for k, v in nstats.items():
        assert close(stats[k], v, 1e-10), k
    (g,) = torch.autograd.grad(loss, l)
    # Expected gradient: -clip(rho) * A_i * (the aggregation's weight of token t of row i).
    ratio = torch.tensor(naive_ratio(b.logprobs.tolist(), b.old.tolist(), b.mask.tolist(), level), dtype=A.dtype)
    w = ratio.clamp(0.7, 1.1)
    length = b.mask.sum(-1, keepdim=True).clamp(min=1).to(A.dtype)
    scale = {"sequence_mean": 1 / (b.N * length), "token_mean": torch.full_like(length, 1.0) / int(b.mask.sum()),
             "constant_normalizer": torch.full_like(length, 1.0) / (b.N * b.T),
             "group_sum": b.G / (b.N * length)}[aggregation]
    expected = torch.where(b.mask, -w * A[:, None] * scale, 0.0)
    assert g.isfinite().all() and close(g, expected, 1e-10)


def test_cispo_at_one_update_per_rollout_has_ppo_gradient():
    """With pi_old = pi_theta (old_logprobs None) every weight is 1: CISPO's gradient is PPO's."""
    b = random_batch(3, 4, 6, seed=3)
    A = group_advantages(b.rewards, b.G)
    grads = {}
    for mode in ("ppo_clip", "cispo"):
        l = b.logprobs.clone().requires_grad_()
        loss, stats = policy_loss(l, None, None, A, b.mask, loss_mode=mode, eps_low=1.0, eps_high=4.0, **b.norm())
        (grads[mode],) = torch.autograd.grad(loss, l)
        assert stats["clip_low_sum"] == stats["clip_high_sum"] == 0
    assert close(grads["ppo_clip"], grads["cispo"]) and grads["cispo"].abs().sum() > 0


def test_unknown_policy_loss_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"policy_loss must be one of 'ppo_clip', 'cispo'.*got 'ppo'"):
        policy_loss(torch.zeros(2, 2), None, None, torch.zeros(2), torch.ones(2, 2, dtype=torch.bool),
                    loss_mode="ppo", num_sequences=2, num_tokens=4, group_size=2, max_completion_length=2)


# --------------------------------------------------------------------------------------------
# GMPO


def naive_gmpo(l, old, A, m, eps_low, eps_high, mode, N, ntok, G, Lmax):
    """Per row: c_t = the log-ratio clipped on PPO's side for sign(A), s = exp(mean c), L_t = -A s."""
    L, lo, hi = [], [], []
    for i in range(len(l)):
        cs, row_lo, row_hi = [], [], []
        for t_ in range(len(l[i])):
            if not m[i][t_]:
                row_lo.append(False)
                row_hi.append(False)
                continue
            d = l[i][t_] - old[i][t_]
            c = min(d, eps_high) if A[i] > 0 else max(d, -eps_low) if A[i] < 0 else d
            cs.append(c)
            row_lo.append(d < -eps_low and A[i] < 0)
            row_hi.append(d > eps_high and A[i] > 0)
        s = math.exp(sum(cs) / max(len(cs), 1))
        L.append([-A[i] * s if m[i][t_] else 0.0 for t_ in range(len(l[i]))])
        lo.append(row_lo)
        hi.append(row_hi)
    cells = [(i, t_) for i in range(len(l)) for t_ in range(len(l[0])) if m[i][t_]]
    stats = {"clip_low_sum": sum(lo[i][t_] for i, t_ in cells), "clip_high_sum": sum(hi[i][t_] for i, t_ in cells),
             "ratio_sum": sum(math.exp(l[i][t_] - old[i][t_]) for i, t_ in cells), "token_count": len(cells)}
    return naive_aggregate(L, m, mode, N, ntok, G, Lmax), stats


def test_gmpo_is_registered():
    assert "gmpo" in POLICY_LOSSES.names()


def gmpo_loss(l, old, A, m, aggregation="sequence_mean", **norm):
    return policy_loss(l, old, None, A, m, loss_mode="gmpo", eps_low=0.4, eps_high=0.4, aggregation=aggregation,
                       **norm)


def test_gmpo_by_hand():
    # Log-ratios d = (0.5, -1). A = 2 > 0: the cap e^0.4 acts above only -> c = (0.4, -1),
    # s = e^-0.3; sequence_mean over one row: loss = -2 e^-0.3. The capped token has no gradient,
    # the other -A s / |o| = -e^-0.3.
    norm = dict(num_sequences=1, num_tokens=2, group_size=1, max_completion_length=2)
    m = t([[1, 1]]).bool()
    old = t([[-1.5, -1.0]])
    l = t([[-1.0, -2.0]]).requires_grad_()
    loss, stats = gmpo_loss(l, old, t([2.0]), m, **norm)
    assert close(loss, -2 * math.exp(-0.3))
    assert stats["clip_high_sum"] == 1 and stats["clip_low_sum"] == 0
    assert close(torch.autograd.grad(loss, l)[0], [[0.0, -math.exp(-0.3)]])
    # A = -1 < 0: the floor e^-0.4 acts below only -> c = (0.5, -0.4), s = e^0.05, loss = +e^0.05;
    # the floored token has no gradient, the other -A s / 2.
    l = t([[-1.0, -2.0]]).requires_grad_()
    loss, stats = gmpo_loss(l, old, t([-1.0]), m, **norm)
    assert close(loss, math.exp(0.05))
    assert stats["clip_low_sum"] == 1 and stats["clip_high_sum"] == 0
    assert close(torch.autograd.grad(loss, l)[0], [[math.exp(0.05) / 2, 0.0]])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gmpo_matches_naive_and_its_gradient(shape, aggregation):
    b = random_batch(*shape, seed=5 + sum(shape), old_noise=0.5)
    A = group_advantages(b.rewards, b.G)
    l = b.logprobs.clone().requires_grad_()
    loss, stats = gmpo_loss(l, b.old, A, b.mask, aggregation, **b.norm())
    nloss, nstats = naive_gmpo(b.logprobs.tolist(), b.old.tolist(), A.tolist(), b.mask.tolist(), 0.4, 0.4,
                               aggregation, b.N, int(b.mask.sum()), b.G, b.T)
    assert close(loss, nloss, 1e-10)
    for k, v in nstats.items():
        assert close(stats[k], v, 1e-10), k
    (g,) = torch.autograd.grad(loss, l)
    # d(-A s)/dl_t = -A s / |o| on unclipped tokens (0 on clipped ones), times the weight the
    # aggregation gives the row's loss K_i = -A s (the same on each of its |o| tokens).
    d = torch.where(b.mask, b.logprobs - b.old, 0.0)
    a = A[:, None]
    c = torch.where(a > 0, d.clamp(max=0.4), torch.where(a < 0, d.clamp(min=-0.4), d))
    length = b.mask.sum(-1, keepdim=True).clamp(min=1).to(A.dtype)
    s = (torch.where(b.mask, c, 0.0).sum(-1, keepdim=True) / length).exp()
    free = b.mask & ~((d > 0.4) & (a > 0)) & ~((d < -0.4) & (a < 0))
    row = {"sequence_mean": 1 / torch.full_like(length, b.N), "group_sum": b.G / torch.full_like(length, b.N),
           "token_mean": length / int(b.mask.sum()), "constant_normalizer": length / (b.N * b.T)}[aggregation]
    expected = torch.where(free, -a * s / length * row, 0.0)
    assert g.isfinite().all() and close(g, expected, 1e-10)


def test_gmpo_at_one_update_per_rollout_has_sequence_mean_ppo_gradient():
    b = random_batch(3, 4, 6, seed=8)
    A = group_advantages(b.rewards, b.G)
    grads = {}
    for mode in ("ppo_clip", "gmpo"):
        l = b.logprobs.clone().requires_grad_()
        loss, _ = policy_loss(l, None, None, A, b.mask, loss_mode=mode, eps_low=0.4, eps_high=0.4, **b.norm())
        (grads[mode],) = torch.autograd.grad(loss, l)
    assert close(grads["ppo_clip"], grads["gmpo"]) and grads["gmpo"].abs().sum() > 0


def test_gmpo_rejects_a_sequence_ratio_level():
    with pytest.raises(ValueError, match="ratio_level must be 'token'"):
        policy_loss(torch.zeros(2, 2), None, None, torch.zeros(2), torch.ones(2, 2, dtype=torch.bool),
                    loss_mode="gmpo", ratio_level="sequence", num_sequences=2, num_tokens=4, group_size=2,
                    max_completion_length=2)
