"""The token ids of a conversation as the chat template renders it, and of what a turn appends.

An episode's tokens are the model's own, as sampled, with the tokens of the messages it reads
(tool results, an environment's observations) spliced in between its turns. Those are the chat
template's: the difference between rendering the conversation with the new messages (and the
generation prompt of the next assistant turn) and without them. It is the model's tokens that
end the assistant turn, up to and including its stop token (`<|im_end|>`, `<|eot_id|>`): what
the template writes after that token (Qwen's newline) belongs to the appended part.

That difference is only well defined when the template is prefix-stable: rendering more
messages leaves the rendering of the earlier ones unchanged, token for token. Where it is not
(a template that rewrites history once a turn ends), no tokens can be appended to the model's
without re-tokenizing them, and `appended_ids` says so, naming the template.
"""

from __future__ import annotations

from typing import Any

from grpo.errors import ConfigError


def template_name(tokenizer) -> str:
    """How an error names a tokenizer's chat template: the tokenizer's path or hub id."""
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def assistant_message(content: str, calls: list[tuple[str, Any]], **extra) -> dict:
    """An assistant message in the form chat templates read: tool calls as
    {"type": "function", "function": {"name", "arguments"}}."""
    message = {"role": "assistant", "content": content, **extra}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    return message


class Renderer:
    """A tokenizer's chat template as token ids: whole conversations and what a turn appends.

    `stop_token_ids` are the ids that end a model's turn (the rollout backend's
    `stop_token_ids`); `template_kwargs` go to every rendering (Qwen3's enable_thinking).
    """

    def __init__(self, tokenizer, stop_token_ids: list[int], template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.stop = set(stop_token_ids)
        self.kwargs = template_kwargs or {}

    def ids(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> list[int]:
        """The conversation's token ids: the template's text, tokenized as it is (the template
        wrote its special tokens), as grpo.data.encode_prompt tokenizes a prompt."""
        text = self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **self.kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def appended_ids(self, messages: list[dict], new: list[dict], tools: list[dict] | None,
                     turn_prompt: list[int]) -> tuple[list[int], list[int]]:
        """The ids that follow the model's last turn (the last message of `messages`, ended by a
        stop token) when the messages `new` are added and the next assistant turn opens; and the
        whole new rendering (the next turn's `turn_prompt`).

        `turn_prompt` is the rendering the last turn was generated after: the assistant turn's
        own rendering starts where `messages`' rendering stops agreeing with it, and its last stop
        token is where the model's tokens end and the appended ones begin.
        """
        before = self.ids(messages, tools, add_generation_prompt=False)
        after = self.ids(messages + new, tools, add_generation_prompt=True)
        start = _common_prefix(before, turn_prompt)
        ends = [i for i in range(start, len(before)) if before[i] in self.stop]
        if not ends:
            raise ConfigError(f"the chat template of {template_name(self.tokenizer)} ends an assistant turn with none "
                              f"of the stop tokens {sorted(self.stop)}, so where a turn ends and the next message "
                              f"begins is not known; generation would not stop where the template ends a turn")
        cut = ends[-1] + 1
        if after[:cut] != before[:cut]:
            role = new[0]["role"] if new else "assistant"
            raise ConfigError(f"the chat template of {template_name(self.tokenizer)} is not prefix-stable: "
                              f"rendering the conversation with the new {role} message(s) changes the tokens of the "
                              f"turns before them, so they cannot be appended to the model's own tokens; use a "
                              f"template that renders earlier turns the same whatever follows them")
        return after[cut:], after


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
