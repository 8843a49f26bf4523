"""Rankings: K completions of one prompt ordered best to worst, for Plackett-Luce reward models.

A ranking row is {"prompt": ..., "completions": [best, ..., worst]}, each completion plain text or
chat messages; an entry that is a list of completions is a tie group ({"completions": ["a",
["b", "c"], "d"]}: b and c tied second). An optional `labels` column gives a verifier's label of
each completion, in the order they are written (flattened), for the correct-vs-wrong accuracy.
Bad rows are reported with file:line and skipped, as preference pairs are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo.algorithm import plackett_luce_loss
from grpo.data import is_messages, load_rows

from .models import completion_text
from .preferences import read_feedback


@dataclass
class Ranking:
    prompt: str               # formatted exactly as the policy sees it
    completions: list[str]    # best first
    tiers: list[int]          # each completion's tie group, 0 = best
    labels: list[float] | None
    where: str                # file:line, for messages


def is_ranking_file(path: str, completions_column: str = "completions") -> bool:
    """Whether a feedback file holds rankings (its rows have `completions_column`) or pairs."""
    return completions_column in load_rows(path)[0]


def _entries(value) -> list[list]:
    """The tie groups of a `completions` value: a completion alone, or a list of them."""
    if not isinstance(value, list):
        raise TypeError("must be a list of completions, best first")
    groups = []
    for entry in value:
        if isinstance(entry, str) or is_messages(entry):
            groups.append([entry])
        elif isinstance(entry, list) and entry and all(isinstance(e, str) or is_messages(e) for e in entry):
            groups.append(list(entry))
        else:
            raise TypeError(f"entry {entry!r:.40} is neither a completion (text or chat messages) nor a tie group "
                            f"(a list of completions)")
    return groups


def parse_ranking(row: dict, prompt_col: str, completions_col: str, labels_col: str):
    """(texts best first, tiers, labels) of a ranking row, or the reason it cannot be used."""
    prompt = row.get(prompt_col)
    if prompt is None:
        return f"missing column {prompt_col!r}"
    if isinstance(prompt, str):
        if not prompt.strip():
            return f"empty {prompt_col!r}"
    elif not (is_messages(prompt) and prompt):
        return f"{prompt_col!r} must be text or a list of chat messages"
    if row.get(completions_col) is None:
        return f"missing column {completions_col!r}"
    try:
        groups = _entries(row[completions_col])
    except TypeError as e:
        return f"{completions_col!r} {e}"
    texts, tiers = [], []
    for tier, group in enumerate(groups):
        for c in group:
            texts.append(completion_text(c).strip())
            tiers.append(tier)
    if len(texts) < 2:
        return f"{completions_col!r} holds {len(texts)} completion(s); a ranking needs at least 2"
    if any(not t for t in texts):
        return f"{completions_col!r} holds an empty completion"
    twice = sorted({t for t in texts if texts.count(t) > 1})
    if twice:
        return f"{completions_col!r} holds the completion {twice[0]!r:.40} more than once"
    if len(set(tiers)) < 2:
        return f"{completions_col!r}: every completion is tied (the ranking says nothing)"
    labels = row.get(labels_col)
    if labels is not None:
        numbers = isinstance(labels, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in labels)
        if not (numbers and len(labels) == len(texts)):
            return f"{labels_col!r} must be a list of {len(texts)} numbers, one per completion in written order"
        labels = [float(x) for x in labels]
    return texts, tiers, labels


def load_rankings(path: str, tokenizer, *, prompt_column="prompt", completions_column="completions",
                  labels_column="labels", chat_template="auto", log=print) -> list[Ranking]:
    """Usable rankings of a file. Bad rows (fewer than 2 completions, a completion twice, all tied,
    a malformed entry) are reported with file:line and skipped; a file with none usable stops."""
    return read_feedback(path, tokenizer, prompt_column, chat_template,
                         lambda row: parse_ranking(row, prompt_column, completions_column, labels_column),
                         Ranking, log, kind="ranking", items="rankings",
                         needs=f"a non-empty {prompt_column!r} and {completions_column!r}: at least 2 distinct "
                               f"completions, best first")


def ranking_scores(rm, rankings: list[Ranking]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [B, K], tiers [B, K], mask [B, K]) of a reward model of any kind, K the longest
    ranking, in one pass over every completion."""
    prompts = [r.prompt for r in rankings for _ in r.completions]
    flat = rm.scores(prompts, [c for r in rankings for c in r.completions])
    K = max(len(r.completions) for r in rankings)
    rows, at = [], 0
    for r in rankings:  # padded to K; the padding is masked out of the loss
        k = len(r.completions)
        rows.append(torch.nn.functional.pad(flat[at:at + k], (0, K - k)))
        at += k
    tiers = torch.tensor([r.tiers + [0] * (K - len(r.tiers)) for r in rankings], device=flat.device)
    mask = torch.tensor([[True] * len(r.tiers) + [False] * (K - len(r.tiers)) for r in rankings], device=flat.device)
    scores = torch.stack(rows)
    return scores, tiers, mask


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two orderings of the same items (ties in either allowed); None when one
    of them ties everything. tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2)) (Kendall 1945)."""
    concordant = discordant = tied_x = tied_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tied_x += 1
            elif dy == 0:
                tied_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def ranking_metrics(scores: list[float], ranking: Ranking) -> dict:
    """One ranking's Kendall tau-b (model scores vs the given order), top-1 (the model's best is in
    the first tie group), pairwise accuracy over pairs in different tie groups (a tie counts
    half), and over correct-vs-wrong pairs when the row has labels."""
    worth = [-t for t in ranking.tiers]
    best = max(range(len(scores)), key=lambda i: scores[i])
    pairs = [(i, j) for i in range(len(scores)) for j in range(len(scores)) if ranking.tiers[i] < ranking.tiers[j]]

    def right(i, j):
        return 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0

    out = {"kendall_tau": kendall_tau_b(scores, worth), "top1": float(ranking.tiers[best] == 0),
           "pairs_right": sum(right(i, j) for i, j in pairs), "pairs": len(pairs)}
    if ranking.labels is not None:
        labelled = [(i, j) for i in range(len(scores)) for j in range(len(scores))
                    if ranking.labels[i] > ranking.labels[j]]
        out.update(cvw_right=sum(right(i, j) for i, j in labelled), cvw=len(labelled))
    return out


@torch.no_grad()
def evaluate_rankings(rm, rankings: list[Ranking], batch_size: int) -> dict:
    """Mean Kendall's tau-b, top-1 accuracy, pairwise accuracy (pairs of different tie groups),
    correct-vs-wrong accuracy (rows with labels; None without) and the Plackett-Luce loss."""
    model = rm.model
    was_training = model.training
    model.eval()
    per, losses, weight = [], 0.0, 0
    step = max(1, batch_size // max(len(r.completions) for r in rankings))  # about batch_size sequences a pass
    for i in range(0, len(rankings), step):
        chunk = rankings[i:i + step]
        scores, tiers, mask = ranking_scores(rm, chunk)
        losses += plackett_luce_loss(scores, tiers, mask).item() * len(chunk)
        weight += len(chunk)
        for b, r in enumerate(chunk):
            per.append(ranking_metrics(scores[b, :len(r.completions)].float().cpu().tolist(), r))
    model.train(was_training)
    taus = [m["kendall_tau"] for m in per if m["kendall_tau"] is not None]
    cvw = sum(m.get("cvw", 0) for m in per)
    return {"kendall_tau": sum(taus) / len(taus) if taus else None,
            "top1_accuracy": sum(m["top1"] for m in per) / len(per),
            "accuracy": sum(m["pairs_right"] for m in per) / max(1, sum(m["pairs"] for m in per)),
            "correct_vs_wrong_accuracy": sum(m.get("cvw_right", 0) for m in per) / cvw if cvw else None,
            "loss": losses / weight, "rankings": len(rankings)}


def ranking_from_samples(completions: list[str], answer: str, task, max_items: int,
                         use_reference: bool, by: str = "verifier") -> tuple[list, list[float]] | None:
    """A ranking of one prompt's samples by a task's verifier (grpo.rewards.preferences.Task):
    the right answers first (tied); then, `by="verifier"`, the wrong ones tied below them, or,
    `by="distance"`, the wrong ones closer to farther, equal distances tied, non-answers last.
    Duplicates and empty completions are dropped, the first `max_items` distinct ones kept; with
    `use_reference`, a group with no right answer gets the reference answer on top, as a labeller
    would write it. Returns (tie groups best first, labels in written order), or None when fewer
    than 2 distinct completions or one tie group remain."""
    unique = list(dict.fromkeys(c.strip() for c in completions if c.strip()))[:max_items]
    if use_reference and not any(task.is_correct(c, answer) for c in unique):
        unique.append(str(answer).strip())

    def key(c: str) -> tuple:
        distance = task.distance(c, answer) if by == "distance" and task.distance is not None else float("inf")
        return (not task.is_correct(c, answer), 0.0 if task.is_correct(c, answer) else distance)

    keys = sorted({key(c) for c in unique})
    if len(unique) < 2 or len(keys) < 2:
        return None
    groups = [[c for c in unique if key(c) == k] for k in keys]
    entries = [g[0] if len(g) == 1 else g for g in groups]
    labels = [float(task.is_correct(c, answer)) for g in groups for c in g]
    return entries, labels


def ranking_pairs(ranking: Ranking) -> list:
    """Every (better, worse) pair of a ranking, across tie groups, as preference pairs."""
    from .preferences import Pair

    c, t = ranking.completions, ranking.tiers
    return [Pair(ranking.prompt, c[i], c[j], 0.0, ranking.where)
            for i in range(len(c)) for j in range(len(c)) if t[i] < t[j]]
