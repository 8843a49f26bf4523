"""Rewards of a step: r_i = sum_k w_k * R_k(prompt, completion, row columns).

`build_rewards` turns the config's `rewards:` entries into named, weighted reward functions
(a user's function, a built-in, or a reward model); `score` calls each once for all N completions
and checks what it returned.
"""

from __future__ import annotations

import inspect
import math
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from grpo.config.train import RewardSpec
from grpo.errors import RewardError

from .functions import load_function
from .models import EnsembleScorer, RewardModelScorer


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
            members = [RewardModelScorer(path, device, dtype, batch_size=spec.batch_size, normalize=spec.normalize,
                                         max_length=spec.max_length, clip=spec.clip)
                       for path in (spec.model if isinstance(spec.model, list) else [spec.model])]
            fn = members[0] if len(members) == 1 else EnsembleScorer(members, spec.ensemble)
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


def check_signatures(rewards: list[Reward], columns: list[str]) -> None:
    """Every reward function can be called as fn(prompts=..., completions=..., **columns) with this
    dataset's columns: a mismatch stops the run before any model is loaded, as a signature
    problem (a TypeError raised later, inside the function, is the function's own bug)."""
    for r in rewards:
        try:
            signature = inspect.signature(r.fn)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        try:
            signature.bind(prompts=[], completions=[], **{c: [] for c in columns})
        except TypeError as e:
            raise RewardError(f"reward {r.name!r}: {getattr(r.fn, '__name__', 'fn')}{signature} cannot be called "
                              f"as fn(prompts=..., completions=..., **columns) with this dataset's columns "
                              f"{sorted(columns)}: {e}") from None


def _user_frame(error: BaseException, fn) -> str:
    """Where in the user's code an exception was raised: the innermost frame in the reward
    function's own file (else the innermost frame of all)."""
    frames = traceback.extract_tb(error.__traceback__)
    home = getattr(getattr(fn, "__code__", None), "co_filename", None)
    mine = [f for f in frames if f.filename == home] or frames
    return f" (at {mine[-1].filename}:{mine[-1].lineno}, in {mine[-1].name})" if mine else ""


def call_reward(r: Reward, timeout: float | None, **kwargs) -> list:
    """r.fn(**kwargs) in a worker thread, so that a function that never returns stops the run after
    `timeout` seconds with its name instead of hanging it (the thread is a daemon: it dies with
    the process). Its own exceptions come back as one line naming the function and its line."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = r.fn(**kwargs)
        except BaseException as e:  # delivered to the caller below
            outcome["error"] = e

    worker = threading.Thread(target=run, name=f"reward {r.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(f"reward {r.name!r} did not return within reward_timeout={timeout:g} s; "
                          f"raise reward_timeout if it is just slow")
    if "error" in outcome:
        e = outcome["error"]
        raise RewardError(f"reward {r.name!r} failed: {type(e).__name__}: {e}{_user_frame(e, r.fn)}") from None
    return outcome["value"]


def _as_floats(r: Reward, values, n: int) -> list[float]:
    if values is None:
        raise RewardError(f"reward {r.name!r} returned None; expected a list of {n} floats")
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise RewardError(f"reward {r.name!r} returned a {type(values).__name__} ({str(values)[:40]}); "
                          f"expected a list of {n} floats, one per completion")
    values = list(values)  # a generator, tuple, array or tensor is fine
    if len(values) != n:
        raise RewardError(f"reward {r.name!r} returned {len(values)} values; expected a list of {n} floats")
    out = []
    for v in values:
        if v is None:  # TRL's convention: this reward does not apply to this completion
            out.append(math.nan)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward {r.name!r} returned non-numeric values: {values[:4]}...") from None
        if not math.isfinite(v):
            raise RewardError(f"reward {r.name!r} returned NaN or infinite values")
        out.append(v)
    return out


def score(rewards: list[Reward], prompts: list[str], completions: list[str],
          columns: dict[str, list], timeout: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total [N] and each reward's unweighted values [N], checked for shape and NaN.

    A `None` entry means "does not apply" (TRL's convention): it is NaN in the reward's own values
    and counts 0 in the weighted total. `timeout` bounds each function call (config key
    `reward_timeout`)."""
    per_reward, total = {}, torch.zeros(len(completions), dtype=torch.float32)
    for r in rewards:
        values = call_reward(r, timeout, prompts=prompts, completions=completions, **columns)
        t = torch.tensor(_as_floats(r, values, len(completions)), dtype=torch.float32)
        per_reward[r.name] = t
        total += r.weight * torch.nan_to_num(t, nan=0.0)
    return total, per_reward
