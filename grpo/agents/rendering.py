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

    A turn's rendering is kept as a `Turn` (its text, and its ids where they are needed): the
    `turn` argument of `appended_ids` is the one the model's last turn was generated after.
    """

    def __init__(self, tokenizer, stop_token_ids: list[int], template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.stop = set(stop_token_ids)
        self.kwargs = template_kwargs or {}
        self.encode = encoder(tokenizer)
        self.stop_texts = split_texts(tokenizer, self.stop)

    def text(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **self.kwargs)

    def prompt(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], "Turn"]:
        """The prompt's ids, with the generation prompt, and its rendering as the first `Turn`:
        the template's text, tokenized as it is (the template wrote its special tokens), as
        grpo.data.encode_prompt tokenizes a prompt."""
        text = self.text(messages, tools, add_generation_prompt=True)
        ids = self.encode(text)
        return ids, Turn(text, ids)

    def appended_ids(self, messages: list[dict], new: list[dict], tools: list[dict] | None,
                     turn: "Turn") -> tuple[list[int], "Turn"]:
        """The ids that follow the model's last turn (the last message of `messages`, ended by a
        stop token) when the messages `new` are added and the next assistant turn opens; and the
        new rendering (the next turn's `turn`).

        `turn` is the rendering the last turn was generated after: the assistant turn's own
        rendering starts where `messages`' rendering stops agreeing with it, and its last stop
        token is where the model's tokens end and the appended ones begin.
        """
        before = self.text(messages, tools, add_generation_prompt=False)
        after = self.text(messages + new, tools, add_generation_prompt=True)
        if self.stop_texts:
            appended = self._appended_by_text(before, after, turn.text, new)
            if appended is not None:
                return appended, Turn(after)
        after_ids = self.encode(after)
        return self._appended_by_ids(self.encode(before), after_ids, turn, new), Turn(after, after_ids)

    def _appended_by_text(self, before: str, after: str, turn: str, new: list[dict]) -> list[int] | None:
        """`appended_ids` on the texts, tokenizing only what is appended. Exact where every stop
        token is a special token matched in the raw text (`split_texts`): a tokenizer splits its
        text at such tokens first and tokenizes the pieces between them apart, so the ids after
        the turn's stop token depend on the text after it alone. That text is tokenized behind
        the stop token's own, as it sits in the whole (a piece's tokens can depend on whether it
        starts the text). None where the ids do not start with that token: then the ids decide."""
        start = len(turn) if before.startswith(turn) else _common_prefix(before, turn)
        found = [(i + len(t), t) for t in self.stop_texts if (i := before.rfind(t, start)) >= 0]
        if not found:
            self._no_stop_token()
        cut, stop = max(found)
        if after[:cut] != before[:cut]:
            self._not_prefix_stable(new)
        ids = self.encode(stop + after[cut:])
        return ids[1:] if ids[:1] == [self.stop_texts[stop]] else None

    def _appended_by_ids(self, before: list[int], after: list[int], turn: "Turn", new: list[dict]) -> list[int]:
        previous = turn.ids if turn.ids is not None else self.encode(turn.text)
        start = _common_prefix(before, previous)
        ends = [i for i in range(start, len(before)) if before[i] in self.stop]
        if not ends:
            self._no_stop_token()
        cut = ends[-1] + 1
        if after[:cut] != before[:cut]:
            self._not_prefix_stable(new)
        return after[cut:]

    def _no_stop_token(self):
        raise ConfigError(f"the chat template of {template_name(self.tokenizer)} ends an assistant turn with none "
                          f"of the stop tokens {sorted(self.stop)}, so where a turn ends and the next message "
                          f"begins is not known; generation would not stop where the template ends a turn")

    def _not_prefix_stable(self, new: list[dict]):
        role = new[0]["role"] if new else "assistant"
        raise ConfigError(f"the chat template of {template_name(self.tokenizer)} is not prefix-stable: "
                          f"rendering the conversation with the new {role} message(s) changes the tokens of the "
                          f"turns before them, so they cannot be appended to the model's own tokens; use a "
                          f"template that renders earlier turns the same whatever follows them")


class Turn:
    """A rendering that a turn is generated after: its text, and its ids (None until needed)."""

    def __init__(self, text: str, ids: list[int] | None = None):
        self.text, self.ids = text, ids


def split_texts(tokenizer, ids: set[int]) -> dict[str, int]:
    """{text: id} of the stop tokens when every one is a special token that the tokenizer splits
    its input at, matched on the raw text (not normalized, no stripping around it, and special
    tokens not split as text); else {}."""
    if getattr(tokenizer, "split_special_tokens", False):
        return {}
    added = getattr(tokenizer, "added_tokens_decoder", {})
    out = {}
    for i in ids:
        t = added.get(i)
        if t is None or not getattr(t, "special", False) or any(
                getattr(t, flag, False) for flag in ("normalized", "lstrip", "rstrip", "single_word")):
            return {}
        out[str(t.content)] = i
    return out


def encoder(tokenizer):
    """text -> tokenizer(text, add_special_tokens=False)["input_ids"]. On a fast tokenizer with no
    padding or truncation set, that is its Rust tokenizer's own `encode`, called directly: the
    same ids without transformers' per-call set-up, which costs more than the encoding of a short
    message (an episode tokenizes two renderings per turn)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return lambda text: backend.encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def decoder(tokenizer):
    """[ids, ...] -> [tokenizer.decode(ids, skip_special_tokens=False), ...]. On a fast tokenizer
    that does not clean up spaces, one call of its Rust tokenizer's `decode_batch` (what
    transformers' decode calls per sequence, then returns as it is); transformers' decode per
    sequence otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda batch: backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)
    return lambda batch: [tokenizer.decode(ids, skip_special_tokens=False) for ids in batch]


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
