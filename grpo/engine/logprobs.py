"""Per-token log-probabilities of completions under a causal LM.

This is the one forward pass every GRPO quantity is built from: l_t = log pi(o_t | x, o_<t) for the
policy (with grad, in the update), for pi_old and for the frozen reference (without grad).

Layout of a batch (the same as `grpo.engine.generation.Generation`):

    prompt_ids      [N, Lp]  LEFT-padded   (pad pad x x x)
    completion_ids  [N, T]   RIGHT-padded  (o o o EOS pad pad), mask 1 up to and including EOS

Concatenated, every row is `pad... prompt completion pad...`: the prompt/completion boundary sits at
the same column Lp for all rows, so the logits that predict completion token t are at column
Lp - 1 + t for every row and one slice picks them all.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import packed
from .lmhead import check_head, chunked_token_stats, forward_hidden, head_logits, token_stats
from .models import (cache_kwarg, checkpointing_active, model_device, output_cache, position_ids_from_mask,
                     supports_logits_to_keep, unwrap)
from .moe import RouterLogits, load_balancing_loss


class TokenLogprobs(tuple):
    """`(logprobs, entropy)`, always a pair, with the router's load-balancing loss as `.aux_loss`
    (None unless asked for)."""

    def __new__(cls, logprobs: Tensor, entropy: Tensor | None, aux_loss: Tensor | None = None):
        pair = super().__new__(cls, (logprobs, entropy))
        pair.aux_loss = aux_loss
        return pair

    @property
    def logprobs(self) -> Tensor:
        return self[0]

    @property
    def entropy(self) -> Tensor | None:
        return self[1]


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, temperature: float = 1.0,
                        compute_entropy: bool = False, engine: str = "auto",
                        entropy_grad: bool = True, logprob_chunk_size: int = 0,
                        router_aux_loss: bool = False, recompute_mlp: bool = False):
    """log pi(o_t | x, o_<t) for every completion token, from logits divided by `temperature`.

    Returns `TokenLogprobs`, the pair `(logprobs, entropy)`, both float32 [N, T] (entropy is None
    unless `compute_entropy`):
    entropy[i, t] is the entropy of the tempered next-token distribution that o_t was drawn from.
    `completion_mask` (long, bool or float) only decides which columns count: values where it is 0
    are finite but meaningless. Padding ids must be valid token ids (the usual pad_token_id).
    Differentiable when called with grad enabled. Does not touch the model's train/eval mode:
    the caller decides whether dropout is on.

    `engine="auto"`: rows that repeat the row above's prompt (a GRPO group: G completions of one
    prompt, consecutive) share one forward pass of that prompt, so it costs its forward and
    backward once per group, not G times. Models the packed forward supports
    (`packed.supported`: the model's own layers over a packed token list, with our attention
    function) run it, which also skips every completion token after the last one the mask
    counts; other models hand the prompt's keys/values (with their autograd graph) to the G rows
    as a KV cache, unless activation checkpointing is on (it drops the cache), when they run the
    plain forward. `engine="plain"`: one full forward per row, the reference both are tested
    against (same results within fp32 tolerance, gradients included).
    Values are only defined where `completion_mask` is non-zero (elsewhere they may be 0).
    `entropy_grad=False`: the entropy is a detached metric (saves its [N, T, V] autograd buffers).
    `logprob_chunk_size` > 0: the LM head, log-softmax and entropy run that many scored tokens at
    a time, forward and backward (`lmhead.chunked_token_stats`): no [tokens x vocab] tensor is
    ever whole. 0: all at once.
    `recompute_mlp`: the hand-written Llama-style forward keeps only gate(x) and up(x) of each
    MLP for the backward and recomputes the rest (`llama.mlp`): same numbers, less memory.
    `router_aux_loss`: also compute the model's router load-balancing loss over the tokens these
    forwards ran (mixture-of-experts models, `moe.load_balancing_loss`), as the result's
    `.aux_loss` (None otherwise).
    """
    if engine not in ("auto", "plain"):
        raise ValueError(f"engine must be 'auto' or 'plain', got {engine!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(logprob_chunk_size, int) or logprob_chunk_size < 0:
        raise ValueError(f"logprob_chunk_size must be an int >= 0, got {logprob_chunk_size!r}")
    device = model_device(model)
    N, T = completion_ids.shape
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device).long()
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device) != 0

    # Trim padding that no row needs: leading prompt columns that are padding on every row (left
    # padding puts them first) and completion columns after the longest completion. Batches are
    # padded to the longest row of some *other* batch often enough for this to matter.
    real_cols = prompt_mask.bool().any(0)
    first = int(real_cols.int().argmax()) if bool(real_cols.any()) else prompt_ids.shape[1]
    prompt_ids, prompt_mask = prompt_ids[:, first:], prompt_mask[:, first:]
    # Scored columns of each row: up to its last non-zero mask entry.
    lengths = (completion_mask * torch.arange(1, T + 1, device=device)).amax(-1) if N > 0 and T > 0 \
        else torch.zeros(N, dtype=torch.long, device=device)
    T_used = int(lengths.max()) if N > 0 else 0
    logprobs = torch.zeros(N, T, dtype=torch.float32, device=device)
    entropy = torch.zeros(N, T, dtype=torch.float32, device=device) if compute_entropy else None
    if T_used == 0:
        return TokenLogprobs(logprobs, entropy, torch.zeros((), device=device) if router_aux_loss else None)
    targets = completion_ids[:, :T_used]
    scorer = _Scorer(model, temperature, compute_entropy, entropy_grad, logprob_chunk_size, router_aux_loss,
                     recompute_mlp)

    if engine == "auto":
        rows = torch.cat([prompt_ids, prompt_mask], dim=1)
        unique, inverse = torch.unique_consecutive(rows, dim=0, return_inverse=True)
        Lp = prompt_ids.shape[1]
        if packed.supported(model):
            pk = packed.PackedGroups(unique[:, :Lp], unique[:, Lp:], inverse, targets, lengths)
            lp, ent = scorer.packed(pk, hand_written=not router_aux_loss and packed.hand_written(model, Lp + T_used))
            # Out-of-place index_copy: autograd carries the gradient back to the scored tokens.
            where = pk.score_row * T + pk.score_col
            logprobs = logprobs.view(-1).index_copy(0, where, lp).view(N, T)
            if compute_entropy:
                entropy = entropy.view(-1).index_copy(0, where, ent).view(N, T)
            return scorer.result(logprobs, entropy)
        # Worth it: at least two rows per prompt on average. Activation checkpointing drops the
        # prompt's KV cache inside the layers, so it cannot be handed over then.
        if T_used > 1 and 2 * unique.shape[0] <= N and not checkpointing_active(model):
            lp, ent = scorer.shared_prompt(unique[:, :Lp], unique[:, Lp:], inverse, targets, lengths)
            return scorer.result(*_pad(lp, ent, T))

    # The last completion token predicts nothing we need, so it is not fed: the input is
    # prompt + o_<T, and its last T positions are exactly the ones that predict o_1 .. o_T.
    input_ids = torch.cat([prompt_ids, targets[:, :-1]], dim=1)
    # Over the completion, attention is plain causal: the right padding after EOS is only seen by
    # positions after it, which are masked anyway. So completion_mask is only a loss mask here,
    # and a row whose mask was zeroed (say, a truncated completion kept out of the loss) still
    # gets its true log-probs.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(N, T_used - 1)], dim=1)
    # Tokens the router loss counts: real prompt tokens and the completion tokens up to the last
    # scored one of each row.
    counted = torch.cat([prompt_mask.bool(), torch.arange(T_used - 1, device=device) < lengths[:, None] - 1], dim=1)
    lp, ent = scorer.plain(input_ids, attention_mask, targets, counted)
    return scorer.result(*_pad(lp, ent, T))


def _pad(lp: Tensor, ent: Tensor | None, T: int) -> tuple[Tensor, Tensor | None]:
    """[N, T_used] -> [N, T], right-padded with zeros (cat, not a write into a preallocated
    tensor, so autograd sees plain ops)."""
    pad = lp.new_zeros(lp.shape[0], T - lp.shape[1])
    return torch.cat([lp, pad], dim=1), (None if ent is None else torch.cat([ent, pad], dim=1))


class _Scorer:
    """The forwards of one `completion_logprobs` call and what it asked of them: the LM head
    whole or chunked (`chunk`), the router logits of each forward (`aux`), the hand-written
    forward's MLP recomputed (`recompute_mlp`)."""

    def __init__(self, model, temperature, compute_entropy, entropy_grad, chunk, aux, recompute_mlp=False):
        self.model, self.temperature, self.chunk, self.aux = model, temperature, chunk, aux
        self.recompute_mlp = recompute_mlp
        self.compute_entropy, self.entropy_grad = compute_entropy, entropy_grad
        self.router: list = []  # (router logits per MoE layer, counted-token mask) per forward
        if chunk and not supports_logits_to_keep(model):
            raise ValueError(f"logprob_chunk_size: {type(unwrap(model)).__name__}.forward has no logits_to_keep, "
                             "so its full logits cannot be skipped; set logprob_chunk_size: 0")

    def call(self, counted: Tensor, keep=None, check_at: Tensor | None = None, **kwargs) -> tuple[Tensor, object]:
        """One `model(**kwargs)`: (its logits at positions `keep` (the last `keep` for an int, those
        of a 1-D tensor, all for None), output). Chunked: (its final hidden states, output), the
        model's own LM head run on the one position `check_at` the first time, to check that ours
        reproduces it. With `aux`, records the router logits of the tokens `counted`."""
        with RouterLogits(self.model) if self.aux else contextlib.nullcontext() as router:
            if self.chunk:
                base = unwrap(self.model)
                check = check_at is not None and not getattr(base, "_grpo_head_checked", False)
                x, out = forward_hidden(self.model, check_at if check else None, **kwargs)
                if check:
                    check_head(self.model, x[:, check_at], out.logits)
                    base._grpo_head_checked = True
            else:
                if keep is not None and supports_logits_to_keep(self.model):
                    kwargs["logits_to_keep"] = keep  # the LM head ([hidden x vocab]) runs on those only
                out = self.model(**kwargs)
                x = out.logits
        if self.aux:
            self.router.append((router.logits, counted))
        return x, out

    def stats(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Log-probs and entropy of targets [...] from logits [..., V] or, chunked, from final
        hidden states [..., D]."""
        shape = targets.shape
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if self.chunk:
            lp, ent = chunked_token_stats(self.model, x, targets, self.temperature, self.compute_entropy,
                                          self.entropy_grad, self.chunk)
        else:
            lp, ent = token_stats(x, targets, self.temperature, self.compute_entropy, self.entropy_grad)
        return lp.view(shape), (None if ent is None else ent.view(shape))

    def result(self, logprobs, entropy) -> "TokenLogprobs":
        return TokenLogprobs(logprobs, entropy, load_balancing_loss(self.model, self.router) if self.aux else None)

    def plain(self, input_ids, attention_mask, targets, counted):
        T_used = targets.shape[1]
        last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        x, _ = self.call(counted, T_used, last, input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return self.stats(x[:, -T_used:], targets)

    def packed(self, pk: packed.PackedGroups, hand_written: bool):
        """The packed forward (`grpo.engine.packed`): stats of `pk.score_targets` [K].
        `hand_written`: its Llama-style version (`packed.llama_hidden`)."""
        if hand_written:
            hidden = packed.llama_hidden(self.model, pk, self.recompute_mlp)
            return self.stats(hidden if self.chunk else head_logits(self.model, hidden), pk.score_targets)
        x, _ = packed.forward(self.model, pk, lambda **kw: self.call(pk.real, pk.score_index, pk.score_index[:1], **kw))
        return self.stats(x[0, pk.score_index] if self.chunk else x[0], pk.score_targets)

    def shared_prompt(self, prompts: Tensor, masks: Tensor, inverse: Tensor, targets: Tensor, lengths: Tensor):
        """Stats [N, T_used] of `targets`, with each distinct prompt run once.

        Pass 1: the U distinct prompts [U, Lp] (their last position predicts o_1). Pass 2: every
        row's completion o_<T, attending to its prompt's keys/values, selected out of pass 1's
        cache by `inverse` (autograd sums the G rows' gradients back into the one prompt pass).
        """
        last = torch.tensor([prompts.shape[1] - 1], device=prompts.device)
        x1, out = self.call(masks.bool(), 1, last, input_ids=prompts, attention_mask=masks,
                            position_ids=position_ids_from_mask(masks), use_cache=True)
        cache = output_cache(out)
        first = x1[:, -1:][inverse]                                       # [N, 1, V or D]: predicts o_1
        cache.batch_select_indices(inverse)                               # U -> N rows (a gather)
        N, T_used = targets.shape
        mask = masks[inverse]
        attention_mask = torch.cat([mask, mask.new_ones(N, T_used - 1)], dim=1)
        position_ids = mask.sum(-1, keepdim=True) + torch.arange(T_used - 1, device=mask.device)
        fed = torch.arange(T_used - 1, device=mask.device) < lengths[:, None] - 1
        x2, _ = self.call(fed, T_used - 1, **{cache_kwarg(self.model): cache}, input_ids=targets[:, :-1],
                          attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
        return self.stats(torch.cat([first, x2[:, -(T_used - 1):]], dim=1), targets)
