"""Process supervision: step rewards turned into per-token advantages [N, T].

DeepSeekMath (Shao et al. 2024, arXiv:2402.03300, section 4.1.3, "Process Supervision RL with
GRPO"). Each completion o_i is cut into K_i steps; step j ends at token index(j) and gets a reward
r_i^(j). Every step reward of the group (the set R, all steps of all G outputs) is normalised
together, and token t's advantage is the sum of the normalised rewards of the steps that end at
or after it:

    r~_i^(j) = (r_i^(j) - mean(R)) / (std(R) + eps),      A_(i,t) = sum_{j: index(j) >= t} r~_i^(j).

The outcome reward is a final step (DeepSeekMath's outcome supervision is the case K_i = 1 with
index(1) the last token): with `outcome` it joins R as one more step reward ending at the
completion's last token, so that with no other step the result is exactly the `group`
estimator's A_i on every token. std has Bessel's correction (as `group`), and a group whose step
rewards all tie gets exactly 0.

Steps are passed as `StepRewards`, padded tensors: row i holds K_i valid entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .advantages import _groups, register_adv_est


@dataclass
class StepRewards:
    """The step rewards of N completions, padded to S steps: entries with ``valid`` False are padding."""
    scores: Tensor   # [N, S] float: r_i^(j), the weighted sum of the step reward functions
    ends: Tensor     # [N, S] long: index(j), the completion token (0-based) on which step j ends
    valid: Tensor    # [N, S] bool
    lengths: Tensor  # [N] long: tokens of each completion, EOS included (the outcome's token is lengths - 1)
    width: int       # T: the completion tensor's width, the advantages' second dimension
    outcome: bool = True  # the outcome reward (`rewards`) joins R as a final step


def with_outcome(steps: StepRewards, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scores, ends, valid) with the outcome reward r_i as one more step ending on token lengths_i - 1."""
    last = (steps.lengths.long() - 1).clamp(min=0)
    return (torch.cat([steps.scores.to(rewards.dtype), rewards[:, None]], dim=1),
            torch.cat([steps.ends.long(), last[:, None]], dim=1),
            torch.cat([steps.valid.bool(), last.new_ones(len(last), 1, dtype=torch.bool)], dim=1))


def process_advantages(scores: Tensor, ends: Tensor, valid: Tensor, group_size: int, width: int,
                       eps: float) -> Tensor:
    """A_(i,t) of DeepSeekMath section 4.1.3 from padded step rewards [N, S]: -> [N, T = width]."""
    N, S = scores.shape
    _groups(scores.new_zeros(N), group_size)  # the layout check the other estimators make
    if bool(((ends < 0) | (ends >= width))[valid].any()):
        raise ValueError(f"step ends must be token indices in [0, {width}); got {ends[valid].tolist()}")
    r = scores.to(torch.get_default_dtype()) if not scores.is_floating_point() else scores
    g_r, g_valid = r.reshape(-1, group_size * S), valid.reshape(-1, group_size * S)
    normalised = torch.zeros_like(g_r)
    for p in range(g_r.shape[0]):  # a group's set R has as many members as its steps: one group at a time
        R = g_r[p][g_valid[p]]
        if R.numel() and not bool((R == R[0]).all()):  # all tied: exactly 0 (the mean may round off)
            normalised[p][g_valid[p]] = (R - R.mean()) / (R.std() + eps)
    normalised = normalised.reshape(N, S)
    # Scatter each normalised reward onto its end token, then sum from the right: A_t = sum_{index >= t}.
    at_end = torch.zeros(N, width, dtype=normalised.dtype, device=scores.device)
    at_end.scatter_add_(1, torch.where(valid, ends, 0).long(), normalised)
    return at_end.flip(1).cumsum(1).flip(1)


@register_adv_est("process")
def process(rewards: Tensor, group_size: int, *, eps: float, batch_rewards: Tensor,
            steps: StepRewards | None = None) -> Tensor:
    """Process supervision (DeepSeekMath 4.1.3): per-token advantages [N, T] from `steps`, the
    outcome reward `rewards` [N] joining them as a final step when `steps.outcome`."""
    if steps is None:
        raise ValueError("advantage_estimator 'process' needs the completions' steps and step rewards")
    if steps.outcome:
        scores, ends, valid = with_outcome(steps, rewards if rewards.is_floating_point() else rewards.float())
    else:
        scores, ends, valid = steps.scores, steps.ends, steps.valid
    return process_advantages(scores, ends, valid, group_size, steps.width, eps)
