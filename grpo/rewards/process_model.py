"""Process reward models (PRMs): a token-classification head read at the end of every step.

As TRL's `PRMTrainer` (and Lightman et al. 2023, "Let's Verify Step by Step", arXiv:2305.20050;
Math-Shepherd, Wang et al. 2023, arXiv:2312.08935): the text is the prompt followed by each step
and a separator (`step_separator`, default "\\n"), and a two-label head
(`AutoModelForTokenClassification`, label 1 = a good step) is read on each separator token. A
step's score is the probability the head gives label 1 there.

`encode` makes the model's input for training and scoring alike; `ProcessRewardScorer` is the
step reward (`rewards: [{model: DIR, per: step}]`) that a trained PRM directory becomes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grpo.errors import ModelError

SETTINGS_FILE = "process_reward_model.json"  # marks a PRM directory and holds its step separator


def encode(tokenizer, prompt: str, steps: list[str], separator: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + (step + separator) for each step, and the index of each step's last
    token (its separator's last). A text over `max_length` tokens loses its start; a step whose
    end falls before the kept part gets index -1 (it is not read)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids = ids + tokenizer(step + separator, add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    cut = max(0, len(ids) - max_length)
    return ids[cut:], [e - cut if e >= cut else -1 for e in ends]


def strip_separator(step: str, separator: str) -> str:
    """A step as the PRM was trained on it: without the separator it may end with (`step_delimiter`)."""
    return step[:-len(separator)] if separator and step.endswith(separator) else step


class ProcessRewardScorer:
    """A trained PRM as a step reward: fn(prompts, completions, steps) -> P(good step) per step."""

    def __init__(self, path: str, device, dtype, max_length: int = 1024, batch_size: int = 64):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        settings = Path(path) / SETTINGS_FILE
        if not settings.is_file():
            raise ModelError(f"{path} is not a process reward model (no {SETTINGS_FILE}); train one with "
                             f"grpo reward-model train --kind process")
        self.separator = json.loads(settings.read_text())["step_separator"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.__name__ = "prm_" + Path(path).name

    @torch.no_grad()
    def __call__(self, prompts, completions, steps, **_) -> list[list[float]]:
        encoded = [encode(self.tokenizer, str(p), [strip_separator(s, self.separator) for s in ss], self.separator,
                          self.max_length) for p, ss in zip(prompts, steps)]
        out = []
        for i in range(0, len(encoded), self.batch_size):
            chunk = encoded[i:i + self.batch_size]
            probs = good_step_probs(self.model, [ids for ids, _ in chunk], self.tokenizer.pad_token_id, self.device)
            for row, (_, ends) in zip(probs, chunk):
                # A step cut off by max_length is scored as its first kept token's.
                out.append([float(row[max(e, 0)]) for e in ends])
        return out


def right_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    return ids, mask


def good_step_probs(model, rows: list[list[int]], pad: int, device) -> torch.Tensor:
    """P(label 1) at every position of each row: [B, T]."""
    ids, mask = right_pad(rows, pad, device)
    return model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)[..., 1]
