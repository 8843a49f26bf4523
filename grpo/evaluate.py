"""Held-out evaluation: one greedy completion per prompt, scored by the run's rewards.

Accuracy is the fraction of prompts whose accuracy reward (by default `exact_answer`) is 1.
"""

from __future__ import annotations

import torch

from .data import format_prompt, tokenize_prompts
from .generation import generate_groups
from .rewards import score


def accuracy_reward_name(rewards, requested: str = "") -> str | None:
    names = [r.name for r in rewards]
    if requested:
        if requested not in names:
            raise ValueError(f"accuracy_reward: {requested!r} is not one of the run's rewards {names}")
        return requested
    return "exact_answer" if "exact_answer" in names else None


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], rewards, *, prompt_column: str = "prompt",
             chat_template: str = "auto", max_prompt_length: int = 512, max_new_tokens: int = 256,
             batch_size: int = 256, accuracy_reward: str | None = None) -> dict:
    """Greedy completions for `rows`; returns accuracy (if defined), reward means and completions."""
    totals, per_function, completions = [], {}, []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        texts = [format_prompt(tokenizer, r[prompt_column], chat_template) for r in chunk]
        ids, mask = tokenize_prompts(tokenizer, texts, max_prompt_length, next(model.parameters()).device)
        # top_k=1 sampling is greedy decoding: argmax at every step.
        out = generate_groups(model, ids, mask, group_size=1, max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              strategy="sample", top_k=1)
        done = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k not in (prompt_column, "_line")}
        total, parts = score(rewards, texts, done, columns)
        totals.append(total)
        for k, v in parts.items():
            per_function.setdefault(k, []).append(v)
        completions += done
    result = {"reward": torch.cat(totals).mean().item(), "completions": completions,
              "reward_per_function": {k: torch.cat(v).mean().item() for k, v in per_function.items()}}
    if accuracy_reward:
        result["accuracy"] = (torch.cat(per_function[accuracy_reward]) == 1).float().mean().item()
    return result
