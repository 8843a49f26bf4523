"""Group generation: G completions for each of P prompts.

Three strategies, one output format (`Generation`):

- `sample` (the papers: DeepSeekMath, DAPO, ...): G i.i.d. samples per prompt. The prompt is the
  same for all G rows, so it is run through the model once (P rows, not P*G) and its keys/values
  serve the G rows (`decoders.start`); then one batched decode loop of P*G rows.
- `beam` (the seed's reading): one beam search of width G per prompt, returning its G best beams.
  Deterministic and mode-seeking, so its groups often have near-identical rewards.
- `stochastic_beam`: G distinct completions per prompt drawn WITHOUT replacement (Kool et al.
  2019's stochastic beam search, `stochastic_beam.py`), with the weights that make estimates
  from them unbiased.

Plain PyTorch around `model(...)`: no `model.generate`, so that what is sampled, and under which
distribution its log-probability is recorded, is visible here. Works with any Hugging Face causal
LM whose forward takes `attention_mask`, `position_ids` and a KV cache (Llama, Qwen2, GPT-2, ...).

Rows p*G .. p*G + G - 1 of every output belong to prompt p.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .decoders import GroupDecoder, keeps_caches, start
from .models import model_device
from .sequences import (Generation, categorical, filter_logits,  # Generation, filter_logits: also imported from here
                        filters_on, penalize_repetition)
from .sequences import gather_beams as _gather_beams
from .stochastic_beam import stochastic_beam

STRATEGIES = ("sample", "beam", "stochastic_beam")


# ----------------------------------------------------------------------------------------------
# Sampling.

def _draw(logits: Tensor, temperature: float, top_k: int, top_p: float, generator, *, min_p: float = 0.0,
          blocked: Tensor | None = None, seen: Tensor | None = None,
          repetition_penalty: float = 1.0) -> tuple[Tensor, Tensor]:
    """One token per row [B] from softmax(logits / temperature) within the filters of
    `filter_logits` (and the repetition penalty when `seen` is given), and its log-prob [B]
    under the full tempered distribution."""
    token, logprob, _ = _draw_recorded(logits, temperature, top_k, top_p, generator, min_p=min_p, blocked=blocked,
                                       seen=seen, repetition_penalty=repetition_penalty)
    return token, logprob


def _draw_recorded(logits: Tensor, temperature: float, top_k: int, top_p: float, generator, *,
                   min_p: float = 0.0, blocked: Tensor | None = None, seen: Tensor | None = None,
                   repetition_penalty: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """`_draw`, and the token's log-prob under the distribution it was actually drawn from [B]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    # What the token is drawn from: the penalty acts on raw logits before the temperature (HF's
    # order); filtering log-probs is filtering logits (same order, same softmax), and
    # the draw renormalises what survives.
    shaped = logp if seen is None else \
        torch.log_softmax(penalize_repetition(logits.float(), seen, repetition_penalty) / temperature, dim=-1)
    allowed = filter_logits(shaped, top_k, top_p, min_p, blocked)
    if top_k == 1:
        # Greedy: the first of tied maxima, with no random draw (bf16 logits tie often, and greedy
        # evaluation must not depend on an RNG). The distribution drawn from is a point mass.
        token = allowed.argmax(-1, keepdim=True)
        full = logp.gather(-1, token).squeeze(-1)
        return token.squeeze(-1), full, torch.zeros_like(full)
    token = categorical(allowed, generator)
    full = logp.gather(-1, token).squeeze(-1)
    sampled = full
    if seen is not None or filters_on(top_k, top_p, logits.shape[-1], min_p, blocked):
        sampled = allowed.gather(-1, token).squeeze(-1) - torch.logsumexp(allowed, dim=-1)
    # Two log-probs are recorded. Under the full tempered distribution, before blocking, the
    # penalty and top-k/top-p/min-p: that is what `completion_logprobs(..., temperature)`
    # recomputes in the update, so pi_old from here and pi_theta there are the same quantity.
    # And under the shaped, renormalised distribution the token was really drawn from,
    # pi_sampler, for the off-policy correction (algorithm.truncated_is_weights): with filters on,
    # pi_old / pi_sampler is below 1 (the mass the filters kept). Without them they are the same.
    return token.squeeze(-1), full, sampled


def _sample(model, prompt_ids, prompt_mask, G, max_new_tokens, eos_ids, pad_token_id,
            temperature, top_p, top_k, generator, fast: bool, min_p: float = 0.0, blocked: Tensor | None = None,
            repetition_penalty: float = 1.0, past: list | None = None, keep_cache: bool = False) -> Generation:
    """G samples per prompt, one batched decode loop of P*G rows.

    The batch shrinks as rows finish: `rows` maps the current batch rows to output rows, and the
    decode state drops what it no longer needs (finished rows, or finished groups). Tokens are
    drawn for the unfinished rows only, in output order, so both decode states make the same
    generator calls and draw the same tokens.
    """
    device = prompt_ids.device
    N = prompt_ids.shape[0] * G
    state, logits, next_pos = start(model, prompt_ids, prompt_mask, G, max_new_tokens, fast, past)
    # Rows are kept to the end, so their keys and values can be read out (ended ones ride along).
    keep_cache = keep_cache and isinstance(state, GroupDecoder) and keeps_caches(prompt_ids)

    completion_ids = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    sampling_logprobs = torch.zeros_like(logprobs)
    ended = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)                  # batch row -> output row
    live = torch.ones(N, dtype=torch.bool, device=device)  # per batch row: not ended yet
    seen = _prompt_tokens(prompt_ids, prompt_mask, G, logits.shape[-1]) if repetition_penalty != 1.0 else None
    steps = 0
    for t in range(max_new_tokens):
        all_live = bool(live.all())
        lg = logits if all_live else logits[live]
        out_rows = rows if all_live else rows[live]
        drawn, logprobs[out_rows, t], sampling_logprobs[out_rows, t] = _draw_recorded(
            lg, temperature, top_k, top_p, generator, min_p=min_p, blocked=blocked,
            seen=None if seen is None else seen[out_rows], repetition_penalty=repetition_penalty)
        completion_ids[out_rows, t] = drawn
        if seen is not None:
            seen[out_rows, drawn] = True
        is_eos = torch.isin(drawn, eos_ids)
        ended[out_rows] = is_eos
        steps = t + 1
        if t == max_new_tokens - 1:
            break  # no forward pass for logits nobody will use
        # Every batch row feeds a token (ended rows that ride along feed padding, never read).
        if all_live:
            token, live = drawn, ~is_eos
        else:
            token = torch.full((rows.numel(),), pad_token_id, dtype=torch.long, device=device)
            token[live] = drawn
            live = live.clone()
            live[live.clone()] = ~is_eos
        kept = state.keep(live) if not keep_cache else (None if bool(live.any()) else live.nonzero().squeeze(-1))
        if kept is not None:
            if kept.numel() == 0:
                break
            rows, live, token, next_pos = rows[kept], live[kept], token[kept], next_pos[kept]
        logits = state.step(token, next_pos, t)
        next_pos = next_pos + 1

    completion_ids, logprobs = completion_ids[:, :steps], logprobs[:, :steps]
    completion_mask = _mask_through_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    # A row's last token was drawn, never fed: its keys and values are the next call's to make.
    cache = state.row_caches((completion_mask.sum(-1) - 1).tolist()) if keep_cache else None
    return Generation(completion_ids, completion_mask, logprobs * completion_mask, ~ended,
                      sampling_logprobs[:, :steps] * completion_mask, cache=cache)


def _prompt_tokens(prompt_ids: Tensor, prompt_mask: Tensor, G: int, vocab_size: int) -> Tensor:
    """[P*G, V] bool: the tokens of each row's prompt (padding not), for the repetition penalty."""
    seen = torch.zeros(prompt_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=prompt_ids.device)
    seen.scatter_(1, prompt_ids.masked_fill(prompt_mask == 0, vocab_size), True)  # padding lands in the extra column
    return seen[:, :vocab_size].repeat_interleave(G, 0)


def _mask_through_eos(completion_ids: Tensor, eos_ids: Tensor) -> Tensor:
    """1 on every token up to and including the first EOS of the row (all of it if there is none)."""
    is_eos = torch.isin(completion_ids, eos_ids).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each column
    return (eos_before == 0).long()


# ----------------------------------------------------------------------------------------------
# Beam search.

def _beam(model, prompt_ids, prompt_mask, G, max_new_tokens, eos_ids, pad_token_id, fast: bool,
          blocked: Tensor | None = None) -> Generation:
    """Beam search of width G, batched over prompts; score = sum of token log-probs at T = 1.

    The textbook algorithm (Hugging Face's with `length_penalty=0, early_stopping="never"`, which
    its docs call the canonical one). Per prompt there are G alive beams (no EOS yet) and a pool
    of the G best finished hypotheses. Each step every alive beam is extended by every token and
    the G best extensions are the new beam: those ending in EOS leave it for the finished pool,
    and the beam is topped up to G with the next best non-EOS extensions. There is no length
    penalty, so a score only goes down as a hypothesis grows: once the G-th best finished score is
    >= the best alive score nothing can change and the prompt is done. At max_new_tokens the G
    best of finished + alive are returned, best first (alive ones are truncated).

    `fast`: the G beams of a prompt run on the group decoder (`decoders.GroupDecoder`) when the
    model is supported: the prompt's keys/values are kept once per prompt, and reordering the
    beams moves only their completion keys/values. The search itself is the same code either way.

    `blocked` [V] bool: tokens no beam may be extended by (as in sampling); the scores and the
    recorded log-probs stay those of the full distribution.
    """
    device = prompt_ids.device
    P, L = prompt_ids.shape[0], max_new_tokens
    NEG = float("-inf")
    state, logits, next_pos = start(model, prompt_ids, prompt_mask, G, max_new_tokens, fast)
    V = logits.shape[-1]
    is_eos_token = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos_token[eos_ids] = True

    # Alive beams, [P, G, ...]: scores, tokens, per-token log-probs. At the start there is one
    # beam per prompt (the empty completion); the other G - 1 slots score -inf so that their
    # extensions lose to every real one.
    alive_scores = torch.full((P, G), NEG, device=device)
    alive_scores[:, 0] = 0.0
    alive_ids = torch.full((P, G, L), pad_token_id, dtype=torch.long, device=device)
    alive_lp = torch.zeros(P, G, L, device=device)
    # Finished pool, [P, G, ...], plus each hypothesis' length (EOS included).
    fin_scores = torch.full((P, G), NEG, device=device)
    fin_ids = torch.full((P, G, L), pad_token_id, dtype=torch.long, device=device)
    fin_lp = torch.zeros(P, G, L, device=device)
    fin_len = torch.zeros(P, G, dtype=torch.long, device=device)

    steps = 0
    for t in range(L):
        steps = t + 1
        token_lp = torch.log_softmax(logits.float(), dim=-1).view(P, G, V)
        allowed_lp = token_lp if blocked is None else token_lp.masked_fill(blocked, NEG)
        cand = (alive_scores.unsqueeze(-1) + allowed_lp).view(P, G * V)  # beam g + token v

        # The G best extensions of this step; those that end in EOS join the finished pool.
        top_scores, top = torch.topk(cand, G, dim=1)
        ended = is_eos_token[top % V]
        new_ids, new_lp = _extend(alive_ids, alive_lp, token_lp, top // V, top % V, t)
        pool_scores = torch.cat([fin_scores, top_scores.masked_fill(~ended, NEG)], dim=1)
        fin_scores, keep = torch.topk(pool_scores, G, dim=1)
        fin_ids = _gather_beams(torch.cat([fin_ids, new_ids], dim=1), keep)
        fin_lp = _gather_beams(torch.cat([fin_lp, new_lp], dim=1), keep)
        fin_len = torch.cat([fin_len, torch.full_like(fin_len, t + 1)], dim=1).gather(1, keep)

        # The beam is topped up to G with the best extensions that did not end.
        alive_scores, top = torch.topk(cand.masked_fill(is_eos_token.repeat(G), NEG), G, dim=1)
        parent = top // V
        alive_ids, alive_lp = _extend(alive_ids, alive_lp, token_lp, parent, top % V, t)

        # Done when the G-th finished beats the best alive (scores only go down from here).
        done = fin_scores[:, -1] >= alive_scores[:, 0]
        if t == L - 1 or bool(done.all()):
            break
        # Each alive beam continues from its parent's cache (rows are p * G + g).
        beam_idx = (parent + torch.arange(P, device=device).unsqueeze(1) * G).view(-1)
        state.reorder(beam_idx, t)
        logits = state.step(alive_ids[:, :, t].reshape(-1), next_pos, t)
        next_pos = next_pos + 1

    # The G best of finished + alive, best first; on a tie the finished one (listed first) wins.
    scores = torch.cat([fin_scores, alive_scores], dim=1)
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :G]
    if bool(torch.isinf(scores.gather(1, best)).any()):
        raise ValueError(f"group_size={G} is more than the number of distinct completions of at "
                         f"most max_new_tokens={L} tokens with non-zero probability")
    truncated = best >= G
    ids = _gather_beams(torch.cat([fin_ids, alive_ids], dim=1), best)
    lps = _gather_beams(torch.cat([fin_lp, alive_lp], dim=1), best)
    lengths = torch.cat([fin_len, torch.full_like(fin_len, steps)], dim=1).gather(1, best)

    T = int(lengths.max())
    completion_mask = (torch.arange(T, device=device) < lengths.unsqueeze(-1)).long().view(P * G, T)
    completion_ids = ids[:, :, :T].reshape(P * G, T).masked_fill(completion_mask == 0, pad_token_id)
    logprobs = lps[:, :, :T].reshape(P * G, T) * completion_mask
    return Generation(completion_ids, completion_mask, logprobs, truncated.view(-1))


def count_completions(vocab_size: int, n_eos: int, max_new_tokens: int, at_least: int) -> int:
    """Distinct completions of at most max_new_tokens tokens: those ending in one of n_eos EOS
    tokens at each length, plus those cut at the limit; counting stops once `at_least` is reached
    (the number grows as vocab^length)."""
    other, total = vocab_size - n_eos, 0
    for length in range(1, max_new_tokens + 1):
        total += other ** (length - 1) * n_eos
        if total >= at_least:
            return total
    return total + other ** max_new_tokens


def _extend(ids: Tensor, lp: Tensor, token_lp: Tensor, parent: Tensor, tok: Tensor, t: int):
    """Beams [P, G, L] extended at step t: copies of beam parent[p, k] with token tok[p, k] appended."""
    ids, lp = _gather_beams(ids, parent), _gather_beams(lp, parent)  # gather copies: safe to write
    ids[:, :, t] = tok
    lp[:, :, t] = _gather_beams(token_lp, parent).gather(2, tok.unsqueeze(-1)).squeeze(-1)
    return ids, lp


# ----------------------------------------------------------------------------------------------

def _inference(fn):
    """`fn` under torch.inference_mode, not just no_grad: no autograd bookkeeping at all, which a
    decode loop of many small ops feels in every op. Its `Generation`'s tensors are cloned outside
    that mode, so training can use them (an inference tensor cannot be saved for backward); kept
    caches stay inference tensors, for later generation only."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.outside_inference()
    return run


@_inference
def generate_groups(model, prompt_ids: Tensor, prompt_mask: Tensor, *, group_size: int,
                    max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int,
                    strategy: str = "sample", temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0, generator: torch.Generator | None = None,
                    engine: str = "auto", min_p: float = 0.0, repetition_penalty: float = 1.0,
                    blocked_token_ids: list[int] | None = None, past: list | None = None,
                    keep_cache: bool = False) -> Generation:
    """Generate `group_size` completions for each of the P left-padded prompts [P, Lp].

    `sample`: i.i.d. samples from softmax(logits / temperature), restricted to the top_k tokens
    and the top_p nucleus when those are set; `generator` (on the model's device) makes it
    reproducible; `min_p` and `repetition_penalty` shape it further (`filter_logits`,
    `penalize_repetition`). `Generation.logprobs` are under the full tempered distribution, and
    `Generation.sampling_logprobs` under the shaped one actually sampled (see `_draw_recorded`).
    `beam`: beam search of width group_size per prompt, scored by the sum of token log-probs at
    temperature 1 with no length penalty, its G best distinct hypotheses best first. It is
    deterministic and ignores temperature, top_p, top_k, min_p, repetition_penalty and generator.
    `stochastic_beam`: group_size distinct completions per prompt drawn without replacement from
    the same distribution `sample` draws from (`stochastic_beam.stochastic_beam`; no repetition
    penalty), in the order drawn; `Generation.inclusion_probs` holds their inclusion probabilities.
    `blocked_token_ids` are never generated by any of them (padding, BOS mid-completion:
    `backend.blocked_token_ids`).

    `engine`: "auto" decodes Llama-style models on the group decoder (`decoders.GroupDecoder`)
    and others on their own KV cache (`decoders.CacheDecoder`); "plain" forces the latter (the
    reference the tests compare the group decoder with).

    `keep_cache` (sample, group decoder, no autocast): `Generation.cache` holds each row's keys and values,
    and `past` gives them back to a later call whose prompts extend those rows (one completion
    per prompt): only the new tokens are prefilled (`decoders.prefill_after`). The draw is the
    same as from the whole prompts, up to fp32 rounding of the logits.

    The model runs in eval mode (no dropout) and gets its training mode back afterwards.
    """
    if engine not in ("auto", "plain"):
        raise ValueError(f"engine must be 'auto' or 'plain', got {engine!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [P, Lp], got "
                         f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    device = model_device(model)
    if strategy != "beam" and generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator must be on the model's device ({device}), got {generator.device}")
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos_list:
        raise ValueError("eos_token_id must be a token id or a non-empty list of token ids")
    eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device).long()
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all 1")

    blocked = None
    if blocked_token_ids:
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
            else model.config.vocab_size
        blocked = torch.zeros(vocab, dtype=torch.bool, device=device)
        blocked[[t for t in blocked_token_ids if 0 <= t < vocab]] = True
        blocked[eos_ids] = False  # an EOS always ends a completion, whatever else it is

    was_training = model.training
    model.eval()
    try:
        if strategy == "sample":
            return _sample(model, prompt_ids, prompt_mask, group_size, max_new_tokens, eos_ids,
                           pad_token_id, temperature, top_p, top_k, generator, fast=engine == "auto",
                           min_p=min_p, blocked=blocked, repetition_penalty=repetition_penalty, past=past,
                           keep_cache=keep_cache)
        if strategy == "stochastic_beam":
            return stochastic_beam(model, prompt_ids, prompt_mask, group_size, max_new_tokens, eos_ids,
                                   pad_token_id, temperature, top_p, top_k, generator, fast=engine == "auto",
                                   min_p=min_p, blocked=blocked)
        return _beam(model, prompt_ids, prompt_mask, group_size, max_new_tokens, eos_ids, pad_token_id,
                     fast=engine == "auto", blocked=blocked)
    finally:
        model.train(was_training)
