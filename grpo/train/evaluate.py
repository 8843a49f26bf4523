"""Held-out evaluation: one greedy completion per prompt, scored by the run's rewards.

Accuracy is the fraction of prompts whose accuracy reward (by default `exact_answer`) is 1.
"""

from __future__ import annotations

import torch

from grpo.data import decode_completions, format_prompt, tokenize_prompts
from grpo.engine.backend import RolloutBackend, SamplingParams
from grpo.errors import ConfigError
from grpo.rewards import score


def accuracy_reward_name(rewards, requested: str) -> str | None:
    names = [r.name for r in rewards]
    if requested:
        if requested not in names:
            raise ConfigError(f"accuracy_reward: {requested!r} is not one of the run's rewards {names}")
        return requested
    return "exact_answer" if "exact_answer" in names else None


@torch.no_grad()
def evaluate(backend: RolloutBackend, tokenizer, rows: list[dict], rewards, cfg,
             accuracy_reward: str | None) -> dict:
    """Greedy completions for `rows` (cfg: prompt_column, apply_chat_template, max_prompt_length,
    max_completion_length, eval_batch_size); returns accuracy (if defined), reward means and
    the completions."""
    totals, per_function, completions = [], {}, []
    greedy = SamplingParams.greedy(cfg.max_completion_length)
    for i in range(0, len(rows), cfg.eval_batch_size):
        chunk = rows[i:i + cfg.eval_batch_size]
        texts = [format_prompt(tokenizer, r[cfg.prompt_column], cfg.apply_chat_template) for r in chunk]
        ids, mask = tokenize_prompts(tokenizer, texts, cfg.max_prompt_length)  # the backend moves them
        done = decode_completions(tokenizer, backend.generate(ids, mask, greedy).completion_ids)
        columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k not in (cfg.prompt_column, "_line")}
        total, parts = score(rewards, texts, done, columns, timeout=cfg.reward_timeout)
        totals.append(total)
        for k, v in parts.items():
            per_function.setdefault(k, []).append(v)
        completions += done
    result = {"reward": torch.cat(totals).mean().item(), "completions": completions,
              "reward_per_function": {k: torch.cat(v).mean().item() for k, v in per_function.items()}}
    if accuracy_reward:
        result["accuracy"] = (torch.cat(per_function[accuracy_reward]) == 1).float().mean().item()
    return result
