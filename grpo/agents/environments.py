"""Environments: what an episode acts on besides its standalone tools.

An environment is a class (or any factory) giving one instance per episode, `reset(**row)` with
the episode's dataset row at its start. Two kinds, told apart by whether the instance has a
`step` method:

- Tool environments, TRL's `environment_factory`: the instance's public methods (no leading
  underscore; not `reset` or `get_reward`) are the episode's tools, with a standalone tool's
  requirements (type hints, a docstring). `reset` returns None or a string, which is appended to
  the prompt's last user message. The reward is the environment's own when it has one: TRL's
  `get_reward()` (sync or async), else a numeric `reward` attribute, read once when the episode
  ends. Without either, reward functions score the episode (and, as TRL passes them, receive the
  instances as `environments`).
- Text environments, for interactions that are not tool calls (a game, a simulated user):
      reset(**row) -> first observation (str, or None)
      step(text)   -> (observation, reward, done)
  `text` is the model's turn, its stop token removed; the observation becomes a user message
  (the class attribute `observation_role` names another role). This is the protocol of
  verifiers' MultiTurnEnv (env_response / is_completed), OpenRLHF's AgentInstanceBase
  (reset / step) and SkyRL's BaseTextEnv (init / step): `step` may also return a mapping with
  "observation" or "observations", "reward" and "done", as SkyRL's does, and an observation may
  be a list of messages. Each turn's reward is kept, and their sum is the episode's by default.

An environment that raises in `reset`, `step` or `get_reward`, overruns the timeout or returns
something unusable stops the run with one AgentError naming the class, the method and the row: a
broken environment is a bug to fix, not a signal to train on. (Standalone tools and tool
methods that raise are different: their error is the model's to read.)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable

from grpo.data import META_COLUMNS, where
from grpo.errors import ConfigError, RewardError

from .tools import Tool, check_distinct, describe, load_object, make_tool

RESERVED = ("reset", "get_reward", "step")  # never tools


class AgentError(RewardError):
    """An environment that failed (reset, step, its reward). An environment scores its episodes,
    so it is reported as a reward is: on the process where it failed."""


def is_text_environment(instance: Any) -> bool:
    """A text environment steps on the model's text; a tool environment is acted on by tools."""
    return callable(getattr(instance, "step", None))


def as_environments(environments: "Environments | Callable | str | None") -> "Environments | None":
    """An `Environments` from a class, a factory or a spec (kept as it is when it already is one)."""
    if environments is None or isinstance(environments, Environments):
        return environments
    return Environments(environments)


class Environments:
    """A factory's instances, made once and reset for each episode (TRL's "construct once, reset
    often"); `take(n)` hands out n of them, making more only when a batch needs more.

    The first instance is made here, before any model loads, to check the class: that it can be
    made, has `reset`, and, for a tool environment, that every tool method has a schema.
    """

    def __init__(self, factory: Callable | str):
        if isinstance(factory, str):
            factory = load_object(factory, "environment_factory")
        if not callable(factory):
            raise ConfigError(f"environment_factory {factory!r}: not a class or a function that makes an environment")
        self.factory = factory
        probe = self._make()
        self.name = type(probe).__name__
        if not callable(getattr(probe, "reset", None)):
            raise ConfigError(f"environment_factory {self.name}: an environment needs a reset(**row) method")
        self.text = is_text_environment(probe)
        self.tool_names = [] if self.text else _tool_method_names(probe)
        # Schemas once, from the probe (a ConfigError naming Class.method where one is missing);
        # every instance's tools are the same methods bound to it.
        self._tools = [make_tool(getattr(probe, name), label=f"{self.name}.{name}") for name in self.tool_names]
        check_distinct(self._tools)
        self.pool = [probe]

    def _make(self) -> Any:
        try:
            return self.factory()
        except Exception as e:
            name = getattr(self.factory, "__name__", repr(self.factory))
            raise ConfigError(f"environment_factory {name}: making an instance failed: "
                              f"{describe(e)}") from None

    def take(self, n: int) -> list[Any]:
        """n distinct instances for one batch of episodes (reset by the episode loop)."""
        while len(self.pool) < n:
            self.pool.append(self._make())
        return self.pool[:n]

    def tools_of(self, instance: Any) -> list[Tool]:
        """The instance's tool methods, bound to it."""
        return [dataclasses.replace(tool, fn=getattr(instance, name))
                for name, tool in zip(self.tool_names, self._tools)]


def _tool_method_names(instance: Any) -> list[str]:
    """Public methods of the class (inherited ones included), found without touching properties."""
    names = []
    for name in dir(type(instance)):
        if name.startswith("_") or name in RESERVED:
            continue
        member = inspect.getattr_static(instance, name)
        if inspect.isfunction(member):  # plain and async defs; not static or class methods, not properties
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# What environments return, checked

def row_name(source: str, row: dict) -> str:
    """The row in an error message: its file:line where known, else its first columns."""
    if any(k in row for k in META_COLUMNS):
        return where(source, row)
    shown = {k: v for k, v in row.items() if k not in META_COLUMNS}
    text = repr(shown)
    return f"row {text[:120] + '...' if len(text) > 120 else text}"


def reset_kwargs(row: dict) -> dict:
    """The row as reset(**row) receives it: every column, none of ours (file line, row number)."""
    return {k: v for k, v in row.items() if k not in META_COLUMNS}


def failure(env: Any, method: str, row_label: str, outcome) -> AgentError:
    """The one-line error for an environment call that raised or overran."""
    what = "did not return within tool_timeout" if outcome.timed_out else \
        f"raised {describe(outcome.error)}"
    return AgentError(f"environment {type(env).__name__}.{method} {what} (on {row_label})")


def as_observation(env: Any, method: str, row_label: str, value: Any) -> str | list[dict] | None:
    """An observation: text, a list of messages, or None (nothing to show)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise AgentError(f"environment {type(env).__name__}.{method} returned an observation of type "
                     f"{type(value).__name__}; expected a string, a list of messages or None (on {row_label})")


def as_reward(env: Any, method: str, row_label: str, value: Any) -> float:
    """A finite real number (bool counts as 1 / 0, as in reward functions)."""
    if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        number = float(value.item() if hasattr(value, "item") else value)
        if math.isfinite(number):
            return number
    raise AgentError(f"environment {type(env).__name__}.{method} gave the reward {value!r} "
                     f"({type(value).__name__}); expected a finite number (on {row_label})")


def as_step(env: Any, row_label: str, value: Any) -> tuple[Any, float, bool]:
    """(observation, reward, done) from a tuple (a fourth item, info, is ignored) or a mapping."""
    if isinstance(value, dict):
        observation = value.get("observation", value.get("observations"))
        reward, done = value.get("reward", 0.0), value.get("done", False)
    elif isinstance(value, (tuple, list)) and len(value) in (3, 4):
        observation, reward, done = value[:3]
    else:
        raise AgentError(f"environment {type(env).__name__}.step returned {type(value).__name__}; expected "
                         f"(observation, reward, done) (on {row_label})")
    return (as_observation(env, "step", row_label, observation),
            as_reward(env, "step", row_label, 0.0 if reward is None else reward), bool(done))


def final_reward_source(env: Any) -> Callable | None:
    """What reads an environment's own reward when its episode ends: `get_reward`, else (for a
    tool environment: a text environment's rewards come from `step`) a `reward` attribute."""
    get_reward = getattr(env, "get_reward", None)
    if callable(get_reward):
        return get_reward
    if not is_text_environment(env) and "reward" in dir(env) and not callable(getattr(env, "reward", None)):
        return lambda: env.reward
    return None
