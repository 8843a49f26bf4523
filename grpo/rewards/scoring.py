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
values)` (a column of samples.jsonl and the sample tables); in an agent run with an
environment class, `environments` (each episode's instance, as its episode left it). `async def` functions are awaited
concurrently, after the others, as TRL does. A reward model reads the policy's formatted text
instead (`model_texts`).

What a function may return: one value per completion, each a real number (int, float, a numpy or
0-d torch scalar, Decimal, Fraction) or None. Every other value stops the run with a RewardError
naming the function, the value and its type:

- bool counts as 1 / 0, as TRL's torch.tensor(values) counts it (a verifier returning
  `answer == target` is common and meant as 1 / 0).
- A string, even "1.0", is refused: TRL's torch.tensor(values) refuses it too, and a reward that
  returns text has usually returned the wrong thing (a parsed answer, not its score).
- NaN and +-inf are refused, and so is any value beyond float32's range (|r| > 3.4e38): the
  rewards are float32 tensors, where such a value becomes inf and then NaN in the advantages, and
  a run would train on nothing while exiting 0. TRL counts an explicit NaN as None; here a NaN is
  refused instead, because it is far more often a bug (0 / 0) than a choice, and a bug read as
  "does not apply" is silent. Return None for "does not apply".
- The weighted sum is checked as well: weights can push finite values out of float32's range.

None means "this reward does not apply to this completion" (TRL's contract): NaN in that
reward's own values, counted out (0) of the weighted sum, as TRL's nansum does. Some None is
normal (a code reward on a maths row); None on a larger scale is a symptom, so:

- a reward that returns None for every completion of a call: a warning naming it, once per run
  (its `rewards/<name>/mean` metric is then NaN for that step);
- completions that no reward scored at all (every function gave None): a warning, once per run,
  with how many and which rewards (TRL warns about the same thing); they count 0 in the total;
- a call in which no completion got any reward: a RewardError, since such a step would train on
  nothing (every advantage 0) while looking healthy.

Warnings go to the `grpo.rewards` logger (one line on stderr unless logging is configured).

A reward function cannot end the process. While `score` calls the functions, `SystemExit`
raised in one (`sys.exit()`, `exit()`) becomes a RewardError naming it, and `os._exit` is
replaced by a function that raises out of the reward that called it, which then also becomes a
RewardError (even if the reward catches that and returns). Otherwise a stray exit would end a run
with status 0 and no model. The replacement is installed once around the whole call (rewards run
in worker threads and on an event loop), reference-counted so that overlapping calls restore the
real `os._exit` only when the last one ends; `os._exit` from the main thread (a signal handler's
hard exit) goes through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import decimal
import inspect
import logging
import math
import numbers
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from grpo.config.train import RewardSpec
from grpo.errors import RewardError

from .functions import load_function
from .groups import GroupReward, as_group_reward, takes_a_group
from .judge import ListwiseJudge
from .models import EnsembleScorer, RewardModelScorer
from .process_model import ProcessRewardScorer


# The keywords TRL passes besides prompts, completions and the columns; a function gets each one
# its signature takes. No dataset column may use these names (nor prompts / completions).
# `environments`: an agent run's environment instances, one per episode, as they ended it.
TRL_KEYWORDS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
RESERVED_COLUMNS = ("prompts", "completions", *TRL_KEYWORDS)

FLOAT32_MAX = torch.finfo(torch.float32).max

logger = logging.getLogger("grpo.rewards")


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0
    per: str = "completion"  # or "group" (grpo.rewards.groups) or "step" (grpo.rewards.steps)
    _keywords: tuple | None = field(default=None, repr=False)  # what its signature takes (None: anything)
    # The warnings already given for this reward: each is given once per run, not once per step.
    _warned: set = field(default_factory=set, repr=False, compare=False)

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
        elif spec.judge:
            fn = ListwiseJudge(spec.judge, device, dtype, template=spec.template, max_new_tokens=spec.max_new_tokens,
                               max_length=spec.max_length, batch_size=spec.batch_size)
            default_name = fn.__name__
        elif spec.per == "step":  # a process reward model scores each step
            fn = ProcessRewardScorer(spec.model, device, dtype, max_length=spec.max_length, batch_size=spec.batch_size)
            default_name = fn.__name__
        else:
            members = [RewardModelScorer(path, device, dtype, batch_size=spec.batch_size, normalize=spec.normalize,
                                         max_length=spec.max_length, clip=spec.clip)
                       for path in (spec.model if isinstance(spec.model, list) else [spec.model])]
            fn = members[0] if len(members) == 1 else EnsembleScorer(members, spec.ensemble)
            default_name = "rm_" + fn.__name__
        if spec.function and (spec.per == "group" or (not spec.per and takes_a_group(fn))):
            fn = as_group_reward(fn)  # called once per group (grpo.rewards.groups)
        name = spec.name or default_name
        while name in names:
            name += "_"
        names.add(name)
        per = "group" if isinstance(fn, GroupReward) else spec.per or "completion"
        rewards.append(Reward(name, fn, float(spec.weight), per=per))
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
        group = isinstance(r.fn, GroupReward)
        fn = r.fn.fn if group else r.fn
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        if reads_model_text(r):
            extra = {}
        else:
            extra = {k: None for k in TRL_KEYWORDS if (r.fn if group else r).accepts(k)}
        if group:  # prompt and completions by position (grpo.rewards.groups)
            args, first, form = (None, []), {}, "fn(prompt, completions, **row columns) once per group"
        elif r.per == "step":  # the step texts too (grpo.rewards.steps)
            args, first, form = (), {"prompts": [], "completions": [], "steps": []}, \
                "fn(prompts=..., completions=..., steps=..., **columns)"
        else:
            args, first, form = (), {"prompts": [], "completions": []}, "fn(prompts=..., completions=..., **columns)"
        try:
            signature.bind(*args, **first, **{c: [] for c in columns}, **extra)
        except TypeError as e:
            raise RewardError(f"reward {r.name!r}: {getattr(fn, '__name__', 'fn')}{signature} cannot be called "
                              f"as {form} with this dataset's columns {sorted(columns)}: {e}") from None


def _user_frame(error: BaseException, fn) -> str:
    """Where in the user's code an exception was raised: the innermost frame in the reward
    function's own file (else the innermost frame of all)."""
    frames = traceback.extract_tb(error.__traceback__)
    home = getattr(getattr(fn, "__code__", None), "co_filename", None)
    mine = [f for f in frames if f.filename == home] or frames
    return f" (at {mine[-1].filename}:{mine[-1].lineno}, in {mine[-1].name})" if mine else ""


class _Running:
    """The reward function a worker thread (or an event-loop task) is running, and the status of
    the `os._exit` it tried, if it did."""

    def __init__(self, name: str):
        self.name = name
        self.exited: int | None = None


_RUNNING: contextvars.ContextVar[_Running | None] = contextvars.ContextVar("grpo_reward_running", default=None)


class _ExitCalled(BaseException):
    """Raised by the guarded `os._exit` inside a reward. A BaseException, so that a reward's own
    `except Exception` does not swallow it on its way out."""


class _ExitGuard:
    """`os._exit` replaced while rewards are scored (module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._real = os._exit
        self._scoring: list[str] = []  # the rewards of every call in progress

    @contextlib.contextmanager
    def installed(self, names: list[str]):
        with self._lock:
            if self._depth == 0:
                self._real = os._exit
                os._exit = self._exit
            self._depth += 1
            self._scoring += names
        try:
            yield
        finally:
            with self._lock:
                for name in names:
                    self._scoring.remove(name)
                self._depth -= 1
                if self._depth == 0:
                    os._exit = self._real

    def _exit(self, status):
        running = _RUNNING.get()
        if running is not None:
            running.exited = status
            raise _ExitCalled(status)
        if threading.current_thread() is threading.main_thread():
            self._real(status)  # not a reward: the main thread waits on the rewards (a signal handler)
        # A thread that a reward started itself (it does not inherit the reward's context).
        raise RewardError(f"a thread started while rewards {sorted(set(self._scoring))} were scored called "
                          f"os._exit({status!r}); a reward function must return its values, not end the process")


_EXIT_GUARD = _ExitGuard()


def _exit_error(r: Reward, error: BaseException | None, running: _Running) -> RewardError:
    where = _user_frame(error, r.fn) if error is not None else ""
    if isinstance(error, SystemExit):
        call = f"sys.exit({error.code!r})"
    else:
        call = f"os._exit({running.exited!r})" + ("" if error is not None else " (and caught what it raised)")
    return RewardError(f"reward {r.name!r} called {call}{where}: a reward function must return its values, "
                       f"not end the process; raise an exception to stop the run")


def _exited(error: BaseException | None, running: _Running) -> bool:
    return isinstance(error, (SystemExit, _ExitCalled)) or running.exited is not None


def call_reward(r: Reward, timeout: float | None, **kwargs) -> list:
    """r.fn(**kwargs) in a worker thread, so that a function that never returns stops the run after
    `timeout` seconds with its name instead of hanging it (the thread is a daemon: it dies with
    the process). Its own exceptions come back as one line naming the function and its line, and
    so does an attempt to end the process (module docstring)."""
    outcome: dict = {}
    running = _Running(r.name)

    def run():
        _RUNNING.set(running)
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
    error = outcome.get("error")
    if _exited(error, running):
        raise _exit_error(r, error, running)
    if error is not None:
        raise RewardError(f"reward {r.name!r} failed: {type(error).__name__}: {error}"
                          f"{_user_frame(error, r.fn)}") from None
    return outcome["value"]


async def _wait(awaitable):
    return await awaitable


def call_async_rewards(rewards: list[Reward], timeout: float | None, kwargs_for) -> dict[str, Any]:
    """The `async def` rewards, awaited concurrently (asyncio.gather, as TRL) on an event loop of
    their own in a worker thread; each is bounded by `timeout`, and the thread too, in case a
    coroutine blocks its loop."""
    outcome: dict = {}

    async def guarded(coroutine, running: _Running):
        # Runs in the task that runs the reward's coroutine, so that a SystemExit is caught here,
        # naming its reward, before asyncio re-raises it out of the whole event loop.
        _RUNNING.set(running)
        try:
            return await coroutine
        except (SystemExit, _ExitCalled) as e:
            return _Exit(e)

    async def one(r: Reward):
        running = _Running(r.name)
        try:
            value = await asyncio.wait_for(guarded(r.fn(**kwargs_for(r)), running), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return _TimedOut()
        if isinstance(value, _Exit) or running.exited is not None:
            return _Exit(_exit_error(r, value.error if isinstance(value, _Exit) else None, running))
        return value

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
    if worker.is_alive():
        raise RewardError(f"async rewards {names} did not return within reward_timeout={timeout:g} s (one of "
                          f"them blocks its event loop?)")
    if "error" in outcome:
        e = outcome["error"]
        if isinstance(e, SystemExit):  # from a task one of them started itself
            raise RewardError(f"one of the async rewards {names} called sys.exit({e.code!r}): a reward function "
                              f"must return its values, not end the process")
        raise RewardError(f"async rewards {names} failed: {type(e).__name__}: {e}")
    out = {}
    for r, value in zip(rewards, outcome["values"]):
        if isinstance(value, _TimedOut):
            raise RewardError(f"reward {r.name!r} did not return within reward_timeout={timeout:g} s; "
                              f"raise reward_timeout if it is just slow")
        if isinstance(value, _Exit):
            raise value.error
        if isinstance(value, BaseException):
            raise RewardError(f"reward {r.name!r} failed: {type(value).__name__}: {value}{_user_frame(value, r.fn)}")
        out[r.name] = value
    return out


class _TimedOut:
    pass


class _Exit:
    """An attempt to end the process, carried back as a value (inside the event loop, then as the
    RewardError that names the reward)."""

    def __init__(self, error: BaseException):
        self.error = error


def _real(v) -> float | None:
    """v as a float when it is one real number (bool included, as 1 / 0), else None."""
    if isinstance(v, (bool, numbers.Real, decimal.Decimal)):
        return float(v)
    if isinstance(v, torch.Tensor):  # iterating a tensor gives 0-d tensors
        return float(v) if v.dim() == 0 and not v.is_complex() else None
    kind = getattr(getattr(v, "dtype", None), "kind", None)  # numpy scalars (np.bool_ is not numbers.Real)
    if isinstance(kind, str) and kind in "biuf" and getattr(v, "ndim", None) == 0:
        return float(v)
    return None


def _as_floats(r: Reward, values, n: int) -> list[float]:
    if values is None:
        raise RewardError(f"reward {r.name!r} returned None; expected a list of {n} floats (None inside the list "
                          f"means 'does not apply' for one completion)")
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise RewardError(f"reward {r.name!r} returned a {type(values).__name__} ({str(values)[:40]}); "
                          f"expected a list of {n} floats, one per completion")
    values = list(values)  # a generator, tuple, array or tensor is fine
    if len(values) != n:
        raise RewardError(f"reward {r.name!r} returned {len(values)} values; expected a list of {n} floats")
    out = []
    for i, v in enumerate(values):
        if v is None:  # TRL's convention: this reward does not apply to this completion
            out.append(math.nan)
            continue
        x = _real(v)
        if x is None:
            raise RewardError(f"reward {r.name!r} returned {str(v)[:40]!r} ({type(v).__name__}) for completion {i}; "
                              f"expected a real number (int, float or bool) or None")
        if math.isnan(x):
            raise RewardError(f"reward {r.name!r} returned NaN for completion {i}; return None for 'does not apply'")
        if not abs(x) <= FLOAT32_MAX:
            raise RewardError(f"reward {r.name!r} returned {v!r} for completion {i}, beyond float32's range "
                              f"(|r| <= {FLOAT32_MAX:.4g}), where it would become inf and train nothing")
        out.append(x)
    return out


def _check_coverage(rewards: list[Reward], per_reward: dict[str, torch.Tensor], n: int) -> None:
    """Loud about None on a large scale (module docstring): an error when no completion got any
    reward, a warning (once per run) for a reward that gave none, or completions that got none."""
    if not rewards or n == 0:
        return
    missing = torch.stack([per_reward[r.name].isnan() for r in rewards])  # [K, N]
    names = [r.name for r in rewards]
    if bool(missing.all()):
        raise RewardError(f"no reward applied to any of the {n} completions: every one of {names} returned None "
                          f"for all of them, so this step would train on nothing; check that each reward's "
                          f"condition for 'does not apply' matches your data's columns")
    for r, none in zip(rewards, missing):
        if bool(none.all()) and "all_none" not in r._warned:
            r._warned.add("all_none")
            logger.warning(f"grpo: warning: reward {r.name!r} returned None for all {n} completions of a step (it "
                           f"does not apply to any of them); shown once")
    unscored = int(missing.all(dim=0).sum())
    if unscored and any("unscored" not in r._warned for r in rewards):
        for r in rewards:
            r._warned.add("unscored")
        logger.warning(f"grpo: warning: {unscored} of {n} completions got no reward at all (each of {names} "
                       f"returned None for them); they count 0 in the total; shown once")


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list],
          timeout: float | None = None, *, completion_ids: list | None = None, trainer_state: Any = None,
          log_metric: Callable | None = None, log_extra: Callable | None = None,
          environments: list | None = None, model_texts: tuple[list[str], list[str]] | None = None,
          group_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total [N] and each reward's unweighted values [N], checked for shape, type and
    range (module docstring).

    A `None` entry means "does not apply" (TRL's convention): it is NaN in the reward's own values
    and counts 0 in the weighted total; no reward at all for any completion is an error. `timeout`
    bounds each function call (config key `reward_timeout`). The keywords after it are TRL's extra
    arguments (module docstring), each passed to the functions that take it; `model_texts` is
    (formatted prompts, completion texts) for reward models (default: `prompts`, `completions`).
    `group_size`: G, how group rewards (grpo.rewards.groups) split the N completions (None: all
    N are one group). While the functions run, `os._exit` is guarded (module docstring)."""
    extras = {"completion_ids": completion_ids, "trainer_state": trainer_state, "log_metric": log_metric,
              "log_extra": log_extra, "environments": environments}

    def kwargs_for(r: Reward) -> dict:
        group = {"group_size": group_size} if isinstance(r.fn, GroupReward) else {}
        if reads_model_text(r):
            texts, answers = model_texts or (prompts, completions)
            return dict(prompts=texts, completions=answers, **columns, **group)
        given = {k: v for k, v in extras.items() if v is not None and r.accepts(k)}
        return dict(prompts=prompts, completions=completions, **columns, **given, **group)

    with _EXIT_GUARD.installed([r.name for r in rewards]):
        outputs = {r.name: call_reward(r, timeout, **kwargs_for(r)) for r in rewards if not r.is_async}
        pending = [r for r in rewards if r.is_async]
        if pending:
            outputs.update(call_async_rewards(pending, timeout, kwargs_for))
    n = len(completions)
    per_reward, total = {}, torch.zeros(n, dtype=torch.float32)
    exact = torch.zeros(n, dtype=torch.float64)  # the same sum where it cannot overflow, to check it
    for r in rewards:
        values = _as_floats(r, outputs[r.name], n)
        per_reward[r.name] = torch.tensor(values, dtype=torch.float32)
        total += r.weight * per_reward[r.name].nan_to_num(nan=0.0)  # float32, as TRL's nansum
        exact += r.weight * torch.tensor(values, dtype=torch.float64).nan_to_num(nan=0.0)
    _check_coverage(rewards, per_reward, n)
    # Weights can carry finite values past float32's range.
    beyond = (~(exact.abs() <= FLOAT32_MAX) | ~total.isfinite()).nonzero()
    if len(beyond):
        i = int(beyond[0])
        parts = " + ".join(f"{r.weight:g} * {per_reward[r.name][i].item():g}" for r in rewards)
        raise RewardError(f"the weighted sum of the rewards of completion {i} ({parts} = {exact[i].item():g}) is "
                          f"beyond float32's range (|r| <= {FLOAT32_MAX:.4g}); lower the weights or the values")
    return total, per_reward
