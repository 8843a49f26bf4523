"""Name -> function tables for the choices users extend: advantage estimators and policy losses.

As verl's `register_adv_est` / `register_policy_loss`: a variant is one small function, registered
under the name a config gives (`advantage_estimator: rloo`, `policy_loss: cispo`). The config's
allowed values are read from these tables, so registering a function is all it takes to make a
new name valid everywhere (config validation, `grpo config train`, the trainer).
"""

from __future__ import annotations

from typing import Callable


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
        if name not in self._table:
            raise ValueError(f"{self.kind} must be one of {', '.join(map(repr, self._table))}; got {name!r}")
        return self._table[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
