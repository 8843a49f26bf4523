"""Reward models: one-label sequence classifiers that score (prompt, completion) text.

A reward model is any `AutoModelForSequenceClassification` with one label, read at the last real
token (for a Llama backbone, LlamaForSequenceClassification: the transformer plus a linear
`score` head). It reads exactly the text the policy saw: `reward_model_text`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from grpo.config.train import RewardSpec
from grpo.errors import RewardError


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
# (grpo.train.reward_model) and scoring (RewardModelScorer) both go through these two functions.

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


def is_reward_model_dir(path: str) -> bool:
    """Whether `path` holds a saved sequence classifier (not a causal LM that would get a fresh,
    random score head if loaded as one)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return True  # a hub id: let from_pretrained decide
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_reward_model(path: str, device: torch.device, dtype: torch.dtype, tokenizer, *, fresh_head: bool = False):
    """A one-label sequence classifier on `device`, ready to score with `tokenizer`.

    `fresh_head`: `path` is a backbone (a causal LM) and gets a new, randomly initialised head, to
    be trained. Otherwise `path` must be a saved reward model: a causal LM is refused, since its
    "scores" would come from a head nobody trained.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if not fresh_head and not is_reward_model_dir(path):
        raise RewardError(f"reward model {path!r}: this directory holds a causal LM, not a reward model "
                          f"(config.json lists no *ForSequenceClassification architecture); train one "
                          f"from it with `grpo reward-model train`")
    # From a causal LM, transformers reports the unused lm_head and the new `score` head at length;
    # both are expected there, so keep the console to our own messages.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, **({"num_labels": 1} if fresh_head else {}))
    except (OSError, ValueError) as e:
        raise RewardError(f"reward model {path!r}: cannot load it as AutoModelForSequenceClassification: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.num_labels != 1:
        raise RewardError(f"reward model {path!r}: expected one label (a scalar score), "
                          f"found num_labels={model.config.num_labels}")
    prepare_for_scoring(model, tokenizer)
    return model.to(device)


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], max_length: int, device, batch_size: int) -> torch.Tensor:
    """Scores [len(texts)] on the CPU, in batches, in the model's own dtype wherever called from."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_for_scoring(tokenizer, texts[i:i + batch_size], max_length, device)
        with torch.autocast(torch.device(device).type, enabled=False):
            out.append(sequence_scores(model, ids, mask).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class RewardModelScorer:
    """A reward model as a reward function: scores (prompt, completion) text under no_grad.

    The reward model sees the same text the policy saw (the formatted prompt followed by the
    completion, see `reward_model_text`). With `normalize`, scores are standardised with running
    moments over all scores seen so far, so a reward model's arbitrary scale does not dominate a
    weighted sum of rewards; the moments are part of a checkpoint (`state_dict`).
    """

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, *,
                 batch_size: int = RewardSpec.batch_size, normalize: bool = RewardSpec.normalize,
                 max_length: int = RewardSpec.max_length):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward model {path!r}: cannot load its tokenizer: {e}") from None
        self.model = load_reward_model(path, device, dtype, self.tokenizer).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.moments = RunningMoments() if normalize else None
        self.__name__ = Path(path).name or path

    def raw_scores(self, texts: list[str]) -> torch.Tensor:
        return score_texts(self.model, self.tokenizer, texts, self.max_length, self.device, self.batch_size)

    def __call__(self, prompts, completions, **_) -> list[float]:
        # `prompts` are already formatted (the rollout and evaluation pass the policy's text).
        scores = self.raw_scores([reward_model_text(p, c) for p, c in zip(prompts, completions)])
        if self.moments is not None:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / (self.moments.std + 1e-8)
        return scores.tolist()

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict() if self.moments else None}

    def load_state_dict(self, state: dict) -> None:
        if self.moments is not None and state.get("moments"):
            self.moments.load_state_dict(state["moments"])
