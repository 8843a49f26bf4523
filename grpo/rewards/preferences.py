"""Preference pairs: reading them from a file, and scoring them with a reward model.

A preference row is {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 0.5 (optional)},
with plain text or chat messages. Bad rows are reported with file:line and skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo.algorithm import bradley_terry_loss
from grpo.data import DataError, format_prompt, is_messages, load_rows

from .models import completion_text, encode_for_scoring, reward_model_text, sequence_scores


@dataclass
class Pair:
    prompt: str      # formatted exactly as the policy sees it
    chosen: str
    rejected: str
    margin: float
    where: str       # file:line, for messages


def _bad_reason(row: dict, prompt_col: str, chosen_col: str, rejected_col: str, margin_col: str) -> str | None:
    """Why a preference row cannot be used, or None if it can."""
    for col in (prompt_col, chosen_col, rejected_col):
        if row.get(col) is None:
            return f"missing column {col!r}"
    prompt = row[prompt_col]
    if isinstance(prompt, str):
        if not prompt.strip():
            return f"empty {prompt_col!r}"
    elif not (is_messages(prompt) and prompt):
        return f"{prompt_col!r} must be text or a list of chat messages"
    texts = []
    for col in (chosen_col, rejected_col):
        try:
            texts.append(completion_text(row[col]))
        except TypeError as e:
            return f"{col!r}: {e}"
        if not texts[-1].strip():
            return f"empty {col!r}"
    if texts[0] == texts[1]:
        return f"{chosen_col!r} == {rejected_col!r} (the pair says nothing)"
    m = row.get(margin_col)
    if m not in (None, ""):
        try:
            if not math.isfinite(float(m)):
                return f"{margin_col!r} is not finite: {m!r}"
        except (TypeError, ValueError):
            return f"{margin_col!r} is not a number: {m!r}"
    return None


def load_preferences(path: str, tokenizer, *, prompt_column="prompt", chosen_column="chosen",
                     rejected_column="rejected", margin_column="margin", chat_template="auto",
                     log=print) -> list[Pair]:
    """Usable pairs of a preference file. Bad rows are reported with file:line and skipped; a file
    with no usable row stops the run."""
    rows = load_rows(path)
    pairs, bad = [], []
    for row in rows:
        where = f"{path}:{row.get('_line', '?')}"
        reason = _bad_reason(row, prompt_column, chosen_column, rejected_column, margin_column)
        if reason:
            bad.append(f"{where}: {reason}")
            continue
        try:
            prompt = format_prompt(tokenizer, row[prompt_column], chat_template)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        m = row.get(margin_column)
        pairs.append(Pair(prompt, completion_text(row[chosen_column]), completion_text(row[rejected_column]),
                          0.0 if m in (None, "") else float(m), where))
    for line in bad[:20]:
        log(f"skipping bad preference row {line}")
    if len(bad) > 20:
        log(f"... and {len(bad) - 20} more bad rows")
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs: all {len(rows)} rows are bad "
                        f"(first: {bad[0]}). Each row needs non-empty {prompt_column!r}, "
                        f"{chosen_column!r} and {rejected_column!r}, with chosen != rejected")
    if bad:
        log(f"{path}: using {len(pairs)} of {len(rows)} rows ({len(bad)} bad)")
    return pairs


def pair_scores(model, tokenizer, pairs: list[Pair], max_length: int, device):
    """(r_chosen [B], r_rejected [B]) in one forward over the 2B texts."""
    texts = ([reward_model_text(p.prompt, p.chosen) for p in pairs]
             + [reward_model_text(p.prompt, p.rejected) for p in pairs])
    ids, mask = encode_for_scoring(tokenizer, texts, max_length, device)
    scores = sequence_scores(model, ids, mask)
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs: list[Pair], max_length: int, device, batch_size: int) -> dict:
    """Pairwise accuracy (a tie counts half), mean margin r_chosen - r_rejected and the BT loss."""
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, tokenizer, pairs[i:i + batch_size], max_length, device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
        margins += [p.margin for p in pairs[i:i + batch_size]]
    model.train(was_training)
    c, r, m = torch.cat(chosen), torch.cat(rejected), torch.tensor(margins)
    diff = c - r
    return {"accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item(),
            "margin": diff.mean().item(), "loss": bradley_terry_loss(c, r, m).item(), "pairs": len(pairs)}
