"""Advantages: one scalar A_i per completion from the rewards of its group, given to all its tokens.

GRPO's baseline is the group itself: no value model (DeepSeekMath, Shao et al. 2024,
arXiv:2402.03300, section 4.1.2, outcome supervision). Rows p*G .. p*G+G-1 are prompt p's group.
The rewards are the weighted sum of the reward functions, or, when `reward_kl_coef` puts the KL
penalty in the reward (InstructGPT), that sum minus coef times each sequence's KL to the
reference (`kl.kl_penalised_rewards`); otherwise the KL penalty is a term of the loss (`beta`).

Estimators are registered by name (config key `advantage_estimator`); each is a pure function

    fn(rewards [N], group_size, *, eps, batch_rewards [N_all]) -> advantages [N]

`batch_rewards` holds the rewards of the whole optimizer batch over every process (equal to
`rewards` on one process), for estimators whose statistics are batch-wide: a normaliser counted
over the global batch, not over one process's share of it. An estimator that also takes
``weights`` [N] (per-completion sampling weights, e.g. `priority` with stochastic-beam groups) is
passed them when the rollout has them.

Registered: group, batch, none (DeepSeekMath, Dr. GRPO), rloo (Ahmadian et al. 2024),
reinforce_pp and reinforce_pp_baseline (REINFORCE++, Hu et al. 2025), priority (Kool et al. 2019);
process (DeepSeekMath's process supervision, per-token advantages [N, T]) in `process.py`.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .registry import Registry, check_choice

ADVANTAGE_ESTIMATORS = Registry("advantage_estimator")
register_adv_est = ADVANTAGE_ESTIMATORS.register

ADVANTAGE_SCALES = ("group", "batch", "none")


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
    "dynamic sampling" filters them out; here they are counted and reported). To count the groups
    the reward functions cannot rank, pass the rewards before a `reward_kl_coef` shift: the KL
    term differs between completions and unties almost every group.
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
    check_choice("scale", scale, ADVANTAGE_SCALES)
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


def _float(r: Tensor) -> Tensor:
    return r if r.is_floating_point() else r.to(torch.get_default_dtype())


@register_adv_est("rloo")
def leave_one_out(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740, eq. 6; Kool et al. 2019's "buy 4 REINFORCE
    samples"): each completion's baseline is the mean of the OTHER G - 1 rewards of its group,

        A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j  =  G / (G - 1) * (r_i - mu_g).

    Unlike the group mean, the baseline does not contain r_i itself, so it is independent of o_i
    and the policy gradient stays unbiased; no division by a standard deviation. It is Dr. GRPO's
    r_i - mu_g scaled by G / (G - 1). Written as the leave-one-out sum, not as the rescaling, so
    that it reads as the paper's; a tied group gets exactly 0.
    """
    r = _float(_groups(rewards, group_size))
    G = group_size
    others = (r.sum(dim=1, keepdim=True) - r) / (G - 1)
    advantages = r - others
    constant = zero_variance_groups(rewards, group_size)
    return torch.where(constant[:, None], 0.0, advantages).reshape(-1)


def _batch_std(x: Tensor) -> Tensor:
    return x.std() if x.numel() > 1 else x.new_zeros(())


@register_adv_est("reinforce_pp")
def reinforce_pp(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262, eq. 10): global advantage normalisation.

        A_i = (r_i - mean_B(r)) / (std_B(r) + eps),   B = the whole batch over every process.

    The paper's general variant: no per-prompt baseline at all (it works with one completion per
    prompt). The paper's token-level return is r - beta * sum_{s >= t} KL_s, the KL still to come
    from token t on. Here the advantage is one per sequence, so there is no per-token return: by
    default the KL penalty is in the loss (`beta`) and r is the task reward alone; with
    `reward_kl_coef` the KL is in the reward, and r arrives here already penalised by the whole
    sequence's KL, r - coef * sum_t (l_t - l^ref_t) (`kl.kl_penalised_rewards`), the paper's
    return at the first token, given to every token. std with Bessel's correction
    (as `batch`); a batch whose rewards are all equal gets exactly 0. Note what that means for
    groups: a group whose rewards are all 1 gets a POSITIVE
    advantage (it beats the batch mean), so zero-variance groups still push. For GRPO-style groups
    on a verifiable reward the paper recommends the group-baseline variant, `reinforce_pp_baseline`.
    """
    _groups(rewards, group_size)
    r, b = _float(rewards), _float(batch_rewards)
    if bool((b == b[0]).all()):  # every reward of the batch equal: exactly 0 (the mean may round off)
        return torch.zeros_like(r)
    return (r - b.mean()) / (_batch_std(b) + eps)


@register_adv_est("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor) -> Tensor:
    """REINFORCE++ with baseline (Hu et al. 2025, arXiv:2501.03262, section 3, k > 1 samples per
    prompt, "for complex reasoning tasks"): the group mean as baseline, then the global batch
    normalisation of the centred rewards,

        A~_i = r_i - mu_g,    A_i = (A~_i - mean_B(A~)) / (std_B(A~) + eps).

    mean_B(A~) is 0 up to rounding (every group's centred rewards sum to 0); it is subtracted all
    the same, as the paper's normalisation does. The difference from `batch` is which spread is
    divided by: `batch` uses the std of the raw rewards over the batch, this one the std of the
    group-centred rewards (the between-prompt spread removed). Tied groups get exactly 0.
    """
    centred = group_advantages(rewards, group_size, "none")
    batch_centred = group_advantages(batch_rewards, group_size, "none")
    constant = zero_variance_groups(rewards, group_size).repeat_interleave(group_size)
    advantages = (centred - batch_centred.mean()) / (_batch_std(batch_centred) + eps)
    return torch.where(constant, 0.0, advantages)


@register_adv_est("priority")
def priority_weighted(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor,
                      weights: Tensor | None = None) -> Tensor:
    """The group estimator for groups drawn WITHOUT replacement (`generation: stochastic_beam`),
    each completion weighted by its priority-sampling weight (Kool, van Hoof, Welling 2019,
    arXiv:1903.06059, section 4.2; Duffield et al. 2007):

        w_i = p(o_i) / q_i(kappa),   q_i(kappa) = P(G_phi_i > kappa) = 1 - exp(-exp(phi_i - kappa)),

    (`engine.stochastic_beam.priority_weights`), for which E[sum_{i in group} w_i f(o_i)] = E_p[f]
    exactly. Self-normalised, w~_i = w_i / sum_j w_j (the paper's "normalized" estimator: lower
    variance, bias O(1/G)):

        b = sum_j w~_j r_j,   s^2 = G / (G - 1) * sum_j w~_j (r_j - b)^2,
        A_i = G * w~_i * (r_i - b) / (s + eps).

    b estimates E_p[r] (the plain group mean of distinct completions does not), and the factor
    G * w~_i gives each completion the weight its probability deserves in the gradient of
    E_p[r] once the loss averages over the G rows. With equal weights this is exactly `group`
    (DeepSeekMath's (r_i - mu) / (sigma + eps)). A tied group gets exactly 0.
    """
    if weights is None:
        raise ValueError("advantage_estimator 'priority' needs the sampling weights of stochastic-beam "
                         "groups (generation: stochastic_beam)")
    r = _float(_groups(rewards, group_size))
    G = group_size
    w = weights.reshape(r.shape).to(r.dtype)
    w = w / w.sum(dim=1, keepdim=True)
    b = (w * r).sum(dim=1, keepdim=True)
    s = ((w * (r - b).square()).sum(dim=1, keepdim=True) * G / (G - 1)).sqrt()
    advantages = G * w * (r - b) / (s + eps)
    constant = zero_variance_groups(rewards, group_size)
    return torch.where(constant[:, None], 0.0, advantages).reshape(-1)


def compute_advantages(name: str, rewards: Tensor, group_size: int, *, eps: float,
                       batch_rewards: Tensor | None = None, weights: Tensor | None = None, steps=None) -> Tensor:
    """The registered estimator `name` applied to one step's rewards (float32 out): [N], or [N, T]
    for an estimator of per-token advantages (`process`). `weights` (per-completion sampling
    weights) and `steps` (`process.StepRewards`) go to the estimators that take them by name."""
    fn = ADVANTAGE_ESTIMATORS.get(name)
    takes = inspect.signature(fn).parameters
    extra = {k: v for k, v in (("weights", weights), ("steps", steps)) if v is not None and k in takes}
    return fn(rewards, group_size, eps=eps, batch_rewards=rewards if batch_rewards is None else batch_rewards,
              **extra).float()
