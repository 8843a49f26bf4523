"""Prompt datasets: local JSONL, CSV or Parquet rows, and turning a row's prompt into text.

A `prompt` holds plain text or a list of chat messages ({"role", "content"}). Every other column
of a row travels with it to the reward functions (e.g. `answer` for a verifier).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A bad dataset file or row; the message names the file and line."""


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read every row of a JSONL, CSV or Parquet file as a dict. Each row remembers its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".jsonl", ".json"):
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                rows.append({**row, "_line": lineno})
    elif suffix == ".csv":
        with path.open(newline="") as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                rows.append({**row, "_line": lineno})
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'grpo[parquet]'") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            rows.append({**row, "_line": i})
    else:
        raise DataError(f"{path}: unknown dataset format {suffix!r}; expected .jsonl, .csv or .parquet")
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return rows


def require_columns(rows: list[dict], columns: list[str], path: str | Path) -> None:
    """Stop at the first row missing a column the run needs."""
    for row in rows:
        for col in columns:
            if col not in row or row[col] is None:
                have = sorted(k for k in row if k != "_line")
                raise DataError(f"{path}:{row.get('_line', '?')}: missing column {col!r} "
                                f"(the row has {have})")


def is_messages(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)


def format_prompt(tokenizer, prompt: Any, mode: str = "auto") -> str:
    """The exact text the policy sees for a prompt.

    Chat messages always go through the tokenizer's chat template (with the generation prompt
    appended). Plain text does too when the tokenizer has a template and `mode` is "auto", as a
    single user turn; otherwise it is used verbatim (base models, the built-in tasks).
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if is_messages(prompt):
        if not has_template:
            raise DataError("a prompt is a list of chat messages but the tokenizer has no chat "
                            "template; give plain-text prompts or a tokenizer with a template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise DataError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    if has_template and mode == "auto":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def tokenize_prompts(tokenizer, texts: list[str], max_length: int, device=None):
    """Left-padded prompt ids and mask; long prompts keep their end (the part next to the answer)."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
    return input_ids.to(device), mask.to(device)


class PromptSampler:
    """Endless shuffled passes over the rows; its position is part of a checkpoint."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        import torch
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()
