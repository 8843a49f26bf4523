"""Step rewards: reward functions that score each step of a completion (`per: step`).

A step reward function has TRL's signature plus the completions' steps (grpo.data.steps says how
a completion is cut):

    fn(prompts, completions, steps, **columns) -> list[list[float]]

`steps[i]` is completion i's step texts (consecutive slices that join to its text); it returns,
for every completion, one real number per step. The step rewards of the run are summed with their
weights, step by step, into r_i^(j) (`advantage_estimator: process`); each one's mean over a
completion's steps is what its `reward/<name>/mean` metric reports. Anything else it returns (a
wrong count, a non-number, NaN or inf) stops the run with one line naming the function.
"""

from __future__ import annotations

import math

import torch

from grpo.data.steps import char_ends_to_tokens_batch, delimiter_ends, splitter_ends, step_texts
from grpo.errors import RewardError

from .functions import load_module
from .scoring import _EXIT_GUARD, FLOAT32_MAX, Reward, _real, call_reward


def _step_scores(r: Reward, values, steps: list[list[str]]) -> list[list[float]]:
    n = len(steps)
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise RewardError(f"step reward {r.name!r} returned a {type(values).__name__}; expected a list of {n} "
                          f"lists, one score per step of each completion")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"step reward {r.name!r} returned {len(values)} lists; expected {n}, one per completion")
    out = []
    for i, (row, texts) in enumerate(zip(values, steps)):
        if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__iter__"):
            raise RewardError(f"step reward {r.name!r} returned {str(row)[:40]!r} for completion {i}; expected a "
                              f"list of {len(texts)} scores, one per step")
        row = list(row)
        if len(row) != len(texts):
            raise RewardError(f"step reward {r.name!r} returned {len(row)} scores for completion {i}, which has "
                              f"{len(texts)} steps {[t[:20] for t in texts][:4]}; expected one score per step")
        scores = []
        for j, v in enumerate(row):
            x = _real(v)
            if x is None or not abs(x) <= FLOAT32_MAX:
                raise RewardError(f"step reward {r.name!r} returned {str(v)[:40]!r} for step {j} of completion "
                                  f"{i}; expected a finite real number")
            scores.append(x)
        out.append(scores)
    return out


def score_steps(rewards: list[Reward], prompts: list, completions: list, steps: list[list[str]],
                columns: dict[str, list], timeout: float | None = None
                ) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """The weighted sum of the step rewards, per step of each completion, and each reward's mean
    over each completion's steps [N] (for its metrics)."""
    total = [[0.0] * len(s) for s in steps]
    means = {}
    with _EXIT_GUARD.installed([r.name for r in rewards]):
        outputs = {r.name: call_reward(r, timeout, prompts=prompts, completions=completions, steps=steps, **columns)
                   for r in rewards}
    for r in rewards:
        scores = _step_scores(r, outputs[r.name], steps)
        for row, given in zip(total, scores):
            for j, x in enumerate(given):
                row[j] += r.weight * x
        means[r.name] = torch.tensor([sum(s) / len(s) if s else math.nan for s in scores], dtype=torch.float32)
    return total, means


def load_splitter(spec):
    """config key `step_splitter`: a Python function, or file.py:fn / module:fn (None when unset)."""
    if not spec:
        return None
    if callable(spec):
        return spec
    module, name = load_module(spec, "step_splitter", shared=True)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"step_splitter {spec!r}: {spec.rsplit(':', 1)[0]} has no function {name!r}")
    return fn


def completion_steps(tokenizer, texts: list[str], completion_ids: list[list[int]], stop_ids, delimiter: str,
                     splitter=None) -> tuple[list[list[str]], list[list[int]]]:
    """Each completion's step texts and the token index each step ends on (grpo.data.steps).
    `completion_ids` are each completion's tokens, EOS included, padding not; `texts` their
    decoding up to the first id of `stop_ids` (grpo.data.decode_completions)."""
    stops = set(stop_ids)
    name = getattr(splitter, "__name__", "step_splitter")
    char_ends = [delimiter_ends(text, delimiter) if splitter is None else splitter_ends(text, splitter, name)
                 for text in texts]
    before_stop = [ids[:next((j for j, t in enumerate(ids) if t in stops), len(ids))] for ids in completion_ids]
    token_ends = char_ends_to_tokens_batch(tokenizer, before_stop, char_ends, [len(ids) for ids in completion_ids],
                                           texts)
    return [step_texts(text, ends) for text, ends in zip(texts, char_ends)], token_ends
