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
token; every other step ends on the token that completes its last character
(`char_ends_to_tokens_batch`, token-exact: the text is the tokenizer's own decoding of the tokens).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Callable

from grpo.errors import RewardError

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21
    DecodeStream = None


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
    """Token index of each step end of one completion (`char_ends_to_tokens_batch` of one row)."""
    return char_ends_to_tokens_batch(tokenizer, [token_ids], [ends], [length])[0]


def char_ends_to_tokens_batch(tokenizer, token_ids: list[list[int]], ends: list[list[int]], lengths: list[int],
                              texts: list[str] | None = None) -> list[list[int]]:
    """Token index of each step end, per completion: the token holding the step's last character,
    the last step on token `lengths[i] - 1` (the completion's last token, EOS included).

    `token_ids[i]` are completion i's tokens before its EOS, and `texts[i]` their decoding (made
    here when not given), which the character ends index. A token that holds no character of its
    own, such as the first byte of a multi-byte character, never ends a step: the step ends on the
    token that completes it.

    Where the tokenizer has an incremental decoder (`tokenizers`' DecodeStream, as streaming
    servers use), one pass over the tokens says which characters each one completes, and the
    pieces are checked to join into exactly the decoded text; otherwise, or when they do not,
    the ends come from the decodings of the prefixes (`_prefix_ends`)."""
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=False) if texts is None else texts
    out, slow = [], []
    for i, (ids, text, row_ends) in enumerate(zip(token_ids, texts, ends)):
        done = _streamed_characters(tokenizer, ids, text) if len(row_ends) > 1 else []
        if done is None:
            slow.append(i)
            out.append(None)
        else:  # token j completes the text up to done[j]: the first one that reaches e holds character e - 1
            out.append([bisect.bisect_left(done, e) for e in row_ends[:-1]])
    for i, row in zip(slow, _prefix_ends(tokenizer, [token_ids[i] for i in slow], [ends[i] for i in slow])):
        out[i] = row
    return [[min(k, length - 1) for k in row] + [max(length - 1, 0)] for row, length in zip(out, lengths)]


def _streamed_characters(tokenizer, token_ids: list[int], text: str) -> list[int] | None:
    """Characters of `text` complete after each token [len(token_ids)], from the tokenizer's
    incremental decoder; None without one, or when its pieces do not join into `text` (a decoder
    whose cleanup needs the whole text, or a last character left incomplete)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or DecodeStream is None:
        return None
    stream = DecodeStream(skip_special_tokens=False)
    try:
        pieces = [stream.step(backend, t) or "" for t in token_ids]
    except Exception:  # an id the vocabulary lacks (a model's padded embedding rows): the slow path decides
        return None
    if "".join(pieces) != text:
        return None
    return list(itertools.accumulate(map(len, pieces)))


def _prefix_ends(tokenizer, token_ids: list[list[int]], ends: list[list[int]]) -> list[list[int]]:
    """Token index of each step end but the last, from the decodings of the prefixes by bisection:
    the smallest k whose prefix reaches the end, token k - 1. A prefix that stops inside a
    multi-byte character decodes its bytes as U+FFFD, one for each byte under a byte-fallback
    decoder (SentencePiece's), which would make the lengths fall as well as rise; those are not
    counted, so a prefix's length is that of its complete characters. (A U+FFFD the model wrote
    itself at a step's end then moves the end one token later.) Every search of every completion
    bisects in lockstep, so each round decodes all the prefixes it needs in one `batch_decode`."""
    known: list[dict[int, int]] = [{0: 0} for _ in token_ids]    # prefix length in tokens -> in characters
    searches = [[i, e, 1, len(token_ids[i])] for i, row_ends in enumerate(ends) for e in row_ends[:-1]]
    while live := [s for s in searches if s[2] < s[3]]:
        wanted = sorted({(i, (lo + hi) // 2) for i, _, lo, hi in live if (lo + hi) // 2 not in known[i]})
        if wanted:
            decoded = tokenizer.batch_decode([token_ids[i][:k] for i, k in wanted], skip_special_tokens=False)
            for (i, k), text in zip(wanted, decoded):
                known[i][k] = len(text.rstrip("\ufffd"))
        for s in live:
            i, e, lo, hi = s
            mid = (lo + hi) // 2
            s[2:] = (lo, mid) if known[i][mid] >= e else (mid + 1, hi)
    out: list[list[int]] = [[] for _ in token_ids]
    for i, _, lo, _ in searches:
        out[i].append(lo - 1)
    return out
