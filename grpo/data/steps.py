"""Steps of a completion: where each one ends, in characters of its text and in its tokens.

Process supervision (`advantage_estimator: process`) gives each step a reward on the token it ends
on. A completion's steps are consecutive slices of its text that join to the whole text:

- with a delimiter (config key `step_delimiter`, e.g. "\\n"), a step ends just after each
  occurrence of it (the delimiter belongs to the step it closes), and the rest of the text after
  the last one is the final step (none when the text ends with the delimiter);
- with a splitter function (`step_splitter`), the function says where: fn(completion) ->
  increasing character offsets in [1, len(completion)], each the end (exclusive) of a step; the
  text after the last offset is the final step.

A completion with no delimiter is one step, and so is an empty one. The final step always ends on
the completion's last token, its EOS included, so the outcome reward and the last step share a
token; every other step ends on the token that holds its last character (`char_ends_to_tokens`,
token-exact: the text is the tokenizer's own decoding of the tokens, prefix by prefix).
"""

from __future__ import annotations

from typing import Callable

from grpo.errors import RewardError


def delimiter_ends(text: str, delimiter: str) -> list[int]:
    """Character ends (exclusive) of the steps of `text` cut after each `delimiter`."""
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    ends, start = [], 0
    while (found := text.find(delimiter, start)) >= 0:
        start = found + len(delimiter)
        ends.append(start)
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    return ends


def splitter_ends(text: str, splitter: Callable, name: str) -> list[int]:
    """The step ends `splitter(text)` gives, checked: increasing ints in [1, len(text)] (the rest
    of the text, when any, is one more step). Anything else is a RewardError naming the function."""
    try:
        given = splitter(text)
    except Exception as e:
        raise RewardError(f"step_splitter {name!r} failed on completion {text[:40]!r}: "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(given, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in given):
        raise RewardError(f"step_splitter {name!r} returned {str(given)[:60]!r}; expected a list of increasing "
                          f"character offsets (ints), each the end of a step")
    previous = 0
    for x in given:
        if not previous < x <= len(text):
            raise RewardError(f"step_splitter {name!r} returned the step end {x} for a completion of {len(text)} "
                              f"characters ({text[:40]!r}); expected increasing offsets in [1, {len(text)}]")
        previous = x
    ends = list(given)
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    return ends


def step_texts(text: str, ends: list[int]) -> list[str]:
    """The steps' texts: text[0:e_1], text[e_1:e_2], ..."""
    return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


def char_ends_to_tokens(tokenizer, token_ids: list[int], ends: list[int], length: int) -> list[int]:
    """Token index of each step end: the token holding the step's last character, the last step
    on token `length - 1` (the completion's last token, EOS included).

    `token_ids` are the completion's tokens before its EOS, whose decoding is the text; the
    character ends are mapped through the decodings of its prefixes, len(decode(ids[:k])), by
    bisection: token k holds character c when the prefix of k tokens is shorter than c + 1 and
    the prefix of k + 1 is not. (A token that holds no character of its own, such as the first
    byte of a multi-byte character, never ends a step: the step ends on the token that completes it.)"""
    cache: dict[int, int] = {0: 0}

    def prefix(k: int) -> int:
        if k not in cache:
            cache[k] = len(tokenizer.decode(token_ids[:k], skip_special_tokens=False))
        return cache[k]

    out = []
    for e in ends[:-1]:
        lo, hi = 1, len(token_ids)  # smallest k with prefix(k) >= e; token k - 1 holds character e - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix(mid) >= e:
                hi = mid
            else:
                lo = mid + 1
        out.append(min(lo - 1, length - 1))
    out.append(max(length - 1, 0))
    return out
