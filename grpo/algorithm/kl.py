"""The KL penalty to the frozen reference policy, per token (config keys `beta`, `kl_estimator`).

J. Schulman, "Approximating KL Divergence", 2020: the k1, k2, k3 estimators. A small fixed choice,
so a plain branch rather than a registry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import check_choice

KL_ESTIMATORS = ("k1", "k2", "k3")

# exp(20) ~ 5e8: far beyond any useful penalty, far below float32 overflow (~exp(88)).
KL_LOG_RATIO_CLAMP = 20.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta: [N, T].

    With d_t = l^ref_t - l_t = log(pi_ref / pi_theta) at the sampled token:

    - ``k1`` = -d: unbiased, high variance, can be negative per token.
    - ``k2`` = d^2 / 2: biased, low variance, >= 0.
    - ``k3`` = exp(d) - d - 1 (DeepSeekMath eq. 4): unbiased and >= 0, since E[exp(d)] = 1
      under pi_theta; its gradient vanishes at pi_theta = pi_ref.

    For ``k3`` d is clamped to [-20, 20] before exp, so a token the reference finds impossible
    (l^ref = -inf) gives a large finite penalty rather than inf/NaN; beyond the clamp the penalty's
    gradient is zero, a deliberate trade of exactness for stability (as in verl's ``low_var_kl``).
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    d = d.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


def kl_penalised_rewards(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         coef: float) -> tuple[Tensor, Tensor]:
    """The KL penalty in the reward (InstructGPT, Ouyang et al. 2022, eq. 2):
    r_i - coef * sum_t m_t (l_t - l^ref_t), the sampled sequence's k1 estimate of
    KL(pi || pi_ref) (l_t: the log-probs the tokens were sampled with). Returns the penalised
    rewards [N] and the per-sequence KL [N]. Masked positions are selected away, not multiplied."""
    valid = mask.bool()
    kl = torch.where(valid, logprobs - ref_logprobs, 0.0).sum(-1)
    return rewards - coef * kl.to(rewards), kl
