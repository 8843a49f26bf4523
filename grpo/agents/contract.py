"""An episode as training takes it: the contract between whatever ran the episode and the update.

The episode loop here (`grpo.agents.episodes.run_episodes`) returns `Episode`s, and so may a
user's own rollout function (TRL's `rollout_func`: the user runs generation and interaction
however they like, and hands back tokens, a loss mask and rewards). TRL's own return form, a
dict of per-completion lists ("prompt_ids", "completion_ids", "logprobs", optionally "env_mask",
and extra fields forwarded to reward functions), converts with `episodes_from_trl`.

What training relies on, and `Episode.check` verifies:

- `completion_ids` are every token after the prompt, the model's and the environment's, in
  order: the sequence the update runs its forward pass over.
- `loss_mask[t]` is 1 exactly where the model sampled token t (the policy gradient, the KL and
  every token count use these tokens only), 0 on tool and environment tokens.
- `logprobs[t]` is the log-probability token t was sampled with (0 where the mask is 0), the
  behaviour policy; `sampling_logprobs` (optional) the same under the distribution actually
  drawn from, top-k / top-p included (pi_sampler of the off-policy correction).
- `reward` is the episode's own reward, or None when reward functions score it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from grpo.errors import RewardError


@dataclass
class Episode:
    """One finished episode: what the update trains on, and what its metrics and samples show."""
    prompt_ids: list[int]                 # the rendered prompt the first turn was generated after
    completion_ids: list[int]             # every token after the prompt: the model's and the environment's
    loss_mask: list[int]                  # 1 on the model's sampled tokens, 0 on tool / environment tokens
    logprobs: list[float]                 # sampling log-prob per token, 0 where loss_mask is 0
    reward: float | None = None           # the episode's own reward (None: reward functions alone score it)
    turn_rewards: list[float] = field(default_factory=list)  # what a text environment gave each turn
    final_reward: float | None = None     # the environment's reward at the end (get_reward), before any reduce
    prompt: list[dict] = field(default_factory=list)         # the prompt's messages (with reset's observation)
    completion: list[dict] = field(default_factory=list)     # every message after them, in order
    turns: int = 1                        # model turns (generation calls)
    tool_calls: int = 0                   # calls the model wrote, made or not
    tool_errors: dict[str, int] = field(default_factory=dict)  # per kind (grpo.agents.parsing.ERROR_KINDS)
    tool_seconds: float = 0.0             # time spent in this episode's tool and environment calls
    truncated: bool = False               # stopped by max_completion_length (or a turn that did not end)
    sampling_logprobs: list[float] | None = None  # pi_sampler per token (top-k / top-p), 0 where loss_mask is 0
    extras: dict[str, Any] = field(default_factory=dict)     # columns for reward functions (TRL's extra fields)
    environment: Any = field(default=None, repr=False)       # the instance it ran on (reward functions' `environments`)

    @property
    def messages(self) -> list[dict]:
        """The whole conversation, for samples.jsonl and conversational reward functions."""
        return self.prompt + self.completion

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)

    def check(self, where: str = "episode") -> "Episode":
        """Refuse an episode the update cannot train on: ragged fields, a mask that is not 0 / 1,
        no model token, or a non-finite reward; returns the episode."""
        n = len(self.completion_ids)
        lengths = {"loss_mask": len(self.loss_mask), "logprobs": len(self.logprobs)}
        if self.sampling_logprobs is not None:
            lengths["sampling_logprobs"] = len(self.sampling_logprobs)
        ragged = {k: v for k, v in lengths.items() if v != n}
        if ragged:
            raise RewardError(f"{where}: completion_ids has {n} tokens but " +
                              ", ".join(f"{k} has {v}" for k, v in ragged.items()))
        if any(m not in (0, 1) for m in self.loss_mask):
            raise RewardError(f"{where}: loss_mask must hold only 0 and 1")
        if not self.prompt_ids:
            raise RewardError(f"{where}: prompt_ids is empty")
        if n and not any(self.loss_mask):
            raise RewardError(f"{where}: no token of the completion is the model's (loss_mask is all 0)")
        if self.reward is not None and not math.isfinite(self.reward):
            raise RewardError(f"{where}: reward {self.reward!r} is not a finite number")
        return self


def episodes_from_trl(output: dict) -> list[Episode]:
    """Episodes from TRL's rollout_func return value: per-completion lists of "prompt_ids",
    "completion_ids", "logprobs" and optionally "env_mask" (1 on model tokens; TRL's name for the
    loss mask); every other key is an extra column for the reward functions. TRL's rewards come
    from reward functions, so `reward` is None."""
    missing = [k for k in ("prompt_ids", "completion_ids", "logprobs") if k not in output]
    if missing:
        raise RewardError(f"rollout_func: its output lacks {missing} (it must have prompt_ids, completion_ids, "
                          f"logprobs; env_mask is optional)")
    n = len(output["completion_ids"])
    extra = {k: v for k, v in output.items() if k not in ("prompt_ids", "completion_ids", "logprobs", "env_mask")}
    short = [k for k, v in {**extra, "prompt_ids": output["prompt_ids"], "logprobs": output["logprobs"]}.items()
             if not isinstance(v, (list, tuple)) or len(v) != n]
    if short:
        raise RewardError(f"rollout_func: {short} must be lists of one entry per completion ({n})")
    masks = output.get("env_mask") or [[1] * len(ids) for ids in output["completion_ids"]]
    episodes = []
    for i in range(n):
        ids = list(output["completion_ids"][i])
        logprobs = [float(x) for x in output["logprobs"][i]] if output["logprobs"][i] is not None else [0.0] * len(ids)
        mask = [int(m) for m in masks[i]]
        episode = Episode(prompt_ids=list(output["prompt_ids"][i]), completion_ids=ids, loss_mask=mask,
                          logprobs=[lp if m else 0.0 for lp, m in zip(logprobs, mask)] if len(logprobs) == len(mask)
                          else logprobs,
                          extras={k: v[i] for k, v in extra.items()})
        episodes.append(episode.check(f"rollout_func: completion {i}"))
    return episodes
