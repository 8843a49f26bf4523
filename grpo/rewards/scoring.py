"""Rewards of a step: r_i = sum_k w_k * R_k(prompt, completion, row columns).

`build_rewards` turns the config's `rewards:` entries into named, weighted reward functions
(a user's function, a built-in, or a reward model); `score` calls each once for all N completions
and checks what it returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from grpo.config.train import RewardSpec
from grpo.errors import RewardError

from .functions import load_function
from .models import RewardModelScorer


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0


def build_rewards(entries: list, device: torch.device, dtype: torch.dtype) -> list[Reward]:
    """Load every reward of the run (`rewards:` entries: mappings, strings or RewardSpec); names
    are made unique (a second `exact_answer` is `exact_answer_`)."""
    rewards, names = [], set()
    for i, entry in enumerate(entries):
        spec = entry if isinstance(entry, RewardSpec) else RewardSpec.parse(entry, f"rewards[{i}]", _bad)
        if spec.function:
            fn = load_function(spec.function)
            default_name = spec.function.rsplit(":", 1)[-1]
        else:
            fn = RewardModelScorer(spec.model, device, dtype, batch_size=spec.batch_size,
                                   normalize=spec.normalize, max_length=spec.max_length)
            default_name = "rm_" + fn.__name__
        name = spec.name or default_name
        while name in names:
            name += "_"
        names.add(name)
        rewards.append(Reward(name, fn, float(spec.weight)))
    return rewards


def _bad(key: str, msg: str):
    raise RewardError(f"{key}: {msg}")


def reward_states(rewards: list[Reward]) -> dict:
    """The state of every reward that keeps one (a reward model's running moments), for a checkpoint."""
    return {r.name: r.fn.state_dict() for r in rewards if callable(getattr(r.fn, "state_dict", None))}


def load_reward_states(rewards: list[Reward], states: dict) -> None:
    for r in rewards:
        if r.name in states:
            r.fn.load_state_dict(states[r.name])


def score(rewards: list[Reward], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total [N] and each reward's unweighted values [N], checked for shape and NaN."""
    per_reward, total = {}, torch.zeros(len(completions), dtype=torch.float32)
    for r in rewards:
        try:
            values = r.fn(prompts, completions, **columns)
        except TypeError as e:
            raise RewardError(f"reward {r.name!r} failed: {e}. Reward functions are called as "
                              f"fn(prompts, completions, **columns) with columns {sorted(columns)}") from None
        if values is None or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values"
            raise RewardError(f"reward {r.name!r} returned {got}; expected a list of {len(completions)} floats")
        try:
            t = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise RewardError(f"reward {r.name!r} returned non-numeric values: {list(values)[:4]}...") from None
        if not torch.isfinite(t).all():
            raise RewardError(f"reward {r.name!r} returned NaN or infinite values")
        per_reward[r.name] = t
        total += r.weight * t
    return total, per_reward
