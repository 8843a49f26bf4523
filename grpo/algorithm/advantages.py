"""Advantages: one scalar A_i per completion from the rewards of its group, given to all its tokens.

GRPO's baseline is the group itself: no value model (DeepSeekMath, Shao et al. 2024,
arXiv:2402.03300, section 4.1.2, outcome supervision). Rows p*G .. p*G+G-1 are prompt p's group.

Estimators are registered by name (config key `advantage_estimator`); each is a pure function

    fn(rewards [N], group_size, *, eps, batch_rewards [N_all]) -> advantages [N]

`batch_rewards` holds the rewards of the whole optimizer batch over every process (equal to
`rewards` on one process), for estimators whose statistics are batch-wide: a normaliser counted
over the global batch, not over one process's share of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage_estimator")
register_adv_est = ADVANTAGE_ESTIMATORS.register

ADVANTAGE_SCALES = ("group", "batch", "none")


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


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[P] bool, True where all G rewards of prompt p's group are equal.

    Such a group gives every completion A_i = 0, so it contributes no policy gradient (DAPO's
    "dynamic sampling" filters them out; here they are counted and reported).
    """
    r = _groups(rewards, group_size)
    return (r == r[:, :1]).all(dim=1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages A_i, one per completion: [N] -> [N].

    The group mean is the baseline, replacing PPO's value model (DeepSeekMath, section 4.1.2:
    A_i = (r_i - mean(r)) / std(r), given to every token of o_i). ``scale``:

    - ``group``: (r_i - mu_g) / (sigma_g + eps), sigma over the G rewards of the group (DeepSeekMath).
    - ``batch``: (r_i - mu_g) / (sigma_batch + eps), sigma over all N rewards passed in; keeps
      the baseline per group but stops easy/hard groups (small sigma_g) from being up-weighted.
    - ``none``: r_i - mu_g (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783: dividing by sigma_g
      biases towards too easy/too hard prompts).

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
# The registered estimators


@register_adv_est("group")
def group_normalised(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """DeepSeekMath's A_i = (r_i - mu_g) / (sigma_g + eps)."""
    return group_advantages(rewards, group_size, "group", eps)


@register_adv_est("batch")
def batch_normalised(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """(r_i - mu_g) / (sigma_batch + eps), sigma over the whole batch of every process."""
    sigma = batch_rewards.std() if batch_rewards.numel() > 1 else batch_rewards.new_zeros(())
    return group_advantages(rewards, group_size, "none") / (sigma + eps)


@register_adv_est("none")
def group_centred(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """Dr. GRPO's A_i = r_i - mu_g (no division by a standard deviation)."""
    return group_advantages(rewards, group_size, "none")


def compute_advantages(name: str, rewards: Tensor, group_size: int, *, eps: float,
                       batch_rewards: Tensor | None = None) -> Tensor:
    """The registered estimator `name` applied to one step's rewards (float32 out)."""
    fn = ADVANTAGE_ESTIMATORS.get(name)
    return fn(rewards, group_size, eps=eps, batch_rewards=rewards if batch_rewards is None else batch_rewards).float()
