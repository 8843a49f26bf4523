"""Tests for grpo.algorithm: hand-worked values, naive loop references, gradient identities."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from grpo.algorithm import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    aggregate,
    clipped_surrogate,
    group_advantages,
    importance_ratio,
    kl_penalty,
    policy_loss,
    zero_variance_groups,
)

F64 = torch.float64
E = math.e


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-12):
    a = torch.as_tensor(a, dtype=F64)
    b = torch.as_tensor(b, dtype=F64)
    return torch.allclose(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Naive references: explicit Python loops over prompts / sequences / tokens, on plain floats.
# --------------------------------------------------------------------------------------------


def naive_advantages(rewards, G, scale, eps):
    r = [float(x) for x in rewards]
    N = len(r)
    mu_b = sum(r) / N
    sigma_b = math.sqrt(sum((x - mu_b) ** 2 for x in r) / (N - 1))
    out = []
    for p in range(N // G):
        g = r[p * G : (p + 1) * G]
        mu = sum(g) / G
        sigma = math.sqrt(sum((x - mu) ** 2 for x in g) / (G - 1))
        for x in g:
            if all(y == g[0] for y in g):
                out.append(0.0)
            elif scale == "group":
                out.append((x - mu) / (sigma + eps))
            elif scale == "batch":
                out.append((x - mu) / (sigma_b + eps))
            else:
                out.append(x - mu)
    return out


def naive_ratio(l, la, m, level):
    N, T = len(l), len(l[0])
    out = [[1.0] * T for _ in range(N)]
    for i in range(N):
        if level == "token":
            for t_ in range(T):
                if m[i][t_]:
                    out[i][t_] = math.exp(l[i][t_] - la[i][t_])
        else:
            s, n = 0.0, 0
            for t_ in range(T):
                if m[i][t_]:
                    s += l[i][t_] - la[i][t_]
                    n += 1
            for t_ in range(T):
                out[i][t_] = math.exp(s / max(n, 1))
    return out


def naive_surrogate(ratio, A, eps_low, eps_high):
    loss, lo, hi = [], [], []
    for i, row in enumerate(ratio):
        loss_row, lo_row, hi_row = [], [], []
        for r in row:
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            loss_row.append(-min(r * A[i], c * A[i]))
            lo_row.append(r < 1 - eps_low and A[i] < 0)
            hi_row.append(r > 1 + eps_high and A[i] > 0)
        loss.append(loss_row)
        lo.append(lo_row)
        hi.append(hi_row)
    return loss, lo, hi


def naive_kl(l, ref, estimator):
    d = ref - l
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d * d / 2
    d = min(max(d, -20.0), 20.0)
    return math.exp(d) - d - 1


def naive_aggregate(L, m, mode, N, num_tokens, G, Lmax):
    total = 0.0
    for i in range(len(L)):
        row_sum = sum(L[i][t_] for t_ in range(len(L[i])) if m[i][t_])
        length = sum(1 for x in m[i] if x)
        if mode == "sequence_mean":
            total += row_sum / max(length, 1) / N
        elif mode == "token_mean":
            total += row_sum / num_tokens
        elif mode == "constant_normalizer":
            total += row_sum / (N * Lmax)
        else:
            total += row_sum / max(length, 1) / (N // G)
    return total


def naive_policy_loss(l, old, ref, A, m, level, eps_low, eps_high, beta, est, mode, N, ntok, G, Lmax):
    ratio = naive_ratio(l, old, m, level)
    L, lo, hi = naive_surrogate(ratio, A, eps_low, eps_high)
    kl = [[naive_kl(l[i][t_], ref[i][t_], est) if m[i][t_] else 0.0 for t_ in range(len(l[0]))] for i in range(len(l))]
    pg = naive_aggregate(L, m, mode, N, ntok, G, Lmax)
    kll = naive_aggregate(kl, m, mode, N, ntok, G, Lmax)
    cells = [(i, t_) for i in range(len(l)) for t_ in range(len(l[0])) if m[i][t_]]
    stats = {
        "kl_sum": sum(kl[i][t_] for i, t_ in cells),
        "clip_low_sum": sum(lo[i][t_] for i, t_ in cells),
        "clip_high_sum": sum(hi[i][t_] for i, t_ in cells),
        "ratio_sum": sum(ratio[i][t_] for i, t_ in cells),
        "token_count": len(cells),
        "policy_loss": pg,
        "kl_loss": kll,
    }
    return pg + beta * kll, stats


# --------------------------------------------------------------------------------------------
# Random batches: garbage (-inf, NaN, huge) at padding, a zero-length row, a zero-variance group.
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    logprobs: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    P: int
    G: int
    T: int

    @property
    def N(self):
        return self.P * self.G

    def norm(self):
        return dict(num_sequences=self.N, num_tokens=int(self.mask.sum()), group_size=self.G,
                    max_completion_length=self.T)


def random_batch(P, G, T, seed, old_noise=0.3, ref_noise=0.5):
    g = torch.Generator().manual_seed(seed)
    N = P * G
    logprobs = -3 * torch.rand(N, T, generator=g, dtype=F64)
    old = logprobs + old_noise * torch.randn(N, T, generator=g, dtype=F64)
    ref = logprobs + ref_noise * torch.randn(N, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[min(1, N - 1)] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logprobs = logprobs.masked_fill(~mask, -math.inf)
    old = old.masked_fill(~mask, 1e6)
    ref = ref.masked_fill(~mask, math.nan)
    rewards = torch.randint(0, 3, (N,), generator=g).to(F64) + 0.5 * torch.rand(N, generator=g, dtype=F64)
    rewards[:G] = 0.1  # zero-variance group whose mean is not exactly 0.1 in floating point
    return Batch(logprobs, old, ref, mask, rewards, P, G, T)


SHAPES = [(2, 3, 5), (4, 2, 7), (3, 4, 1), (1, 5, 9)]


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = t([1.0, 0, 0, 0, 0, 0, 0, 0])
    # group 0: mu = 1/4, sigma^2 = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 1/4, sigma = 1/2
    # -> A = (0.75, -0.25, -0.25, -0.25) / 0.5 = (1.5, -0.5, -0.5, -0.5); group 1 is constant -> 0.
    assert close(group_advantages(r, 4, "group", eps=0.0), [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    assert close(group_advantages(r, 4, "group"), [x / (0.5 + 1e-4) for x in (0.75, -0.25, -0.25, -0.25)] + [0] * 4)
    # batch: mu_b = 1/8, sigma_b^2 = ((7/8)^2 + 7 (1/8)^2) / 7 = (56/64) / 7 = 1/8 -> sigma_b = 1/sqrt(8)
    # -> group 0: (0.75, -0.25, -0.25, -0.25) * sqrt(8) = (2.1213.., -0.7071.., ...)
    s8 = math.sqrt(8)
    assert close(group_advantages(r, 4, "batch", eps=0.0), [0.75 * s8, -0.25 * s8, -0.25 * s8, -0.25 * s8, 0, 0, 0, 0])
    assert close(group_advantages(r, 4, "batch"), [x / (1 / s8 + 1e-4) for x in (0.75, -0.25, -0.25, -0.25)] + [0] * 4)
    # none (Dr. GRPO): r - mu only
    assert close(group_advantages(r, 4, "none"), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    # groups of 2 over the same rewards: (1, 0) -> mu 0.5, sigma = sqrt(0.5) -> +-0.5/sqrt(0.5) = +-sqrt(0.5)
    assert close(group_advantages(r, 2, "group", eps=0.0), [math.sqrt(0.5), -math.sqrt(0.5)] + [0] * 6)


def test_zero_variance_groups_by_hand():
    r = t([1.0, 0, 0, 0, 0, 0, 0, 0, 0.1, 0.1, 0.1, 0.1])
    assert zero_variance_groups(r, 4).tolist() == [False, True, True]
    assert zero_variance_groups(r, 2).tolist() == [False, True, True, True, True, True]


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_variance_groups_give_exact_zero(scale, dtype):
    # mean of three 0.1 is not 0.1 in floating point: without care this becomes ~1e-17 / 1e-4.
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 1.0, 2.0, 4.0], dtype=dtype)
    for eps in (1e-4, 0.0):
        a = group_advantages(r, 3, scale, eps=eps)
        assert not a.isnan().any()
        assert (a[:6] == 0).all()
        assert (a[6:] != 0).all()
    # Every reward of the batch equal: sigma_batch = 0 too, still exactly 0.
    for eps in (1e-4, 0.0):
        a = group_advantages(torch.full((6,), 0.7, dtype=dtype), 3, scale, eps=eps)
        assert (a == 0).all() and not a.isnan().any()


def test_group_advantages_integer_rewards_become_float():
    a = group_advantages(torch.tensor([1, 0, 1, 1]), 2, "none")
    assert a.is_floating_point() and a.tolist() == [0.5, -0.5, 0.0, 0.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_group_advantages_matches_naive(shape, scale):
    b = random_batch(*shape, seed=sum(shape))
    for eps in (1e-4, 0.0):
        assert close(group_advantages(b.rewards, b.G, scale, eps), naive_advantages(b.rewards, b.G, scale, eps))
    zv = zero_variance_groups(b.rewards, b.G).tolist()
    r = b.rewards.tolist()
    assert zv == [len(set(r[p * b.G : (p + 1) * b.G])) == 1 for p in range(b.P)]
    assert zv[0]


# --------------------------------------------------------------------------------------------
# Importance ratio
# --------------------------------------------------------------------------------------------


def test_importance_ratio_by_hand():
    l = t([[-1.0, -2.0, -math.inf], [-1.0, -1.0, -1.0]])
    la = t([[-1.5, -1.0, -math.inf], [math.inf, 0.0, 7.0]])
    m = t([[1, 1, 0], [0, 0, 0]]).bool()
    # token: diffs (0.5, -1); masked positions -> 1 whatever they hold (here -inf - -inf = NaN).
    assert close(importance_ratio(l, la, m, "token"), [[E**0.5, E**-1, 1.0], [1.0, 1.0, 1.0]])
    # sequence (GSPO): mean diff (0.5 - 1) / 2 = -0.25 -> exp(-0.25) everywhere on the row;
    # the zero-length row: 0 / max(0, 1) = 0 -> 1.
    s = E**-0.25
    assert close(importance_ratio(l, la, m, "sequence"), [[s, s, s], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_importance_ratio_matches_naive_and_is_safe(shape, level):
    b = random_batch(*shape, seed=7 + sum(shape))
    l = b.logprobs.clone().requires_grad_()
    ratio = importance_ratio(l, b.old, b.mask, level)
    assert close(ratio, naive_ratio(b.logprobs.tolist(), b.old.tolist(), b.mask.tolist(), level))
    assert ratio.isfinite().all()
    (g,) = torch.autograd.grad(ratio.sum(), l)
    assert g.isfinite().all() and (g[~b.mask] == 0).all()
    # float and bool masks mean the same
    assert close(importance_ratio(b.logprobs, b.old, b.mask.to(F64), level), ratio)


# --------------------------------------------------------------------------------------------
# Clipped surrogate
# --------------------------------------------------------------------------------------------


def test_clipped_surrogate_by_hand_dapo_band():
    ratio = t([[0.5, 0.9, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.1, 1.5]])
    A = t([2.0, -2.0])
    loss, lo, hi = clipped_surrogate(ratio, A, 0.2, 0.28)
    # band [0.8, 1.28].  A = +2: rho A = (1, 1.8, 2, 2.2, 3), clip A = (1.6, 1.8, 2, 2.2, 2.56)
    #   min = (1, 1.8, 2, 2.2, 2.56).  A = -2: rho A = (-1, -1.8, -2, -2.2, -3),
    #   clip A = (-1.6, -1.8, -2, -2.2, -2.56), min = (-1.6, -1.8, -2, -2.2, -3).
    assert close(loss, [[-1, -1.8, -2, -2.2, -2.56], [1.6, 1.8, 2, 2.2, 3]])
    assert hi.tolist() == [[False, False, False, False, True], [False] * 5]
    assert lo.tolist() == [[False] * 5, [True, False, False, False, False]]
    # per-token advantages [N, T] are used as given
    loss2, _, _ = clipped_surrogate(ratio, A[:, None].expand(2, 5), 0.2, 0.28)
    assert close(loss2, loss)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28), (3e-4, 4e-4)])
def test_clipped_surrogate_matches_naive(shape, eps):
    b = random_batch(*shape, seed=11 + sum(shape))
    ratio = importance_ratio(b.logprobs, b.old, b.mask)
    A = group_advantages(b.rewards, b.G)
    loss, lo, hi = clipped_surrogate(ratio, A, *eps)
    nl, nlo, nhi = naive_surrogate(ratio.tolist(), A.tolist(), *eps)
    assert close(loss, nl) and lo.tolist() == nlo and hi.tolist() == nhi


# --------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    l = t([0.0, -1.0, -2.0])
    ref = t([-1.0, -1.0, 0.0])
    # d = ref - l = (-1, 0, 2)
    assert close(kl_penalty(l, ref, "k1"), [1.0, 0.0, -2.0])
    assert close(kl_penalty(l, ref, "k2"), [0.5, 0.0, 2.0])
    # k3: e^-1 + 1 - 1 = e^-1; 0; e^2 - 2 - 1
    assert close(kl_penalty(l, ref, "k3"), [E**-1, 0.0, E**2 - 3])
    assert close(kl_penalty(l, ref), kl_penalty(l, ref, "k3"))
    # clamp: d = 50 -> treated as 20; d = -inf (reference finds the token impossible) -> -20
    k3 = kl_penalty(t([0.0, 0.0]), t([50.0, -math.inf]), "k3")
    assert close(k3, [E**20 - 21, E**-20 + 19])


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_penalty_matches_naive(estimator):
    g = torch.Generator().manual_seed(3)
    l = -5 * torch.rand(6, 8, generator=g, dtype=F64)
    ref = l + 4 * torch.randn(6, 8, generator=g, dtype=F64)
    ref[0, 0] = l[0, 0] + 30  # beyond the clamp
    ref[0, 1] = l[0, 1] - 30
    expected = [[naive_kl(a, b, estimator) for a, b in zip(ra, rb)] for ra, rb in zip(l.tolist(), ref.tolist())]
    assert close(kl_penalty(l, ref, estimator), expected)


def test_kl_estimators_are_unbiased_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), 0)  # pi_theta
    log_p = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), 0)  # pi_ref
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum()
    # exact expectation over the support under pi_theta: k1 and k3 are unbiased
    assert close((q * kl_penalty(log_q, log_p, "k1")).sum(), kl)
    assert close((q * kl_penalty(log_q, log_p, "k3")).sum(), kl)
    # and a Monte Carlo mean of sampled tokens estimates it
    x = torch.multinomial(q, 50_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        k = kl_penalty(log_q[x], log_p[x], est)
        assert abs(k.mean() - kl) < 4 * k.std() / math.sqrt(len(x))
    # k3 >= 0 everywhere (also beyond the clamp), 0 exactly where l == ref; k2 likewise
    l = -10 * torch.rand(1000, generator=g, dtype=F64)
    ref = l + 20 * torch.randn(1000, generator=g, dtype=F64)
    assert (kl_penalty(l, ref, "k3") >= 0).all()
    assert (kl_penalty(l, l.clone(), "k3") == 0).all() and (kl_penalty(l, l.clone(), "k2") == 0).all()


def test_kl_gradient_vanishes_at_reference():
    ref = -3 * torch.rand(20, dtype=F64)
    l = ref.clone().requires_grad_()
    for est, expected in (("k3", 0.0), ("k2", 0.0), ("k1", 1.0)):  # d k1 / dl = 1 everywhere
        (g,) = torch.autograd.grad(kl_penalty(l, ref, est).sum(), l)
        assert (g == expected).all(), est


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

# per-row sums (6, 4, 4, 0), lengths (3, 1, 2, 0), row means (2, 4, 2, 0); 9 is garbage padding.
AGG_L = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [2.0, 2.0, math.nan], [math.inf, 9.0, 9.0]]
AGG_M = [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
AGG_EXPECTED = {
    "sequence_mean": (2 + 4 + 2 + 0) / 4,  # = 2
    "token_mean": (6 + 4 + 4) / 6,  # = 7/3
    "constant_normalizer": 14 / (4 * 3),  # = 7/6
    "group_sum": (2 + 4 + 2 + 0) / 2,  # G = 2 -> P = 2: = 4
}


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_by_hand(mode):
    out = aggregate(t(AGG_L), t(AGG_M).bool(), mode, num_sequences=4, num_tokens=6, group_size=2,
                    max_completion_length=3)
    assert out.dim() == 0 and close(out, AGG_EXPECTED[mode])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_matches_naive(shape, mode):
    b = random_batch(*shape, seed=5 + sum(shape))
    L = torch.randn(b.N, b.T, dtype=F64).masked_fill(~b.mask, math.inf)
    out = aggregate(L, b.mask, mode, **b.norm())
    ntok = int(b.mask.sum())
    assert close(out, naive_aggregate(L.tolist(), b.mask.tolist(), mode, b.N, ntok, b.G, b.T))


def test_aggregate_empty_batch_is_zero_not_nan():
    out = aggregate(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), "token_mean",
                    num_sequences=2, num_tokens=0, group_size=2, max_completion_length=3)
    assert out == 0


# --------------------------------------------------------------------------------------------
# The full loss
# --------------------------------------------------------------------------------------------


def test_policy_loss_by_hand():
    l = t([[-1.0, -1.0], [-2.0, -2.0]])
    old = t([[-1.0, -1.5], [-2.0, 5.0]])
    ref = t([[-1.0, -1.0], [-1.0, math.nan]])
    m = t([[1, 1], [1, 0]]).bool()
    A = t([1.0, -1.0])
    norm = dict(num_sequences=2, num_tokens=3, group_size=2, max_completion_length=2)
    # ratios: row 0 (1, e^0.5 = 1.6487 > 1.2 with A > 0: clipped high), row 1 (1, masked)
    # surrogate L: row 0 (-1, -1.2), row 1 (+1)
    # KL k3: row 0 d = (0, 0) -> 0; row 1 d = -1 - (-2) = 1 -> e - 2
    loss, stats = policy_loss(l, old, ref, A, m, beta=0.1, kl_estimator="k3", aggregation="sequence_mean", **norm)
    # sequence_mean: pg = ((-1 - 1.2) / 2 + 1) / 2 = -0.05; kl = (0 + (e - 2)) / 2
    assert close(stats["policy_loss"], -0.05)
    assert close(stats["kl_loss"], (E - 2) / 2)
    assert close(loss, -0.05 + 0.1 * (E - 2) / 2)
    assert close(stats["kl_sum"], E - 2)
    assert stats["clip_low_sum"] == 0 and stats["clip_high_sum"] == 1 and stats["token_count"] == 3
    assert close(stats["ratio_sum"], 2 + E**0.5)
    # token_mean: pg = (-1 - 1.2 + 1) / 3 = -0.4; kl = (e - 2) / 3
    loss, stats = policy_loss(l, old, ref, A, m, beta=0.1, aggregation="token_mean", **norm)
    assert close(loss, -0.4 + 0.1 * (E - 2) / 3)
    # ratio anchored at the reference instead (the seed-literal variant): row 0 diffs (0, 0),
    # row 1 diff -2 - (-1) = -1 -> ratio e^-1 < 0.8 with A < 0: clipped low, L = -(0.8 * -1) = 0.8
    loss, stats = policy_loss(l, old, ref, A, m, ratio_anchor="reference", **norm)
    assert close(stats["policy_loss"], ((-1 - 1) / 2 + 0.8) / 2)
    assert stats["clip_low_sum"] == 1 and stats["clip_high_sum"] == 0
    # beta = 0 with a reference given: the KL is reported but not in the loss
    assert close(stats["kl_sum"], E - 2) and close(stats["kl_loss"], (E - 2) / 2)
    assert close(loss, stats["policy_loss"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", RATIO_LEVELS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_policy_loss_matches_naive(shape, aggregation, level, estimator):
    b = random_batch(*shape, seed=13 + sum(shape))
    A = group_advantages(b.rewards, b.G)
    kw = dict(ratio_level=level, eps_low=0.2, eps_high=0.28, beta=0.04, kl_estimator=estimator, aggregation=aggregation)
    l = b.logprobs.clone().requires_grad_()
    loss, stats = policy_loss(l, b.old, b.ref, A, b.mask, **kw, **b.norm())
    nloss, nstats = naive_policy_loss(
        b.logprobs.tolist(), b.old.tolist(), b.ref.tolist(), A.tolist(), b.mask.tolist(),
        level, 0.2, 0.28, 0.04, estimator, aggregation, b.N, int(b.mask.sum()), b.G, b.T,
    )
    assert close(loss, nloss, 1e-10)
    assert set(stats) == set(nstats)
    for k, v in stats.items():
        assert v.dim() == 0 and not v.requires_grad and close(v, nstats[k], 1e-10), k
    (g,) = torch.autograd.grad(loss, l)
    assert g.isfinite().all() and (g[~b.mask] == 0).all()


def test_policy_loss_one_update_per_rollout_has_unit_ratio():
    b = random_batch(3, 4, 6, seed=1)
    A = group_advantages(b.rewards, b.G)
    for level in RATIO_LEVELS:
        _, stats = policy_loss(b.logprobs, None, None, A, b.mask, ratio_level=level, **b.norm())
        assert stats["ratio_sum"] == stats["token_count"] == b.mask.sum()
        assert stats["clip_low_sum"] == stats["clip_high_sum"] == stats["kl_sum"] == 0
    # the reference anchor wins over old_logprobs
    l1, s1 = policy_loss(b.logprobs, b.old, b.ref, A, b.mask, ratio_anchor="reference", **b.norm())
    l2, s2 = policy_loss(b.logprobs, None, b.ref, A, b.mask, ratio_anchor="reference", **b.norm())
    assert close(l1, l2) and close(s1["ratio_sum"], s2["ratio_sum"])


def test_policy_loss_float_mask_equals_bool_mask():
    b = random_batch(2, 3, 5, seed=2)
    A = group_advantages(b.rewards, b.G)
    kw = dict(beta=0.1, aggregation="token_mean", **b.norm())
    l1, s1 = policy_loss(b.logprobs, b.old, b.ref, A, b.mask, **kw)
    l2, s2 = policy_loss(b.logprobs, b.old, b.ref, A, b.mask.to(F64), **kw)
    assert close(l1, l2) and all(close(s1[k], s2[k]) for k in s1)


# --------------------------------------------------------------------------------------------
# Gradient identity: one update per rollout, beta = 0 -> policy gradient
#   grad loss = -sum_i A_i grad(normalised log-prob of o_i), normalised as the aggregation says.
# --------------------------------------------------------------------------------------------


def reference_objective(logprobs, A, mask, aggregation, N, num_tokens, G, Lmax):
    seq_logprob = torch.where(mask, logprobs, 0.0).sum(-1)
    length = mask.sum(-1).clamp(min=1).to(logprobs.dtype)
    weight = {
        "sequence_mean": 1 / (N * length),
        "token_mean": torch.full_like(seq_logprob, 1 / num_tokens),
        "constant_normalizer": torch.full_like(seq_logprob, 1 / (N * Lmax)),
        "group_sum": G / (N * length),
    }[aggregation]
    return -(A * weight * seq_logprob).sum()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_gradient_identity_wrt_logprobs(aggregation, level):
    b = random_batch(3, 4, 6, seed=21)
    A = group_advantages(b.rewards, b.G)
    l = b.logprobs.clone().requires_grad_()
    loss, _ = policy_loss(l, None, None, A, b.mask, ratio_level=level, aggregation=aggregation, **b.norm())
    (g,) = torch.autograd.grad(loss, l)
    ref_obj = reference_objective(l, A, b.mask, aggregation, b.N, int(b.mask.sum()), b.G, b.T)
    (g_ref,) = torch.autograd.grad(ref_obj, l)
    assert close(g, g_ref) and (g[~b.mask] == 0).all()
    assert g.abs().sum() > 0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_gradient_identity_wrt_policy_parameters(aggregation, level):
    # a tiny linear "policy": logits = features @ W^T over a vocabulary of 5
    g = torch.Generator().manual_seed(4)
    P, G, T, H, V = 2, 3, 5, 4, 5
    N = P * G
    W = torch.randn(V, H, generator=g, dtype=F64, requires_grad=True)
    feats = torch.randn(N, T, H, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (N, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([5, 2, 0, 3, 5, 1])[:, None]
    A = group_advantages(torch.tensor([1.0, 0, 1, 1, 1, 1], dtype=F64), G)
    norm = dict(num_sequences=N, num_tokens=int(mask.sum()), group_size=G, max_completion_length=T)

    def logprobs():
        return torch.log_softmax(feats @ W.T, -1).gather(-1, tokens[..., None]).squeeze(-1)

    loss, _ = policy_loss(logprobs(), None, None, A, mask, ratio_level=level, aggregation=aggregation, **norm)
    (gW,) = torch.autograd.grad(loss, W)
    ref_obj = reference_objective(logprobs(), A, mask, aggregation, N, norm["num_tokens"], G, T)
    (gW_ref,) = torch.autograd.grad(ref_obj, W)
    assert close(gW, gW_ref) and gW.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Micro-batch independence: summing micro-batch losses (each with the full-batch normalisers)
# reproduces the full-batch loss, gradient and stats, for every aggregation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_microbatch_independence(aggregation, level):
    b = random_batch(4, 2, 6, seed=17)
    A = group_advantages(b.rewards, b.G)
    kw = dict(ratio_level=level, eps_low=0.2, eps_high=0.28, beta=0.04, aggregation=aggregation, **b.norm())
    if level == "sequence":
        kw.update(eps_low=0.05, eps_high=0.06)  # GSPO ratios are close to 1: narrow band so it clips
    l = b.logprobs.clone().requires_grad_()
    full, full_stats = policy_loss(l, b.old, b.ref, A, b.mask, **kw)
    (g_full,) = torch.autograd.grad(full, l)
    assert full_stats["clip_low_sum"] + full_stats["clip_high_sum"] > 0  # the test exercises clipping

    for sizes in ([2, 2, 2, 2], [3, 3, 2], [1, 7]):
        total, stats = 0.0, {k: 0.0 for k in full_stats}
        for rows in torch.arange(b.N).split(sizes):
            loss, s = policy_loss(l[rows], b.old[rows], b.ref[rows], A[rows], b.mask[rows], **kw)
            total = total + loss
            stats = {k: stats[k] + s[k] for k in stats}
        (g,) = torch.autograd.grad(total, l)
        assert close(total, full) and close(g, g_full)
        assert all(close(stats[k], full_stats[k]) for k in stats)


# --------------------------------------------------------------------------------------------
# Clipping: the gradient is zero exactly where the clip is active
# --------------------------------------------------------------------------------------------

CLIP_RATIOS = [0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.25, 1.27, 1.29, 1.5]


@pytest.mark.parametrize("eps_high, n_high", [(0.28, 2), (0.2, 5)])
def test_clipping_zeroes_gradient_exactly_where_active(eps_high, n_high):
    r = t(CLIP_RATIOS)
    l = torch.zeros(2, len(r) + 1, dtype=F64, requires_grad=True)
    old = torch.cat([-r.log(), t([0.0])]).expand(2, -1)  # last column is padding
    mask = torch.ones(2, len(r) + 1, dtype=torch.bool)
    mask[:, -1] = False
    A = t([1.0, -1.0])
    ntok = int(mask.sum())
    loss, stats = policy_loss(l, old, None, A, mask, eps_low=0.2, eps_high=eps_high, aggregation="token_mean",
                              num_sequences=2, num_tokens=ntok, group_size=2, max_completion_length=len(r) + 1)
    (g,) = torch.autograd.grad(loss, l)
    high = (r > 1 + eps_high)  # A > 0 row: clipped above the band
    low = (r < 0.8)  # A < 0 row: clipped below the band
    assert stats["clip_high_sum"] == n_high == high.sum() and stats["clip_low_sum"] == 2 == low.sum()
    # d(-rho A / n)/dl = -rho A / n where the unclipped branch is active, else exactly 0
    assert (g[0, :-1][high] == 0).all() and (g[1, :-1][low] == 0).all()
    assert close(g[0, :-1][~high], -r[~high] / ntok) and close(g[1, :-1][~low], r[~low] / ntok)
    assert (g[:, -1] == 0).all()


def test_sequence_level_clipping_zeroes_whole_row():
    # GSPO: one ratio per completion, so the clip switches off the gradient of the whole row
    l = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    old = t([[-0.1, -0.1, 0.0], [-0.1, -0.1, 0.0]])  # s = e^0.1 = 1.105 > 1 + 4e-4 on both rows
    mask = t([[1, 1, 1], [1, 1, 1]]).bool()
    A = t([1.0, -1.0])
    loss, stats = policy_loss(l, old, None, A, mask, ratio_level="sequence", eps_low=3e-4, eps_high=4e-4,
                              num_sequences=2, num_tokens=6, group_size=2, max_completion_length=3)
    (g,) = torch.autograd.grad(loss, l)
    assert (g[0] == 0).all() and (g[1] != 0).all()  # A > 0 clipped; A < 0 keeps its gradient
    assert stats["clip_high_sum"] == 3 and stats["clip_low_sum"] == 0


# --------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------

_l = torch.zeros(4, 3)
_m = torch.ones(4, 3, dtype=torch.bool)
_norm = dict(num_sequences=4, num_tokens=12, group_size=2, max_completion_length=3)


_A = torch.zeros(4)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: group_advantages(torch.zeros(6), 3, scale="std"),
         r"scale must be one of 'group', 'batch', 'none'; got 'std'"),
        (lambda: group_advantages(torch.zeros(5), 2), r"N=5 is not divisible by group_size=2"),
        (lambda: group_advantages(torch.zeros(4), 1), r"group_size must be >= 2"),
        (lambda: group_advantages(torch.zeros(2, 2), 2), r"rewards must be 1-D"),
        (lambda: zero_variance_groups(torch.zeros(7), 2), r"N=7 is not divisible by group_size=2"),
        (lambda: importance_ratio(_l, _l, _m, level="tok"), r"level must be one of 'token', 'sequence'"),
        (lambda: kl_penalty(_l, _l, estimator="k4"), r"estimator must be one of 'k1', 'k2', 'k3'"),
        (lambda: aggregate(_l, _m, "mean", **_norm),
         r"mode must be one of 'sequence_mean', 'token_mean', 'constant_normalizer', 'group_sum'"),
        (lambda: aggregate(_l, _m, "group_sum", **{**_norm, "group_size": 3}),
         r"num_sequences=4 is not divisible by group_size=3"),
        (lambda: aggregate(_l, _m, "token_mean", **{**_norm, "num_sequences": 0}), r"num_sequences must be >= 1"),
        (lambda: policy_loss(_l, None, None, _A, _m, ratio_level="seq", **_norm),
         r"ratio_level must be one of 'token', 'sequence'"),
        (lambda: policy_loss(_l, None, None, _A, _m, kl_estimator="kl", **_norm),
         r"kl_estimator must be one of 'k1', 'k2', 'k3'"),
        (lambda: policy_loss(_l, None, None, _A, _m, aggregation="sum", **_norm),
         r"aggregation must be one of 'sequence_mean', 'token_mean', 'constant_normalizer', 'group_sum'"),
        (lambda: policy_loss(_l, None, None, _A, _m, beta=0.04, **_norm), r"beta=0.04 needs ref_logprobs"),
    ],
)
def test_bad_arguments_raise_value_error(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_every_fixed_choice_is_checked_by_the_one_check_choice(monkeypatch):
    """The maths' choices are refused in one form, by registry.check_choice: no module keeps a copy."""
    import grpo.algorithm as algorithm_package
    from grpo.algorithm import registry, token_weights

    seen = []

    def spy(name, value, allowed):
        seen.append(name)
        raise ValueError(f"spied {name}")

    modules = [m for m in vars(algorithm_package).values()
               if getattr(m, "__name__", "").startswith("grpo.algorithm.") and hasattr(m, "check_choice")]
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} >= {"advantages", "kl", "objective", "policy_losses",
                                                               "registry", "token_weights"}
    for m in modules:
        assert not hasattr(m, "_check_choice") and m.check_choice is registry.check_choice
    for m in modules:
        monkeypatch.setattr(m, "check_choice", spy)
    calls = [lambda: group_advantages(torch.zeros(6), 3, scale="std"),
             lambda: importance_ratio(_l, _l, _m, level="tok"),
             lambda: kl_penalty(_l, _l, estimator="k4"),
             lambda: aggregate(_l, _m, "mean", **_norm),
             lambda: token_weights.truncated_is_weights(_l, _l, _m, level="tok"),
             lambda: algorithm_package.ADVANTAGE_ESTIMATORS.get("nope")]
    for call in calls:
        with pytest.raises(ValueError, match="spied"):
            call()
    assert seen == ["scale", "level", "estimator", "mode", "level", "advantage_estimator"]
