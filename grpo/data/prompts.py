"""Turning a row's prompt into the exact text and tokens the policy sees, and the policy's
tokens back into the text its rewards read.

A prompt holds plain text or a list of chat messages ({"role", "content"}); TRL's rule decides
which goes through the chat template (`format_prompt`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from grpo.errors import DataError

from .rows import where as row_where

CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def is_messages(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)


def format_prompt(tokenizer, prompt: Any, mode: str = "auto", template_kwargs: dict | None = None) -> str:
    """The exact text the policy sees for a prompt, by TRL's rule.

    Chat messages go through the tokenizer's chat template with the generation prompt appended
    (when the last message is the assistant's, its text is continued instead, as TRL does), with
    `template_kwargs` passed on (e.g. Qwen3's enable_thinking). Plain text is used as it is,
    unless `mode` is "always": then it becomes one user turn of the template.
    """
    if is_templated(prompt, mode):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("a prompt is a list of chat messages but the tokenizer has no chat template; give "
                            "plain-text prompts or a tokenizer with a template"
                            if is_messages(prompt) else
                            "apply_chat_template is `always` but the tokenizer has no chat template")
        messages = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
        cont = bool(messages) and messages[-1].get("role") == "assistant"
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not cont,
                                             continue_final_message=cont, **(template_kwargs or {}))
    if not isinstance(prompt, str):
        raise DataError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    return prompt


def is_templated(prompt: Any, mode: str = "auto") -> bool:
    """Whether a prompt's text comes from the chat template (and so carries its own special tokens)."""
    return is_messages(prompt) or (mode == "always" and isinstance(prompt, str))


def encode_prompt(tokenizer, prompt: Any, mode: str = "auto",
                  template_kwargs: dict | None = None) -> tuple[str, list[int]]:
    """The prompt's text and token ids. Templated text is tokenized as it is (the template wrote
    its special tokens); plain text gets the tokenizer's own (a Llama tokenizer's BOS), as TRL and
    `tokenizer(text)` do."""
    text = format_prompt(tokenizer, prompt, mode, template_kwargs)
    return text, tokenizer(text, add_special_tokens=not is_templated(prompt, mode))["input_ids"]


def check_prompts(tokenizer, rows: list[dict], column: str, source, mode: str,
                  template_kwargs: dict | None = None, max_length: int | None = None, say=None) -> int:
    """Format every row's prompt as the run will, before any model is loaded: a prompt that is not
    text or messages, that the chat template rejects, or that comes out empty stops here with its
    file and line, not at the step that first samples it.

    With `max_length` (max_prompt_length), prompts longer than it are counted and, if there are
    any, reported once through `say` (default: one line on stderr) with the first one's file:line,
    its token count and the limit. They are not refused: `max_prompt_length` keeps the end of a
    long prompt as TRL's does (`left_pad`), but the start it drops can be the system prompt or the
    template's opening, so the user is told how many rows lose it. Returns that count.
    """
    longer, first = 0, None
    for row in rows:
        where = row_where(str(source), row)
        prompt = row.get(column)
        try:
            text, ids = encode_prompt(tokenizer, prompt, mode, template_kwargs)
        except DataError as e:
            raise DataError(f"{where}: {column}: {e}") from None
        except Exception as e:  # the template's own error (jinja2.TemplateError, a missing role...)
            raise DataError(f"{where}: {column}: the tokenizer's chat template rejects this prompt: "
                            f"{type(e).__name__}: {e}") from None
        if not text or not ids:
            raise DataError(f"{where}: {column}: the prompt is empty (it has no tokens)")
        if max_length is not None and len(ids) > max_length:
            longer += 1
            first = first or (where, len(ids))
    if longer:
        where, n = first
        message = (f"{where}: {column}: the prompt is {n} tokens, over max_prompt_length={max_length}; "
                   f"{longer} of {len(rows)} prompts of {source} are longer and lose their first tokens "
                   f"(a system prompt or the chat template's opening included): raise max_prompt_length "
                   f"or filter the data")
        (say or _warn)(message)
    return longer


def _warn(message: str) -> None:
    print(f"grpo: warning: {message}", file=sys.stderr, flush=True)


def tokenize_prompts(tokenizer, texts: list[str], max_length: int, device=None, add_special_tokens: bool = False):
    """Left-padded prompt ids and mask; long prompts keep their end (the part next to the answer)."""
    return left_pad(tokenizer, [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts],
                    max_length, device)


def prompt_batch(tokenizer, prompts: list, max_length: int, mode: str = "auto", template_kwargs: dict | None = None,
                 device=None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """What the policy is given for a batch of dataset prompts: their texts, and left-padded ids
    and mask (the rollout, evaluation and `grpo sft` all encode prompts here)."""
    encoded = [encode_prompt(tokenizer, p, mode, template_kwargs) for p in prompts]
    ids, mask = left_pad(tokenizer, [ids for _, ids in encoded], max_length, device)
    return [text for text, _ in encoded], ids, mask


def left_pad(tokenizer, ids: list[list[int]], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, W] and mask, each row cut to its last `max_length` tokens.

    A longer prompt keeps its end, the part next to the answer, and loses its start, as TRL's
    `max_prompt_length` does (it truncates on the left); that start can be a system prompt, so
    `check_prompts` counts and reports such prompts before a run starts. The pad id is the
    tokenizer's pad token (EOS where it has none: every mask excludes padding anyway).
    """
    ids = [x[-max_length:] for x in ids]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Padded as lists, then one tensor each: a copy per row costs more than the rows (an agent's
    # every turn pads one context per episode).
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    return input_ids.to(device), mask.to(device)


def decode_completions(tokenizer, completion_ids, completion_mask=None, stop_ids=None) -> list[str]:
    """The text of each completion, as rewards and evaluation both see it: every token the model
    wrote up to its EOS, special ones included, and nothing after (no EOS, no padding).

    The tokens come from `completion_mask` (1 up to and including EOS) when given, else up to the
    first EOS. An EOS is any id of `stop_ids` (what generation stopped on:
    `grpo.engine.models.stop_token_ids`, e.g. a chat model's `<|im_end|>` as well as the
    tokenizer's EOS); without them, the tokenizer's EOS. Special tokens are kept on purpose: a
    policy that learned to write `<pad>` or `<bos>` mid-answer must not have them silently dropped
    before a reward reads its text (the sampler cannot emit those two any more, see
    grpo.engine.backend.blocked_token_ids, but other special tokens are the model's own writing).
    """
    stops = {tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
    stops.discard(None)
    rows = completion_ids.tolist() if isinstance(completion_ids, torch.Tensor) else [list(r) for r in completion_ids]
    masks = completion_mask.tolist() if isinstance(completion_mask, torch.Tensor) else completion_mask
    texts = []
    for i, row in enumerate(rows):
        if masks is not None:
            row = [t for t, m in zip(row, masks[i]) if m]
        end = next((j for j, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=False))
    return texts


def completion_ids_list(completion_ids, completion_mask) -> list[list[int]]:
    """Each completion's token ids as a list, EOS included, padding not (TRL's `completion_ids`)."""
    return [[t for t, m in zip(row, mask) if m] for row, mask in zip(completion_ids.tolist(), completion_mask.tolist())]


def as_completion(prompt: Any, text: str):
    """A completion as TRL hands it to reward functions: for a conversational prompt one assistant
    message, [{"role": "assistant", "content": text}], else the text itself."""
    return [{"role": "assistant", "content": text}] if is_messages(prompt) else text


def content_of(completion: Any) -> str:
    """The text of a completion given either way (a string, or a list of messages)."""
    if isinstance(completion, str):
        return completion
    if is_messages(completion):
        return "".join(str(m["content"]) for m in completion)
    raise TypeError(f"a completion must be text or a list of chat messages, got {type(completion).__name__}")
