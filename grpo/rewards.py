"""Rewards: r_i = sum_k w_k * R_k(prompt, completion, row columns).

A reward function has the TRL signature `fn(prompts, completions, **columns) -> list[float]`:
`prompts` and `completions` are lists of strings of equal length N, each extra dataset column
arrives as a list of N values. A reward is given in the config as
  {function: exact_answer}                      a built-in (see BUILTIN)
  {function: path/to/file.py:my_reward}         a function in a Python file
  {function: my_package.rewards:my_reward}      a function in an importable module
  {model: path/to/reward_model}                 a one-label AutoModelForSequenceClassification
each with an optional `weight` (default 1.0) and, for models, `normalize: true` to divide scores
by a running standard deviation after subtracting a running mean.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


class RewardError(ValueError):
    """A reward that cannot be loaded or returned something unusable; names the reward."""


# ---------------------------------------------------------------------------------------------
# Built-in rewards

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion, stripped of whitespace, is exactly the `answer` column, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def _first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def answer_distance(prompts, completions, answer, **_) -> list[float]:
    """A dense reward: 1 / (1 + |first number in completion - answer|), 0 without a number."""
    out = []
    for c, a in zip(completions, answer):
        x = _first_number(c)
        out.append(0.0 if x is None else 1.0 / (1.0 + abs(x - float(a))))
    return out


_THINK = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def think_format(prompts, completions, **_) -> list[float]:
    """DeepSeek-R1's format reward: 1.0 for '<think>...</think> <answer>...</answer>', else 0.0."""
    return [float(bool(_THINK.match(c.strip()))) for c in completions]


BUILTIN: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "answer_distance": answer_distance,
    "think_format": think_format,
}


def load_function(spec: str) -> Callable:
    """A built-in name, `path/to/file.py:function` or `package.module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise RewardError(f"reward function {spec!r}: not a built-in ({', '.join(BUILTIN)}) and not of "
                          f"the form path/to/file.py:function or package.module:function")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward function {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"grpo_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"reward function {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RewardError(f"reward function {spec!r}: cannot import module {target!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {target} has no function {name!r}")
    return fn


# ---------------------------------------------------------------------------------------------
# Reward models

class RunningMoments:
    """Running mean and variance (Chan et al. parallel update), for normalising reward-model scores."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        n = xs.numel()
        if n == 0:
            return
        mean, var = xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += var * n + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.m2 = s["count"], s["mean"], s["m2"]


# The reward model must score exactly the text the policy produced it from: the prompt formatted as
# the policy saw it (chat template included) followed by the completion. Training
# (grpo.reward_model) and scoring (RewardModelScorer) both go through these two functions.

def completion_text(completion) -> str:
    """A completion as plain text: a string, or the content of a list of (assistant) chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"]) for m in completion)
    raise TypeError(f"a completion must be text or a list of chat messages, got {type(completion).__name__}")


def reward_model_text(formatted_prompt: str, completion) -> str:
    """What a reward model reads: the policy's formatted prompt, then the completion, no separator."""
    return formatted_prompt + completion_text(completion)


def encode_for_scoring(tokenizer, texts: list[str], max_length: int, device=None):
    """Right-padded ids and mask. A long text loses its *start*: the completion at the end is what
    is being judged, and the score is read at the last real token."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] or [tokenizer.pad_token_id]
           for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return input_ids.to(device), mask.to(device)


def prepare_for_scoring(model, tokenizer) -> None:
    """Give the tokenizer a pad token and tell the model which id it is.

    A causal LM's sequence-classification head (e.g. LlamaForSequenceClassification) reads the
    score at the rightmost token that is not `config.pad_token_id`; without one it cannot batch.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None or model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(model, "score", None)  # the one-label head of *ForSequenceClassification
    if isinstance(head, torch.nn.Linear):
        # The score in float32, whatever the backbone computes in (bf16 weights, or autocast while
        # training): a bf16 score keeps ~3 significant digits, enough to tie completions of one
        # group that the model does rank apart (zero advantage for both) and preference pairs.
        head.float()
        linear = head.forward

        def float32_score(hidden: torch.Tensor) -> torch.Tensor:
            with torch.autocast(hidden.device.type, enabled=False):
                return linear(hidden.float())
        head.forward = float32_score


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence [B]: the one-label head at the last real token (fp32)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


class RewardModelScorer:
    """Scores (prompt, completion) text with a one-label sequence classifier, batched, under no_grad.

    The reward model sees the same text the policy saw (the formatted prompt followed by the
    completion, see `reward_model_text`). With `normalize`, scores are standardised with running
    moments over all scores seen so far, so a reward model's arbitrary scale does not dominate a
    weighted sum of rewards.
    """

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64,
                 normalize: bool = False, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward model {path!r}: cannot load it: {e}") from None
        if self.model.config.num_labels != 1:
            raise RewardError(f"reward model {path!r}: expected one label (a scalar score), "
                              f"found num_labels={self.model.config.num_labels}")
        prepare_for_scoring(self.model, self.tokenizer)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.moments = RunningMoments() if normalize else None
        self.__name__ = Path(path).name or path

    @torch.no_grad()
    def raw_scores(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = encode_for_scoring(self.tokenizer, texts[i:i + self.batch_size], self.max_length,
                                           self.device)
            with torch.autocast(self.device.type, enabled=False):  # the model's own dtype, wherever called from
                out.append(sequence_scores(self.model, ids, mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts, completions, **_) -> list[float]:
        # `prompts` are already formatted (grpo.rollout / grpo.evaluate pass the policy's text).
        scores = self.raw_scores([reward_model_text(p, c) for p, c in zip(prompts, completions)])
        if self.moments is not None:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-8)
        return scores.tolist()


# ---------------------------------------------------------------------------------------------

@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0


def build_rewards(specs: list, device: torch.device, dtype: torch.dtype) -> list[Reward]:
    rewards, names = [], set()
    for spec in specs:
        spec = {"function": spec} if isinstance(spec, str) else spec
        if "function" in spec:
            fn = load_function(spec["function"])
            default_name = spec["function"].rsplit(":", 1)[-1]
        else:
            fn = RewardModelScorer(spec["model"], device, dtype, batch_size=spec.get("batch_size", 64),
                                   normalize=spec.get("normalize", False))
            default_name = "rm_" + fn.__name__
        name = spec.get("name", default_name)
        while name in names:
            name += "_"
        names.add(name)
        rewards.append(Reward(name, fn, float(spec.get("weight", 1.0))))
    return rewards


def score(rewards: list[Reward], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total [N] and each reward's unweighted values [N], checked for shape and NaN."""
    per_reward, total = {}, torch.zeros(len(completions), dtype=torch.float32)
    for r in rewards:
        try:
            values = r.fn(prompts, completions, **columns)
        except TypeError as e:
            raise RewardError(f"reward {r.name!r} failed: {e}. Reward functions are called as "
                              f"fn(prompts, completions, **columns) with columns {sorted(columns)}") from None
        if values is None or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values"
            raise RewardError(f"reward {r.name!r} returned {got}; expected a list of {len(completions)} floats")
        try:
            t = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            raise RewardError(f"reward {r.name!r} returned non-numeric values: {list(values)[:4]}...") from None
        if not torch.isfinite(t).all():
            raise RewardError(f"reward {r.name!r} returned NaN or infinite values")
        per_reward[r.name] = t
        total += r.weight * t
    return total, per_reward
