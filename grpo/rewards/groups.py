"""Group rewards: a reward that sees a prompt's whole group at once, and scores or ranks it.

GRPO's signal is relative within the group, and comparing G candidates side by side is often
easier than scoring one alone (a judge that ranks, a tournament, "the shortest correct answer").
A group reward is called once per group:

    fn(prompt, completions, **columns) -> G scores, or a ranking

`prompt` is the group's prompt (text or messages), `completions` its G completions (as a
per-completion reward gets them), each dataset column the ROW's value (not a list), and, when its
signature takes them, TRL's keywords: `completion_ids` (the group's G), `trainer_state`,
`log_metric`, `log_extra` (G values per call). It returns

- G scores, higher is better, each a real number or None (as a per-completion reward's values); or
- a ranking: a list of tie groups, best first, each a list of completion indices 0..G-1, every
  index exactly once ([[2], [0, 3], [1]]: 2 best, 0 and 3 tied, 1 worst). It becomes scores in
  [0, 1], 1 for the best and 0 for the worst, ties sharing their mean rank
  (`grpo.algorithm.tiers_to_scores`), so it mixes with 0 / 1 verifiers by weight; or
- None: it does not apply to this group (every completion None).

It is declared `{function: judge.py:rank_group, per: group}`, or recognised by its signature (a
first parameter named `prompt`, not `prompts`); the prompt and the completions are passed by
position, the rest by name. `async def` group rewards run their groups
concurrently; a reward's whole call (all its groups) is bounded by `reward_timeout`, and its
errors name it, as any reward's (grpo.rewards.scoring).
"""

from __future__ import annotations

import asyncio
import inspect
import numbers
from typing import Callable

from grpo.algorithm import tiers_to_scores
from grpo.errors import RewardError

PER = ("completion", "group")
# TRL's extra keywords (grpo.rewards.scoring.TRL_KEYWORDS), passed on when the function takes them.
_EXTRAS = ("completion_ids", "trainer_state", "log_metric", "log_extra")


def takes_a_group(fn: Callable) -> bool:
    """Recognised by signature: the first parameter is `prompt` (one prompt), not `prompts`."""
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0] == "prompt"


def is_ranking(value) -> bool:
    """A list of tie groups (each a list or tuple), rather than a list of scores."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, (list, tuple)) for t in value)


def ranking_scores(name: str, ranking, size: int, group: int) -> list[float]:
    """A ranking's scores, after checking it places every completion of the group once."""
    seen = []
    for tier in ranking:
        for i in tier:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= int(i) < size:
                raise RewardError(f"reward {name!r} returned a ranking for group {group} holding {i!r}; expected "
                                  f"completion indices 0..{size - 1}")
            seen.append(int(i))
    if sorted(seen) != list(range(size)):
        missing = sorted(set(range(size)) - set(seen))
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise RewardError(f"reward {name!r} returned a ranking for group {group} that does not place each of its "
                          f"{size} completions exactly once (missing {missing}, repeated {twice})")
    return tiers_to_scores([[int(i) for i in tier] for tier in ranking], size)


class GroupReward:
    """A group reward as the batch-level reward function scoring calls: split the N completions
    into groups of `group_size`, call `fn` once per group, join the G values of each."""

    per_group = True

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", None) or type(fn).__name__
        self.__code__ = getattr(fn, "__code__", None)  # where its errors are reported from
        try:
            parameters = inspect.signature(fn).parameters.values()
            self._keywords = None if any(p.kind is p.VAR_KEYWORD for p in parameters) else {p.name for p in parameters}
        except (TypeError, ValueError):
            self._keywords = set()

    def accepts(self, keyword: str) -> bool:
        return self._keywords is None or keyword in self._keywords

    def calls(self, prompts: list, completions: list, group_size: int | None, kwargs: dict) -> list[tuple]:
        """One (prompt, completions, keywords) per group; the first two are passed by position, so
        a function declared `per: group` may name them as it likes."""
        G = group_size or len(completions)
        if G < 1 or len(completions) % G:
            raise RewardError(f"reward {self.__name__!r}: {len(completions)} completions do not split into groups "
                              f"of {G}")
        out = []
        for g in range(len(completions) // G):
            lo, hi = g * G, (g + 1) * G
            call = {}
            for key, value in kwargs.items():
                if key == "completion_ids":
                    if self.accepts(key):
                        call[key] = value[lo:hi]
                elif key in _EXTRAS:
                    if self.accepts(key):
                        call[key] = value
                else:  # a dataset column: the row's value
                    call[key] = value[lo]
            out.append((prompts[lo], list(completions[lo:hi]), call))
        return out

    def values(self, results: list, group_size: int) -> list:
        """The groups' returns as one list of N values (checked as every reward's are, later)."""
        out = []
        for g, value in enumerate(results):
            if value is None:
                out += [None] * group_size
            elif is_ranking(value):
                out += ranking_scores(self.__name__, value, group_size, g)
            else:
                if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                    raise RewardError(f"reward {self.__name__!r} returned a {type(value).__name__} "
                                      f"({str(value)[:40]}) for group {g}; expected {group_size} scores, a ranking "
                                      f"(a list of tie groups of indices, best first) or None")
                value = list(value)
                if len(value) != group_size:
                    raise RewardError(f"reward {self.__name__!r} returned {len(value)} scores for group {g}; expected "
                                      f"{group_size}, one per completion of the group")
                out += value
        return out

    def __call__(self, prompts, completions, group_size: int | None = None, **kwargs) -> list:
        G = group_size or len(completions)
        results = [self.fn(p, c, **k) for p, c, k in self.calls(prompts, completions, group_size, kwargs)]
        if any(inspect.isawaitable(r) for r in results):  # a partial or lambda around an async def
            results = asyncio.run(_gather(results))
        return self.values(results, G)


class AsyncGroupReward(GroupReward):
    """An `async def` group reward: its groups are awaited concurrently."""

    async def __call__(self, prompts, completions, group_size: int | None = None, **kwargs) -> list:
        G = group_size or len(completions)
        calls = self.calls(prompts, completions, group_size, kwargs)
        results = await _gather([self.fn(p, c, **k) for p, c, k in calls])
        return self.values(results, G)


async def _gather(awaitables: list) -> list:
    return list(await asyncio.gather(*awaitables))


def as_group_reward(fn: Callable) -> GroupReward:
    if isinstance(fn, GroupReward):
        return fn
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
    return (AsyncGroupReward if is_async else GroupReward)(fn)
