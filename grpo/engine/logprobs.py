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

import torch
from torch import Tensor

from . import packed
from .llama import supported
from .models import cache_kwarg, model_device, output_cache, position_ids_from_mask, supports_logits_to_keep


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, temperature: float = 1.0,
                        compute_entropy: bool = False, engine: str = "auto",
                        entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """log pi(o_t | x, o_<t) for every completion token, from logits divided by `temperature`.

    Returns `(logprobs, entropy)`, both float32 [N, T] (entropy is None unless `compute_entropy`):
    entropy[i, t] is the entropy of the tempered next-token distribution that o_t was drawn from.
    `completion_mask` (long, bool or float) only decides which columns count: values where it is 0
    are finite but meaningless. Padding ids must be valid token ids (the usual pad_token_id).
    Differentiable when called with grad enabled. Does not touch the model's train/eval mode:
    the caller decides whether dropout is on.

    `engine="auto"`: rows that repeat the row above's prompt (a GRPO group: G completions of one
    prompt, consecutive) share one forward pass of that prompt, so it costs its forward and
    backward once per group, not G times. Llama-style models (`llama.supported`) run the
    packed forward of `grpo.engine.packed`, which also skips every completion token after the
    last one the mask counts; other models hand the prompt's keys/values (with their autograd
    graph) to the G rows as a KV cache. `engine="plain"`: one full forward per row, the reference
    both are tested against (same results within fp32 tolerance, gradients included).
    Values are only defined where `completion_mask` is non-zero (elsewhere they may be 0).
    `entropy_grad=False`: the entropy is a detached metric (saves its [N, T, V] autograd buffers).
    """
    if engine not in ("auto", "plain"):
        raise ValueError(f"engine must be 'auto' or 'plain', got {engine!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
        return logprobs, entropy
    targets = completion_ids[:, :T_used]

    if engine == "auto":
        rows = torch.cat([prompt_ids, prompt_mask], dim=1)
        unique, inverse = torch.unique_consecutive(rows, dim=0, return_inverse=True)
        Lp = prompt_ids.shape[1]
        if supported(model):
            pk = packed.PackedGroups(unique[:, :Lp], unique[:, Lp:], inverse, targets, lengths)
            lp, ent = _token_stats(packed.scored_logits(model, pk), pk.score_targets,
                                   temperature, compute_entropy, entropy_grad)
            # Out-of-place index_copy: autograd carries the gradient back to the scored tokens.
            where = pk.score_row * T + pk.score_col
            logprobs = logprobs.view(-1).index_copy(0, where, lp).view(N, T)
            if compute_entropy:
                entropy = entropy.view(-1).index_copy(0, where, ent).view(N, T)
            return logprobs, entropy
        if T_used > 1 and 2 * unique.shape[0] <= N:  # worth it: at least two rows per prompt on average
            logits = _shared_prompt_logits(model, unique[:, :Lp], unique[:, Lp:], inverse, targets)
            return _gather_logprobs(logits, targets, temperature, T, compute_entropy, entropy_grad)

    # The last completion token predicts nothing we need, so it is not fed: the input is
    # prompt + o_<T, and its last T positions are exactly the ones that predict o_1 .. o_T.
    input_ids = torch.cat([prompt_ids, targets[:, :-1]], dim=1)
    # Over the completion, attention is plain causal: the right padding after EOS is only seen by
    # positions after it, which are masked anyway. So completion_mask is only a loss mask here,
    # and a row whose mask was zeroed (say, a truncated completion kept out of the loss) still
    # gets its true log-probs.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(N, T_used - 1)], dim=1)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = T_used  # the LM head ([hidden x vocab]) runs on T columns only
    logits = model(**kwargs).logits[:, -T_used:]
    return _gather_logprobs(logits, targets, temperature, T, compute_entropy, entropy_grad)


def _shared_prompt_logits(model, prompts: Tensor, masks: Tensor, inverse: Tensor, targets: Tensor) -> Tensor:
    """Logits [N, T_used, V] predicting `targets`, with each distinct prompt run once.

    Pass 1: the U distinct prompts [U, Lp] (their last position predicts o_1). Pass 2: every row's
    completion o_<T, attending to its prompt's keys/values, selected out of pass 1's cache by
    `inverse` (autograd sums the G rows' gradients back into the one prompt pass).
    """
    kwarg = cache_kwarg(model)
    keep = supports_logits_to_keep(model)
    out = model(input_ids=prompts, attention_mask=masks, position_ids=position_ids_from_mask(masks),
                use_cache=True, **({"logits_to_keep": 1} if keep else {}))
    cache = output_cache(out)
    first = out.logits[:, -1:][inverse]                               # [N, 1, V]: predicts o_1
    cache.batch_select_indices(inverse)                               # U -> N rows (a gather)
    N, T_used = targets.shape
    mask = masks[inverse]
    attention_mask = torch.cat([mask, mask.new_ones(N, T_used - 1)], dim=1)
    position_ids = mask.sum(-1, keepdim=True) + torch.arange(T_used - 1, device=mask.device)
    kwargs = {kwarg: cache, **({"logits_to_keep": T_used - 1} if keep else {})}
    rest = model(input_ids=targets[:, :-1], attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=True, **kwargs).logits[:, -(T_used - 1):]
    return torch.cat([first, rest], dim=1)


def _gather_logprobs(logits: Tensor, targets: Tensor, temperature: float, T: int,
                     compute_entropy: bool, entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `targets` under logits / temperature, right-padded with zeros to T columns."""
    N, T_used = targets.shape
    token_logprobs, token_entropy = _token_stats(logits, targets, temperature, compute_entropy, entropy_grad)
    # Assembled with cat (not written into a preallocated tensor) so autograd sees plain ops.
    pad = torch.zeros(N, T - T_used, dtype=torch.float32, device=logits.device)
    entropy = torch.cat([token_entropy, pad], dim=1) if compute_entropy else None
    return torch.cat([token_logprobs, pad], dim=1), entropy


def _token_stats(logits: Tensor, targets: Tensor, temperature: float, compute_entropy: bool,
                 entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
    """log-prob of each target [...] under logits [..., V] / temperature, and the entropy."""
    # float32 maths whatever the model dtype (bf16 log-probs are too coarse for ratios near 1).
    logits = logits.float() / temperature
    # log_softmax(z)[o] = z[o] - logsumexp(z): gather first, so no [N, T, V] log-prob tensor is
    # ever materialised next to the logits (the vocabulary can be 150k wide).
    lse = torch.logsumexp(logits, dim=-1)
    token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if compute_entropy:
        # H = -sum p log p = logsumexp(z) - sum p z, with p = softmax(z). When it is only a
        # metric (entropy_grad=False) it is computed without grad, so autograd does not keep
        # [N, T, V] softmax outputs alive until the backward (with a 150k vocabulary, gigabytes).
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            z = logits if entropy_grad else logits.detach()
            probs = torch.softmax(z, dim=-1)
            entropy = (lse if entropy_grad else lse.detach()) - (probs * z).sum(-1)
    return token_logprobs, entropy
