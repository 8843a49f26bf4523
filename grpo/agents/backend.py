"""The episode loop's `generate`, on the rollout backend (grpo.engine.backend.RolloutBackend).

Each episode's context (its prompt and every token so far, the environment's included) is one
prompt of a backend call with group_size 1: G episodes of one dataset row are G contexts, since
after the first turn they differ. The contexts are left-padded as every prompt batch is
(grpo.data.left_pad), and the backend's own stop tokens end each turn.

The first turn of a group's episodes reads one context G times over: those contexts go to the
backend as one prompt of a group of G, so the prompt is prefilled once and its keys and values
are shared while the G turns decode (the backend's group engine), instead of prefilled G times.
The rows come back in the same order, so what is sampled is the same draw as G single prompts.

On a backend that keeps caches (`keeps_cache`: the local engine), each turn's keys and values
are kept, and the next turn of the same episode prefills only the tokens added since (the tool
results and the next turn's header) instead of its whole context. They are kept for one
`generate` (one episode loop): the weights do not change inside it.
"""

from __future__ import annotations

import dataclasses

import torch

from grpo.data.prompts import left_pad
from grpo.engine.backend import RolloutBackend, SamplingParams

from .episodes import Generate, Sampled


def backend_generate(backend: RolloutBackend, tokenizer, params: SamplingParams,
                     generator: torch.Generator | None = None, device=None) -> Generate:
    """generate(contexts, max_new_tokens) -> one Sampled per context, from `backend.generate`
    with `params` (their group_size replaced by the contexts' `repeats`, max_new_tokens by the
    turn's budget)."""

    keeps = getattr(backend, "keeps_cache", False)
    kept: list[tuple[list[int], list]] = []  # the last turn's rows: the tokens read, their keys and values

    def generate(contexts: list[list[int]], max_new_tokens: int) -> list[Sampled]:
        G = repeats(contexts)
        unique = contexts[::G]
        ids, mask = left_pad(tokenizer, unique, max(len(c) for c in unique), device)
        turn = dataclasses.replace(params, group_size=G, max_new_tokens=max_new_tokens)
        if keeps:
            index = PrefixIndex(kept)
            past = [index.longest(c) for c in unique]
            out = backend.generate(ids, mask, turn, generator, past=past if any(past) else None, keep_cache=True)
        else:
            out = backend.generate(ids, mask, turn, generator)
        # Whole tensors to lists once, then each row's slice.
        lengths, ids, logprobs, truncated = (x.tolist() for x in (out.completion_mask.sum(1), out.completion_ids,
                                                                   out.logprobs, out.truncated))
        sampled = None if out.sampling_logprobs is None else out.sampling_logprobs.tolist()
        turns = [Sampled(token_ids=ids[i][:n], logprobs=logprobs[i][:n], finished=not truncated[i],
                         sampling_logprobs=None if sampled is None else sampled[i][:n])
                 for i, n in enumerate(lengths)]
        # Each row's cache holds its context and its turn but the last token (drawn, never fed).
        kept[:] = [] if out.cache is None else [(contexts[i] + s.token_ids[:-1], c)
                                                for i, (s, c) in enumerate(zip(turns, out.cache))]
        return turns

    return generate


class PrefixIndex:
    """Kept (token list, cache) pairs: `longest(context)` is the cache of the longest kept token
    list that is a proper prefix of `context` (the first kept of equal ones; None if none), found
    with one lookup per distinct kept length instead of a comparison with every kept list."""

    def __init__(self, kept: list[tuple[list[int], list]]):
        self.by_tokens = {}
        for tokens, cache in kept:
            self.by_tokens.setdefault(tuple(tokens), cache)
        self.lengths = sorted({len(t) for t in self.by_tokens}, reverse=True)

    def longest(self, context: list[int]):
        for n in self.lengths:
            if n < len(context) and (cache := self.by_tokens.get(tuple(context[:n]))) is not None:
                return cache
        return None


def repeats(contexts: list[list[int]]) -> int:
    """G when the contexts are runs of G equal ones, back to back (a group's first turn), else 1."""
    G = 1
    while G < len(contexts) and contexts[G] == contexts[0]:
        G += 1
    if G == 1 or len(contexts) % G:
        return 1
    return G if all(contexts[i] == contexts[i - i % G] for i in range(len(contexts))) else 1
