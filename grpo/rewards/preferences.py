"""Preference pairs: reading them from a file, and scoring them with a reward model.

A preference row is {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 0.5 (optional)},
with plain text or chat messages. Bad rows are reported with file:line and skipped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from grpo.algorithm import bradley_terry_loss
from grpo.data import DataError, format_prompt, is_messages, load_rows

from .functions import is_exact_answer
from .models import completion_text


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
    def parse(row):
        reason = _bad_reason(row, prompt_column, chosen_column, rejected_column, margin_column)
        if reason:
            return reason
        m = row.get(margin_column)
        return (completion_text(row[chosen_column]), completion_text(row[rejected_column]),
                0.0 if m in (None, "") else float(m))

    return read_feedback(path, tokenizer, prompt_column, chat_template, parse, Pair, log,
                         kind="preference", items="preference pairs",
                         needs=f"non-empty {prompt_column!r}, {chosen_column!r} and {rejected_column!r}, "
                               f"with chosen != rejected")


def read_feedback(path: str, tokenizer, prompt_column: str, chat_template, parse, make, log, *,
                  kind: str, items: str, needs: str) -> list:
    """The usable rows of a feedback file (pairs or rankings): `parse(row)` gives a reason the row
    is bad, or its parsed fields, and `make(prompt, *fields, where)` the item. Bad rows are
    reported with file:line and skipped; a file with no usable row stops the run."""
    rows = load_rows(path)
    out, bad = [], []
    for row in rows:
        where = f"{path}:{row.get('_line', '?')}"
        parsed = parse(row)
        if isinstance(parsed, str):
            bad.append(f"{where}: {parsed}")
            continue
        try:
            prompt = format_prompt(tokenizer, row[prompt_column], chat_template)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        out.append(make(prompt, *parsed, where))
    log_skipped(bad, kind, log)
    if not out:
        raise DataError(f"{path}: no usable {items}: all {len(rows)} rows are bad (first: {bad[0]}). "
                        f"Each row needs {needs}")
    if bad:
        log(f"{path}: using {len(out)} of {len(rows)} rows ({len(bad)} bad)")
    return out


def pair_scores(rm, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) of a reward model of any kind, in one pass over the 2B texts."""
    scores = rm.scores([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(rm, pairs: list[Pair], batch_size: int) -> dict:
    """Pairwise accuracy (a tie counts half), mean margin r_chosen - r_rejected and the BT loss."""
    model = rm.model
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_scores(rm, pairs[i:i + batch_size])
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
        margins += [p.margin for p in pairs[i:i + batch_size]]
    model.train(was_training)
    c, r, m = torch.cat(chosen), torch.cat(rejected), torch.tensor(margins)
    diff = c - r
    return {"accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item(),
            "margin": diff.mean().item(), "loss": bradley_terry_loss(c, r, m).item(), "pairs": len(pairs)}


# ----------------------------------------------------------------------------------------------
# Making pairs from samples: a verifier (is this completion right?) and, where it makes sense, a
# distance to the answer (which of two wrong answers is closer).

@dataclass
class Task:
    is_correct: Callable[[str, str], bool]
    distance: Callable[[str, str], float] | None   # smaller is closer; inf when not an answer


def numeric_distance(completion: str, answer: str) -> float:
    """|completion - answer| when the whole completion is a number, else inf: a malformed string
    ("12+3") is never "closer" than a wrong number because of its first digits."""
    try:
        return abs(float(completion.strip()) - float(answer))
    except ValueError:
        return float("inf")


TASKS = {
    # The exact-answer verifier of grpo.rewards.exact_answer, and |number - answer| as distance.
    "addition": Task(is_correct=is_exact_answer, distance=numeric_distance),
}


def pairs_for_prompt(completions: list[str], answer: str, task: Task, rng: random.Random,
                     correct_pairs: int, closer_pairs: int, use_reference: bool) -> list[dict]:
    """Preference pairs from one prompt's samples (duplicates removed, empty completions dropped):
    correct vs incorrect ("correct"), and the closer of two wrong answers vs the farther ("closer")."""
    unique = list(dict.fromkeys(c.strip() for c in completions if c.strip()))
    right = [c for c in unique if task.is_correct(c, answer)]
    wrong = [c for c in unique if not task.is_correct(c, answer)]
    if not right and use_reference:
        right = [str(answer).strip()]
    pairs = []
    for rejected in rng.sample(wrong, min(correct_pairs, len(wrong))) if right else []:
        pairs.append({"chosen": rng.choice(right), "rejected": rejected, "kind": "correct"})
    if task.distance is not None and closer_pairs and len(wrong) >= 2:
        candidates = [(a, b) for i, a in enumerate(wrong) for b in wrong[i + 1:]
                      if task.distance(a, answer) != task.distance(b, answer)]
        for a, b in rng.sample(candidates, min(closer_pairs, len(candidates))):
            closer, farther = (a, b) if task.distance(a, answer) < task.distance(b, answer) else (b, a)
            pairs.append({"chosen": closer, "rejected": farther, "kind": "closer"})
    return pairs


def pairs_from_labels(prompt: str, completions: list[str], labels: list[float], rng: random.Random,
                      max_pairs: int, where: str = "") -> list[Pair]:
    """Pairs among one prompt's samples by a labelling function: two distinct completions with
    different labels, the higher one chosen (a verifier's 1 over its 0). Duplicates and empty
    completions are dropped first; at most `max_pairs`, drawn with `rng`."""
    best: dict[str, float] = {}
    for c, label in zip(completions, labels):
        c = c.strip()
        if c and label == label:  # NaN: the labeller does not apply
            best[c] = max(best.get(c, label), label)
    unique = list(best)
    candidates = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1:] if best[a] != best[b]]
    chosen = rng.sample(candidates, min(max_pairs, len(candidates)))
    return [Pair(prompt, a, b, 0.0, where) if best[a] > best[b] else Pair(prompt, b, a, 0.0, where) for a, b in chosen]


def log_skipped(bad: list[str], kind: str, log) -> None:
    """Say which rows of a feedback file were skipped and why: the first 20, then a count."""
    for line in bad[:20]:
        log(f"skipping bad {kind} row {line}")
    if len(bad) > 20:
        log(f"... and {len(bad) - 20} more bad rows")
