"""The episode loop's `generate`, on the rollout backend (grpo.engine.backend.RolloutBackend).

Each episode's context (its prompt and every token so far, the environment's included) is one
prompt of a backend call with group_size 1: G episodes of one dataset row are G contexts, since
after the first turn they differ. The contexts are left-padded as every prompt batch is
(grpo.data.left_pad), and the backend's own stop tokens end each turn.
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
    with `params` (their group_size and max_new_tokens replaced by 1 and the turn's budget)."""

    def generate(contexts: list[list[int]], max_new_tokens: int) -> list[Sampled]:
        ids, mask = left_pad(tokenizer, contexts, max(len(c) for c in contexts), device)
        turn = dataclasses.replace(params, group_size=1, max_new_tokens=max_new_tokens)
        out = backend.generate(ids, mask, turn, generator)
        lengths = out.completion_mask.sum(1).tolist()
        sampled = out.sampling_logprobs
        return [Sampled(token_ids=out.completion_ids[i, :n].tolist(), logprobs=out.logprobs[i, :n].tolist(),
                        finished=not bool(out.truncated[i]),
                        sampling_logprobs=None if sampled is None else sampled[i, :n].tolist())
                for i, n in enumerate(lengths)]

    return generate
