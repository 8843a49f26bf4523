"""The best held-out evaluation so far: early stopping on it, and the model it had.

A verifier's held-out accuracy is the truth a reward model can only approximate: when it stops
improving while the reward-model score still climbs, the policy is learning to please the reward
model (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization"). `early_stopping_patience`
stops the run then (HF Trainer's EarlyStoppingCallback), and `load_best_model_at_end` makes the
final model the best evaluation's, kept on disk as `best-model/` while the run goes on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from grpo.observe.metrics import plain_name

BEST_DIR = "best-model"


class BestModel:
    def __init__(self, metric: str, greater_is_better: bool, patience: int, keep: bool, out: Path):
        self.metric = plain_name(metric)  # the record's key, whichever spelling the config used
        self.greater, self.patience, self.keep, self.out = greater_is_better, patience, keep, out
        self.value: float | None = None
        self.step = 0
        self.since = 0  # evaluations since the best

    def observe(self, step: int, record: dict, save) -> bool:
        """After an evaluation: remember a new best (and, to keep, its model via `save(dir)`);
        returns True when the run should stop (no new best in `patience` evaluations)."""
        if self.metric not in record:
            from grpo.errors import ConfigError
            held_out = sorted(k for k in record if k.startswith("eval_"))
            raise ConfigError(f"metric_for_best_model: {self.metric!r} is not among the held-out numbers "
                              f"{held_out}")
        value = record[self.metric]
        if self.value is None or (value > self.value if self.greater else value < self.value):
            self.value, self.step, self.since = value, step, 0
            if self.keep:
                shutil.rmtree(self.out / BEST_DIR, ignore_errors=True)
                save(self.out / BEST_DIR)
            return False
        self.since += 1
        return bool(self.patience) and self.since >= self.patience

    def state_dict(self) -> dict:
        return {"value": self.value, "step": self.step, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step, self.since = state["value"], state["step"], state["since"]
