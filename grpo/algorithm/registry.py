"""Name -> function tables for the choices users extend (advantage estimators, policy losses),
and `check_choice` for the small fixed ones (plain tuples of names).

As verl's `register_adv_est` / `register_policy_loss`: a variant is one small function, registered
under the name a config gives (`advantage_estimator: rloo`, `policy_loss: cispo`). The config's
allowed values are read from these tables, so registering a function is all it takes to make a
new name valid everywhere (config validation, `grpo config train`, the trainer).
"""

from __future__ import annotations

from typing import Callable


def check_choice(name: str, value: str, allowed) -> None:
    """A ValueError in the one form every choice of the maths uses: the name, the allowed values
    and what was given."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: `@ADVANTAGE_ESTIMATORS.register("rloo")`. A name can be registered once."""
        def add(fn: Callable) -> Callable:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._table[name].__module__})")
            self._table[name] = fn
            return fn
        return add

    def get(self, name: str) -> Callable:
        check_choice(self.kind, name, tuple(self._table))
        return self._table[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
