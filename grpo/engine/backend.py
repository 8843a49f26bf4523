"""The rollout backend: the one seam through which everything that samples a policy goes.

Training (the rollout of every step), held-out evaluation, preference-pair generation and the
seed pipeline all call

    backend.generate(prompt_ids, prompt_mask, params, generator) -> Generation
        completion token ids, their mask, the log-probs they were sampled with, truncation
    backend.sync_weights(model)
        after an optimizer step: make the next `generate` sample the updated weights
    backend.stop_token_ids
        every id that ends a completion (`models.stop_token_ids`), for decoding its text

so a second engine (vLLM, SGLang) plugs in here, registered by name (config key
`rollout_backend`), without the trainer changing. The first implementation, `local`, is this
package's own engine (`generation.generate_groups`) on the training model itself, where
syncing weights is nothing: it samples from the very parameters the optimizer updates. A remote
engine would copy them in `sync_weights` (and, since its numerics differ from the trainer's,
the log-probs it returns are the sampler's, not the trainer's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from grpo.algorithm.registry import Registry

from .generation import Generation, generate_groups
from .models import stop_token_ids

ROLLOUT_BACKENDS = Registry("rollout_backend")
register_backend = ROLLOUT_BACKENDS.register


@dataclass(frozen=True)
class SamplingParams:
    """How one call's groups are generated (the run's config keys of the same names)."""
    group_size: int          # G completions per prompt
    max_new_tokens: int      # max_completion_length
    strategy: str            # generation: sample | beam
    temperature: float
    top_p: float
    top_k: int               # 1: greedy
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "SamplingParams":
        """One greedy completion per prompt (held-out evaluation)."""
        return cls(group_size=1, max_new_tokens=max_new_tokens, strategy="sample", temperature=1.0,
                   top_p=1.0, top_k=1)


def blocked_token_ids(tokenizer) -> list[int]:
    """Special tokens the policy may never write mid-completion, in sampling and beam search alike.

    Padding is not text (a reward reading `250<pad>` would be reading what was never written), and
    neither is BOS, except where the model's own format puts BOS inside the text (a chat template
    that opens every turn with it, as Llama-2's `<s>[INST]`): then it stays allowed. An id that is
    also an EOS is never blocked (many tokenizers pad with EOS; `generate_groups` unblocks every
    stop id, so Qwen's pad `<|endoftext|>`, an EOS of its generation config, still ends a
    completion). The completions a reward sees are decoded with special tokens kept
    (grpo.data.decode_completions), so nothing else is hidden.
    """
    eos = tokenizer.eos_token_id
    blocked = []
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        blocked.append(tokenizer.pad_token_id)
    bos = tokenizer.bos_token_id
    if bos is not None and bos != eos and bos not in blocked and not _bos_inside_text(tokenizer):
        blocked.append(bos)
    return blocked


def _bos_inside_text(tokenizer) -> bool:
    """Whether the chat template writes BOS after the start of a conversation (once per turn)."""
    template, bos = getattr(tokenizer, "chat_template", None), tokenizer.bos_token
    if not template or not bos:
        return False
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template that wants other roles or arguments: it says nothing about BOS
        return False
    return text.find(bos, 1) != -1


class RolloutBackend(Protocol):
    stop_token_ids: list[int]  # what `generate` stops on; decode_completions(stop_ids=) cuts there

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> Generation: ...

    def sync_weights(self, model) -> None: ...


@register_backend("local")
class LocalBackend:
    """This package's engine on the training model: prompt KV shared per group, exact beams."""

    def __init__(self, model, tokenizer):
        self.model = model
        # Every id that ends a completion: the tokenizer's EOS and each EOS of the model's
        # generation_config (a chat model's end-of-turn token), so completions stop where the
        # model's own generate would, and their masks and truncation flags agree with that.
        self.stop_token_ids = stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id
        self.blocked_token_ids = blocked_token_ids(tokenizer)

    # Keeps each row's keys and values for a call that continues it (an agent's next turn).
    keeps_cache = True

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None, past: list | None = None,
                 keep_cache: bool = False) -> Generation:
        return generate_groups(self.model, prompt_ids, prompt_mask, group_size=params.group_size,
                               max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_token_ids,
                               pad_token_id=self.pad_token_id, strategy=params.strategy,
                               temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                               generator=generator, min_p=params.min_p,
                               repetition_penalty=params.repetition_penalty,
                               blocked_token_ids=self.blocked_token_ids, past=past, keep_cache=keep_cache)

    def sync_weights(self, model) -> None:
        self.model = model  # the same parameters the optimizer stepped: nothing to copy


def make_backend(name: str, model, tokenizer, **options) -> RolloutBackend:
    """The backend registered as `name` on `model`; `options` are its own settings (vLLM's engine)."""
    return ROLLOUT_BACKENDS.get(name)(model, tokenizer, **options)
