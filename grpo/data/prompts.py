"""Turning a row's prompt into the exact text and tokens the policy sees.

A prompt holds plain text or a list of chat messages ({"role", "content"}).
"""

from __future__ import annotations

from typing import Any

import torch

from grpo.errors import DataError

CHAT_TEMPLATE_MODES = ("auto", "never")


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


def check_prompts(tokenizer, rows: list[dict], column: str, source, mode: str) -> None:
    """Format every row's prompt as the run will, before any model is loaded: a prompt that is not
    text or messages, that the chat template rejects, or that comes out empty stops here with its
    file and line, not at the step that first samples it."""
    for row in rows:
        where = f"{source}:{row.get('_line', '?')}"
        prompt = row.get(column)
        try:
            text = format_prompt(tokenizer, prompt, mode)
        except DataError as e:
            raise DataError(f"{where}: {column}: {e}") from None
        except Exception as e:  # the template's own error (jinja2.TemplateError, a missing role...)
            raise DataError(f"{where}: {column}: the tokenizer's chat template rejects this prompt: "
                            f"{type(e).__name__}: {e}") from None
        if not text or not tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise DataError(f"{where}: {column}: the prompt is empty (it has no tokens)")


def tokenize_prompts(tokenizer, texts: list[str], max_length: int, device=None):
    """Left-padded prompt ids and mask; long prompts keep their end (the part next to the answer)."""
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


def decode_completions(tokenizer, completion_ids) -> list[str]:
    """The text of each completion, as rewards and evaluation see it (special tokens dropped)."""
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
