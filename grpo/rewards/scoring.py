"""Rewards of a step: r_i = sum_k w_k * R_k(prompt, completion, row columns).

`build_rewards` turns the config's `rewards:` entries into named, weighted reward functions
(a user's function, a built-in, or a reward model); `score` calls each once for all N completions
and checks what it returned.

The call is TRL's (GRPOTrainer's "Using a custom reward function"): every function gets, as
keywords, `prompts` and `completions` (strings; for conversational data the prompt's messages
and [{"role": "assistant", "content": text}]) and every dataset column but the prompt; and, when
its signature takes them (by name or **kwargs), `completion_ids` (each completion's token ids,
EOS included), `trainer_state` (global_step, max_steps, epoch), `log_metric(name, value)` (a
scalar averaged over the step into metrics.jsonl and TensorBoard) and `log_extra(column,
values)` (a column of samples.jsonl and the sample tables). A `None` value means "does not
apply here": NaN in that reward's own values, 0 in the weighted sum. `async def` functions are
awaited concurrently, after the others, as TRL does. A reward model reads the policy's formatted
text instead (`model_texts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from grpo.config.train import RewardSpec
from grpo.errors import RewardError

from .functions import load_function
from .models import EnsembleScorer, RewardModelScorer


# The keywords TRL passes besides prompts, completions and the columns; a function gets each one
# its signature takes. No dataset column may use these names (nor prompts / completions).
TRL_KEYWORDS = ("completion_ids", "trainer_state", "log_extra", "log_metric")
RESERVED_COLUMNS = ("prompts", "completions", *TRL_KEYWORDS)


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0
    _keywords: tuple | None = field(default=None, repr=False)  # what its signature takes (None: anything)

    def __post_init__(self):
        try:
            parameters = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # no signature to read: pass only the required keywords
            self._keywords = ()
            return
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            self._keywords = tuple(p.name for p in parameters)

    def accepts(self, keyword: str) -> bool:
        return self._keywords is None or keyword in self._keywords

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(getattr(self.fn, "__call__", None))


class RewardLog:
    """What reward functions logged through TRL's two hooks during one step (or one evaluation).
    The hooks may be called from worker threads (list appends are atomic under the GIL)."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        """TRL's `log_metric`: a scalar, averaged over the step and logged beside the trainer's metrics."""
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        """TRL's `log_extra`: a column of per-completion values for the sample tables."""
        self.extra.setdefault(str(column), []).extend(list(values))

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.metrics.items() if v}


def reward_name(fn) -> str:
    """TRL's name for a reward function: its __name__ (a partial's function's, or its class's)."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or type(fn).__name__


def build_rewards(entries: list, device: torch.device, dtype: torch.dtype) -> list[Reward]:
    """Load every reward of the run (`rewards:` entries: mappings, strings, Python functions or
    RewardSpec); names are made unique (a second `exact_answer` is `exact_answer_`)."""
    rewards, names = [], set()
    for i, entry in enumerate(entries):
        spec = entry if isinstance(entry, RewardSpec) else RewardSpec.parse(entry, f"rewards[{i}]", _bad)
        if callable(spec.function):
            fn, default_name = spec.function, reward_name(spec.function)
        elif spec.function:
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


def reads_model_text(r: Reward) -> bool:
    """A reward model (or an ensemble of them): it reads the formatted prompt text the policy saw."""
    return bool(getattr(r.fn, "reads_model_text", False))


@contextlib.contextmanager
def evaluating(rewards: list[Reward]):
    """Held-out evaluation: rewards that learn from what they score (a reward model's running
    moments) leave their state as it is inside the block."""
    learners = [r.fn for r in rewards if hasattr(r.fn, "learning")]
    for fn in learners:
        fn.learning = False
    try:
        yield
    finally:
        for fn in learners:
            fn.learning = True


def reward_states(rewards: list[Reward]) -> dict:
    """The state of every reward that keeps one (a reward model's running moments), for a checkpoint."""
    return {r.name: r.fn.state_dict() for r in rewards if callable(getattr(r.fn, "state_dict", None))}


def load_reward_states(rewards: list[Reward], states: dict) -> None:
    for r in rewards:
        if r.name in states:
            r.fn.load_state_dict(states[r.name])


def check_signatures(rewards: list[Reward], columns: list[str]) -> None:
    """Every reward function can be called as fn(prompts=..., completions=..., **columns) with this
    dataset's columns (and TRL's other keywords it names): a mismatch stops the run before any
    model is loaded, as a signature problem (a TypeError raised later, inside the function, is the
    function's own bug)."""
    for r in rewards:
        try:
            signature = inspect.signature(r.fn)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        extra = {} if reads_model_text(r) else {k: None for k in TRL_KEYWORDS if r.accepts(k)}
        try:
            signature.bind(prompts=[], completions=[], **{c: [] for c in columns}, **extra)
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
            value = r.fn(**kwargs)
            if inspect.isawaitable(value):  # e.g. a partial or a lambda around an async def
                value = asyncio.run(_wait(value))
            outcome["value"] = value
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


async def _wait(awaitable):
    return await awaitable


def call_async_rewards(rewards: list[Reward], timeout: float | None, kwargs_for) -> dict[str, Any]:
    """The `async def` rewards, awaited concurrently (asyncio.gather, as TRL) on an event loop of
    their own in a worker thread; each is bounded by `timeout`, and the thread too, in case a
    coroutine blocks its loop."""
    outcome: dict = {}

    async def one(r: Reward):
        try:
            return await asyncio.wait_for(r.fn(**kwargs_for(r)), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return _TimedOut()

    async def everyone():
        return await asyncio.gather(*(one(r) for r in rewards), return_exceptions=True)

    def run():
        try:
            outcome["values"] = asyncio.run(everyone())
        except BaseException as e:
            outcome["error"] = e

    worker = threading.Thread(target=run, name="async rewards", daemon=True)
    worker.start()
    worker.join(None if timeout is None else timeout * 1.1 + 0.5)
    names = [r.name for r in rewards]
    if worker.is_alive() or "error" in outcome:
        raise RewardError(f"async rewards {names} did not return within reward_timeout={timeout:g} s (one of "
                          f"them blocks its event loop?)" if worker.is_alive() else
                          f"async rewards {names} failed: {type(outcome['error']).__name__}: {outcome['error']}")
    out = {}
    for r, value in zip(rewards, outcome["values"]):
        if isinstance(value, _TimedOut):
            raise RewardError(f"reward {r.name!r} did not return within reward_timeout={timeout:g} s; "
                              f"raise reward_timeout if it is just slow")
        if isinstance(value, BaseException):
            raise RewardError(f"reward {r.name!r} failed: {type(value).__name__}: {value}{_user_frame(value, r.fn)}")
        out[r.name] = value
    return out


class _TimedOut:
    pass


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


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list],
          timeout: float | None = None, *, completion_ids: list | None = None, trainer_state: Any = None,
          log_metric: Callable | None = None, log_extra: Callable | None = None,
          model_texts: tuple[list[str], list[str]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total [N] and each reward's unweighted values [N], checked for shape and NaN.

    A `None` entry means "does not apply" (TRL's convention): it is NaN in the reward's own values
    and counts 0 in the weighted total. `timeout` bounds each function call (config key
    `reward_timeout`). The keywords after it are TRL's extra arguments (module docstring), each
    passed to the functions that take it; `model_texts` is (formatted prompts, completion texts)
    for reward models (default: `prompts`, `completions`)."""
    extras = {"completion_ids": completion_ids, "trainer_state": trainer_state, "log_metric": log_metric,
              "log_extra": log_extra}

    def kwargs_for(r: Reward) -> dict:
        if reads_model_text(r):
            texts, answers = model_texts or (prompts, completions)
            return dict(prompts=texts, completions=answers, **columns)
        given = {k: v for k, v in extras.items() if v is not None and r.accepts(k)}
        return dict(prompts=prompts, completions=completions, **columns, **given)

    outputs = {r.name: call_reward(r, timeout, **kwargs_for(r)) for r in rewards if not r.is_async}
    pending = [r for r in rewards if r.is_async]
    if pending:
        outputs.update(call_async_rewards(pending, timeout, kwargs_for))
    per_reward, total = {}, torch.zeros(len(completions), dtype=torch.float32)
    for r in rewards:
        t = torch.tensor(_as_floats(r, outputs[r.name], len(completions)), dtype=torch.float32)
        per_reward[r.name] = t
        total += r.weight * torch.nan_to_num(t, nan=0.0)
    return total, per_reward
