"""Per-token factors on the policy gradient: truncated importance sampling (off-policy correction)
and high-entropy token selection; and the one-update-per-rollout special case made explicit."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm import (POLICY_LOSSES, entropy_threshold, group_advantages, high_entropy_mask, policy_loss,
                            sampler_mismatch, truncated_is_weights)
from test_algorithm import SHAPES, close, random_batch, t


def naive_tis(old, samp, m, level, cap):
    out = []
    for i in range(len(old)):
        if level == "token":
            out.append([min(math.exp(old[i][t_] - samp[i][t_]), cap) if m[i][t_] else 1.0
                        for t_ in range(len(old[i]))])
        else:
            s = sum(old[i][t_] - samp[i][t_] for t_ in range(len(old[i])) if m[i][t_])
            w = min(math.exp(s), cap)
            out.append([w if m[i][t_] else 1.0 for t_ in range(len(old[i]))])
    return out


def test_tis_by_hand():
    old = t([[-1.0, -2.0, 5.0], [-0.5, -0.5, 0.0]])
    samp = t([[-1.5, -1.0, -math.inf], [-1.0, -1.0, 0.0]])
    m = t([[1, 1, 0], [1, 1, 0]]).bool()
    # Token: e^0.5 = 1.65 (capped at 1.5) and e^-1; sequence: e^(0.5 - 1) = e^-0.5, and e^1 capped.
    assert close(truncated_is_weights(old, samp, m, "token", 1.5), [[1.5, math.exp(-1), 1], [1.5, 1.5, 1]])
    assert close(truncated_is_weights(old, samp, m, "sequence", 1.5),
                 [[math.exp(-0.5), math.exp(-0.5), 1], [1.5, 1.5, 1]])
    # A token the sampler found impossible to be this likely: exp overflows, the cap takes it back.
    assert truncated_is_weights(t([[0.0]]), t([[-1e4]]), t([[1]]).bool(), "token", 2.0).item() == 2.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_matches_naive(shape, level):
    b = random_batch(*shape, seed=3 + sum(shape))
    samp = torch.where(b.mask, b.old + 0.4 * torch.randn_like(b.old), math.nan)
    for cap in (1.0, 2.0, 10.0):
        w = truncated_is_weights(b.old, samp, b.mask, level, cap)
        assert close(w, naive_tis(b.old.tolist(), samp.tolist(), b.mask.tolist(), level, cap), 1e-12)


@pytest.mark.parametrize("loss_mode", ["ppo_clip", "cispo", "gmpo"])
def test_one_update_per_rollout_is_the_detached_policy_and_weights_are_exactly_one(loss_mode):
    """pi_old = pi_theta.detach() at one update per rollout: old_logprobs=None is that special
    case, and with a sampler that agrees with the trainer every importance weight is exactly 1
    and changes nothing."""
    b = random_batch(3, 4, 6, seed=21)
    A = group_advantages(b.rewards, b.G)
    results = []
    for old, weights in ((None, None), ("detached", None), ("detached", "ones")):
        l = b.logprobs.clone().requires_grad_()
        anchor = None if old is None else l.detach().clone()
        w = None
        if weights:
            w = truncated_is_weights(l.detach(), l.detach().clone(), b.mask, "token", 2.0)
            assert bool((w == 1).all())
            assert bool((truncated_is_weights(l.detach(), l.detach().clone(), b.mask, "sequence", 2.0) == 1).all())
        loss, stats = policy_loss(l, anchor, None, A, b.mask, loss_mode=loss_mode, eps_low=0.2, eps_high=0.28,
                                  is_weights=w, **b.norm())
        results.append((loss.detach(), torch.autograd.grad(loss, l)[0], stats.get("is_weight_sum")))
    for loss, grad, _ in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    assert results[2][2] == int(b.mask.sum())


@pytest.mark.parametrize("loss_mode", list(POLICY_LOSSES.names()))
def test_weights_scale_each_tokens_policy_gradient(loss_mode):
    """With weights w_t, the loss is the surrogate's per-token terms times w_t (constants): at one
    update per rollout the gradient is w_t times the unweighted one, for every registered loss."""
    b = random_batch(2, 3, 5, seed=4)
    A = group_advantages(b.rewards, b.G)
    samp = torch.where(b.mask, b.logprobs + 0.5 * torch.randn_like(b.old), 0.0)
    w = truncated_is_weights(b.logprobs, samp, b.mask, "token", 1.7)
    assert (w < 1).any() and (w == 1.7).any()
    grads = []
    for weights in (None, w):
        l = b.logprobs.clone().requires_grad_()
        loss, _ = policy_loss(l, None, None, A, b.mask, loss_mode=loss_mode, aggregation="token_mean",
                              is_weights=weights, **b.norm())
        grads.append(torch.autograd.grad(loss, l)[0])
    if loss_mode == "gmpo":
        # One loss per sequence (-A s_i on each of its tokens), so each token's gradient comes
        # from all of them: the row's mean weight scales it.
        length = b.mask.sum(-1, keepdim=True).clamp(min=1)
        w = (torch.where(b.mask, w, 0.0).sum(-1, keepdim=True) / length).expand_as(w)
    assert close(grads[1], torch.where(b.mask, w * grads[0], 0.0), 1e-12)


def test_entropy_mask_by_hand():
    # Valid entropies 0.1 0.5 0.9 0.3 0.7; rho = 0.4: the 0.6-quantile of the sorted five is at
    # position 0.6 * 4 = 2.4, 0.5 + 0.4 * (0.7 - 0.5) = 0.58 -> tokens 0.9 and 0.7 (40%) are kept.
    H = t([[0.1, 0.5, 0.9], [0.3, 99.0, 0.7]])
    m = t([[1, 1, 1], [1, 0, 1]]).bool()
    assert high_entropy_mask(H, m, 0.4).tolist() == [[False, False, True], [False, False, True]]
    assert torch.equal(high_entropy_mask(H, m, 1.0), m)
    # TRL's own test: 10 valid tokens, top 20% -> the 2 highest.
    H = torch.arange(12, dtype=torch.float64).view(2, 6) / 10
    m = torch.ones(2, 6, dtype=torch.bool)
    m[1, 4:] = False
    assert high_entropy_mask(H, m, 0.2).nonzero().tolist() == [[1, 2], [1, 3]]
    # Against the threshold of a population (the whole batch over processes), not of the rows passed.
    tau = entropy_threshold(t([0.0, 0.1, 0.2, 0.3]), 0.5)
    assert close(tau, 0.15, 1e-6) and high_entropy_mask(t([[0.2, 0.4]]), t([[1, 1]]).bool(), 0.5, tau).all()


def test_entropy_selection_keeps_the_normaliser_and_zeroes_other_tokens():
    """J = (1 / sum |o|) sum 1[H >= tau] L_t: the selected tokens keep exactly their gradient, the
    others get none, and the denominator still counts every token."""
    b = random_batch(2, 4, 6, seed=9)
    A = group_advantages(b.rewards, b.G)
    H = torch.rand(b.N, b.T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keep = high_entropy_mask(H, b.mask, 0.2)
    assert 0 < keep.sum() < b.mask.sum()
    out = {}
    for pg_mask in (None, keep):
        l = b.logprobs.clone().requires_grad_()
        loss, stats = policy_loss(l, None, None, A, b.mask, aggregation="token_mean", pg_mask=pg_mask, **b.norm())
        out[pg_mask is None] = (loss, torch.autograd.grad(loss, l)[0], stats)
    full, part = out[True], out[False]
    assert close(part[1], torch.where(keep, full[1], 0.0), 1e-12)
    assert part[2]["pg_token_count"] == keep.sum() and part[2]["token_count"] == b.mask.sum()
    # token_mean at one update: L_t = -A_i; the loss is the kept tokens' sum over ALL tokens.
    expected = -(torch.where(keep, A[:, None].expand_as(keep), 0.0)).sum() / b.mask.sum()
    assert close(part[0], expected, 1e-12)


def test_sampler_mismatch_by_hand():
    """Mean log pi_sampler - log pi_old and the capped tokens, over valid tokens only."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 9.0]])
    samp = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = truncated_is_weights(old, samp, mask, "token", cap=1.5)
    # ratios exp(old - samp): e^0.5 = 1.65 (capped), e^-1, 1, e^-2.5, 1; the masked 9 vs -9 never counts.
    diff, capped = sampler_mismatch(old, samp, w, mask, cap=1.5)
    assert math.isclose(diff, (-0.5 + 1.0 + 0.0 + 2.5 + 0.0), abs_tol=1e-6) and capped == 1.0
