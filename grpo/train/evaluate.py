"""Held-out evaluation: completions for the held-out prompts, scored by the run's rewards.

One greedy completion per prompt by default; `num_generations_eval` > 1 samples that many per
prompt as training does, and the numbers are means over all of them. Accuracy is the fraction
of completions whose accuracy reward is 1: the reward named by `accuracy_reward`, else the first
reward (exact_answer first) whose every value is 0 or 1 (`AccuracyReward` chooses, and says so).
"""

from __future__ import annotations

import torch

from grpo.engine.backend import RolloutBackend, SamplingParams
from grpo.rewards.scoring import RewardLog, evaluating

from .rollout import generate_and_score, sampling_params


def is_binary(values: torch.Tensor) -> bool:
    """Every value that applies (not NaN) is 0 or 1, and at least one applies."""
    applies = values[~torch.isnan(values)]
    return applies.numel() > 0 and bool(((applies == 0) | (applies == 1)).all())


class AccuracyReward:
    """Which reward's value 1 means "correct": the named one, or the first (exact_answer first,
    then in config order) whose values are all 0 or 1 on the first scored completions (the
    held-out set, else the first rollout). Decided once, the same on every process."""

    def __init__(self, rewards, requested: str, say):
        self.say = say
        self.order = sorted((r.name for r in rewards), key=lambda n: n != "exact_answer")
        self.name = requested or None
        self.decided = bool(requested)
        if requested:
            say(f"accuracy: reward {requested!r} (accuracy_reward)")

    def decide(self, per_function: dict[str, torch.Tensor] | None, world, where: str) -> None:
        """From each process's values (None on a process that scored nothing): the first reward
        binary on every process that scored."""
        if self.decided:
            return
        mine = None if per_function is None else [n for n in self.order if is_binary(per_function[n])]
        everyone = [b for b in world.gather_objects(mine) if b is not None]
        binary = [n for n in self.order if everyone and all(n in b for b in everyone)]
        self.name, self.decided = (binary[0] if binary else None), True
        if self.name:
            self.say(f"accuracy: reward {self.name!r}, whose values on {where} are all 0 or 1 "
                     f"(set accuracy_reward to choose another)")
        else:
            self.say(f"accuracy: not reported: no reward's values on {where} are all 0 or 1 "
                     f"(set accuracy_reward to name one)")

    def of(self, per_function: dict[str, torch.Tensor]) -> float | None:
        if self.name is None:
            return None
        return (per_function[self.name] == 1).float().mean().item()


@torch.no_grad()
def evaluate(backend: RolloutBackend, tokenizer, rows: list[dict], rewards, cfg, *, trainer_state=None,
             generator: torch.Generator | None = None, agent=None) -> dict:
    """Completions for `rows` (cfg: prompt_column, apply_chat_template, max_prompt_length,
    max_completion_length, eval_batch_size, num_generations_eval, the sampling keys; with `agent`
    (grpo.train.agent_rollout.AgentSetup) each completion is an episode); returns the
    mean reward, each reward's values, the completions and what the rewards logged."""
    group = cfg.num_generations_eval
    params = SamplingParams.greedy(cfg.max_completion_length) if group == 1 else \
        sampling_params(cfg, group_size=group)
    totals, per_function, completions, log = [], {}, [], RewardLog()
    for i in range(0, len(rows), cfg.eval_batch_size):
        chunk = rows[i:i + cfg.eval_batch_size]
        with evaluating(rewards):  # held-out scores teach no reward its statistics
            scored = generate_and_score(backend, tokenizer, chunk, rewards, cfg, params, generator, log=log,
                                        trainer_state=trainer_state, agent=agent)
        totals.append(scored.total)
        for k, v in scored.per_function.items():
            per_function.setdefault(k, []).append(v)
        completions += scored.completions
    per_function = {k: torch.cat(v) for k, v in per_function.items()}
    return {"reward": torch.cat(totals).mean().item(), "completions": completions, "values": per_function,
            "reward_per_function": {k: v.nanmean().item() for k, v in per_function.items()},
            "logged": log.means()}
