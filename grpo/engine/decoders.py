"""Decode states: the KV cache of G completions per prompt, behind one small interface.

Sampling and beam search (`generation.py`) are written once against

    logits = state.step(token [B], position [B, 1], t)   # feed completion step t, next logits [B, V]
    kept = state.keep(live [B] bool)                      # drop rows no longer needed (None: kept all)
    state.reorder(rows [B], t)                            # row r continues from row rows[r] (beams)

and `start` prefills the P prompts once (P rows, not P*G) and picks the state:

- `GroupDecoder`, for Llama-style decoders (`llama.supported`): the prompt's keys/values are kept
  ONCE per prompt and the G rows of a group attend to them with one batched matmul; completion
  keys/values go into a cache preallocated for max_new_tokens. It drops whole groups (the
  prompt cache stays shared), and reordering beams moves only completion keys/values.
- `CacheDecoder`, any Hugging Face causal LM: the model's own cache, with the prompt's
  keys/values copied to each of the G rows; it drops finished rows one by one.

Under the same generator both draw the same tokens (up to fp32 rounding of the logits):
tests/test_fastpaths.py compares them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .llama import attention_shape, linear, rms_norm, rope, rope_table, rope_tables, supported, swiglu
from transformers import DynamicCache

from .models import cache_kwarg, output_cache, position_ids_from_mask, supports_logits_to_keep, unwrap


def _forward(model, kwarg: str, logits_to_keep: bool, input_ids, attention_mask, position_ids, cache):
    """One forward pass that returns the last position's logits [B, V] and the updated cache."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    if cache is not None:
        kwargs[kwarg] = cache
    if logits_to_keep:
        kwargs["logits_to_keep"] = 1  # only the next-token logits: the prefill skips [Lp x V]
    out = model(**kwargs)
    return out.logits[:, -1], output_cache(out)


def prefill(model, kwarg: str, logits_to_keep: bool, prompt_ids: Tensor, prompt_mask: Tensor):
    """The prompts' forward pass: (logits [P, V] of each row's last position, the KV cache)."""
    return _forward(model, kwarg, logits_to_keep, prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), None)


def keeps_caches(prompt_ids: Tensor) -> bool:
    """Whether kept keys and values can be continued here: not under autocast, whose prefill
    leaves keys and values in two dtypes (the kept ones are in one)."""
    return not torch.is_autocast_enabled(prompt_ids.device.type)


class KeptRows:
    """The keys and values one group-decoder call leaves, per layer as the decoder holds them
    (the prompts' [P, Hkv, Lp, hd] under `prompt_mask`, which may have holes, and the
    completions' [P*G, Hkv, T, hd]), and how many completion tokens each row fed. Row r's kept
    tokens are its prompt's real ones, then its first fed[r] completion tokens."""

    def __init__(self, layers: list[tuple[Tensor, Tensor, Tensor, Tensor]], prompt_mask: Tensor, G: int,
                 fed: list[int]):
        self.layers, self.G = layers, G
        # Per prompt, its positions with the real ones last, in order (a stable sort of the mask).
        self.order = torch.sort(prompt_mask, dim=-1, stable=True).indices
        self.prompt_lengths = prompt_mask.sum(-1)
        self.fed = torch.tensor(fed, device=prompt_mask.device)

    def rows(self) -> list["KeptRow"]:
        lengths = (self.prompt_lengths.repeat_interleave(self.G) + self.fed).tolist()
        return [KeptRow(self, r, n) for r, n in enumerate(lengths)]

    def gather(self, rows: Tensor, width: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the keys and values of `rows`, right-aligned in [len(rows), Hkv, width, hd]
        (left of a row's kept tokens lies whatever the index lands on: the mask hides it)."""
        P, Lp = self.order.shape
        N = self.fed.shape[0]
        prompts = torch.div(rows, self.G, rounding_mode="floor")
        m, n = self.prompt_lengths[prompts][:, None], self.fed[rows][:, None]   # [b, 1]
        T = max(int(n.max()), 1)
        offset = torch.arange(width, device=rows.device) - (width - m - n)     # [b, width]: 0 at the first kept
        # Rows of one table per layer, [every prompt's Lp tokens | every row's first T completion
        # tokens]: the prompt's j-th real token, then completion token j.
        in_prompt = prompts[:, None] * Lp + self.order[prompts].gather(1, (Lp - m + offset).clamp(0, Lp - 1))
        in_completion = P * Lp + rows[:, None] * T + (offset - m).clamp(0, T - 1)
        index = torch.where(offset < m, in_prompt, in_completion).view(-1)
        out = []
        for kp, vp, kc, vc in self.layers:
            Hkv, hd = kp.shape[1], kp.shape[3]
            tables = (torch.cat([p.transpose(1, 2).reshape(P * Lp, Hkv * hd),
                                 c[:, :, :T].transpose(1, 2).reshape(N * T, Hkv * hd)])
                      for p, c in ((kp, kc), (vp, vc)))
            out.append(tuple(t.index_select(0, index).view(len(rows), width, Hkv, hd).transpose(1, 2) for t in tables))
        return out


class KeptRow:
    """One row of a `KeptRows`: what `Generation.cache` holds per row, and `past` gives back."""

    def __init__(self, rows: KeptRows, r: int, length: int):
        self.rows, self.r, self.length = rows, r, length


def prefill_after(model, kwarg: str, logits_to_keep: bool, prompt_ids: Tensor, prompt_mask: Tensor, past: list):
    """The prompts' forward pass where an earlier call already read the first tokens of some rows:
    `past[i]` (None, or a `KeptRow` of row i's first tokens) goes into the cache as it is, and
    only the rest is fed.

    Row i's cache is laid out [padding, its n kept tokens, padding, its new tokens]; the mask
    hides both paddings and positions count real tokens only, so every token sits at the
    position, and attends to the keys, that a prefill of the whole row gives it.
    Returns (logits [P, V], the KV cache, its mask [P, Lk + Ls]).
    """
    L = prompt_ids.shape[1]
    device = prompt_ids.device
    kept = torch.tensor([0 if p is None else p.length for p in past], device=device)
    new = prompt_mask.sum(-1) - kept
    Lk, Ls = int(kept.max()), int(new.max())
    # Left-padded: each row's new tokens are its last ones.
    new_mask = (torch.arange(Ls, device=device) >= Ls - new[:, None]).to(prompt_mask.dtype)
    new_ids = prompt_ids[:, L - Ls:].masked_fill(new_mask == 0, 0)
    kept_mask = (torch.arange(Lk, device=device) >= Lk - kept[:, None]).to(prompt_mask.dtype)
    # Every row gathers from the first call that kept rows (usually the only one): a row with
    # nothing kept there reads its row 0, under a mask of zeros; rows another call kept are
    # gathered from it and written over theirs.
    layers = None
    for owner in {id(p.rows): p.rows for p in past if p is not None}.values():
        mine = [p is not None and p.rows is owner for p in past]
        rows = torch.tensor([p.r if m else 0 for p, m in zip(past, mine)], device=device)
        if layers is None:
            layers = owner.gather(rows, Lk)
            continue
        at = torch.tensor([i for i, m in enumerate(mine) if m], device=device)
        for (k, v), (pk, pv) in zip(layers, owner.gather(rows[at], Lk)):
            k[at], v[at] = pk, pv
    mask = torch.cat([kept_mask, new_mask], dim=1)
    logits, cache = _forward(model, kwarg, logits_to_keep, new_ids, mask, position_ids_from_mask(mask)[:, Lk:],
                             DynamicCache(ddp_cache_data=layers))
    return logits, cache, mask


def start(model, prompt_ids: Tensor, prompt_mask: Tensor, G: int, max_new_tokens: int, fast: bool,
          past: list | None = None):
    """Prefill the left-padded prompts once and set up decoding of G rows per prompt.

    Returns (state, logits [P*G, V] predicting the first completion token, next_pos [P*G, 1]).
    `fast`: the group decoder when the model is supported, else the plain cache decoder.
    `past`: kept keys and values of the rows' first tokens (prefill_after); used on the group
    decoder at G = 1 outside autocast, ignored otherwise (the whole prompts are prefilled).
    """
    kwarg, keep = cache_kwarg(model), supports_logits_to_keep(model)
    # The next token of each row sits right after its last real token: position = its length.
    next_pos = prompt_mask.sum(-1, keepdim=True)
    # Positions used: up to the longest prompt plus max_new_tokens (a sliding window at least that
    # long never hides a key).
    group = fast and supported(model, prompt_ids.shape[1] + max_new_tokens)
    if group and G == 1 and past is not None and any(p is not None for p in past) and keeps_caches(prompt_ids):
        logits, cache, prompt_mask = prefill_after(model, kwarg, keep, prompt_ids, prompt_mask, past)
    else:
        logits, cache = prefill(model, kwarg, keep, prompt_ids, prompt_mask)
    if group:
        state = GroupDecoder(unwrap(model), cache, prompt_mask, G, max_new_tokens)
    else:
        cache.batch_repeat_interleave(G)
        state = CacheDecoder(model, kwarg, keep, cache, prompt_mask.repeat_interleave(G, dim=0))
    return state, logits.repeat_interleave(G, dim=0), next_pos.repeat_interleave(G, dim=0)


class CacheDecoder:
    """Decoding through `model(...)` with the model's own KV cache (any causal LM)."""

    def __init__(self, model, kwarg: str, logits_to_keep: bool, cache, attention_mask: Tensor):
        self.model, self.kwarg, self.logits_to_keep = model, kwarg, logits_to_keep
        self.cache, self.attention_mask = cache, attention_mask

    def step(self, token: Tensor, position: Tensor, t: int) -> Tensor:
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(token.shape[0], 1)], dim=1)
        logits, self.cache = _forward(self.model, self.kwarg, self.logits_to_keep, token[:, None], self.attention_mask,
                                      position, self.cache)
        return logits

    def keep(self, live: Tensor) -> Tensor | None:
        """Every finished row leaves the batch: it costs nothing from here on."""
        kept = live.nonzero().squeeze(-1)
        if kept.numel() == live.numel():  # the one host sync per step: early stop and batch shrinking
            return None
        if kept.numel():
            self.cache.batch_select_indices(kept)
            self.attention_mask = self.attention_mask[kept]
        return kept

    def reorder(self, rows: Tensor, t: int) -> None:
        self.cache.reorder_cache(rows)


# What the group decoder saves over `CacheDecoder`:
# - the prompt's keys/values are kept ONCE per prompt ([P, Hkv, Lp, hd]), never copied G times:
#   in every decode step the G rows of a group attend to it with one batched matmul whose rows
#   are the group's queries, so a long shared prompt costs its prefill once per group and its
#   keys/values are read once per group per step, not G times;
# - the completion keys/values go into a cache preallocated for max_new_tokens (no torch.cat
#   per step and layer);
# - RoPE runs once on q and k together. (The projections stay separate matmuls on the model's
#   own weights: with q/k/v and gate/up weights concatenated into one matmul each, decoding the
#   30M benchmark model was slower on a CPU: wide matmuls at 32 rows run slower per FLOP.)
# - finished groups are dropped from the batch (a group, not a row, so the prompt cache stays
#   shared); rows that ended inside a live group ride along, and are never sampled from.

class GroupDecoder:
    """Decode state of one generation call: shared prompt KV, preallocated completion KV."""

    def __init__(self, model, prompt_cache, prompt_mask, G, max_new_tokens):
        self.model, self.G = model, G
        self.H, self.Hkv, self.hd, self.scale = attention_shape(model)
        self.rep = self.H // self.Hkv
        device = prompt_mask.device
        # Under autocast the prefill leaves keys in float32 (RoPE multiplies by float32 cos/sin) and
        # values in the compute dtype: both caches are kept in the compute dtype (half the memory
        # and no per-step cast of the prompt keys).
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else prompt_cache.layers[0].keys.dtype
        # The hidden states' dtype: the embedding's; under autocast none is fixed (it casts inside ops).
        states = None if autocast else model.model.embed_tokens.weight.dtype
        self.layers = []
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            self.layers.append(dict(
                ln1=rms_norm(layer.input_layernorm, states), ln2=rms_norm(layer.post_attention_layernorm, states),
                mlp=swiglu(layer.mlp),
                q=linear(a.q_proj), k=linear(a.k_proj), v=linear(a.v_proj), o=linear(a.o_proj),
                # Prompt keys/values as the prefill left them (RoPE applied): [P, Hkv, Lp, hd].
                kp=prompt_cache.layers[i].keys, vp=prompt_cache.layers[i].values))
        self.norm = rms_norm(model.model.norm, states)
        self.head = linear(model.lm_head)
        P = prompt_mask.shape[0]
        N = P * G
        # cos/sin of every position a step can feed (the longest prompt's length plus
        # max_new_tokens), made once instead of at every step.
        self.rope = rope_table(model, model.model.embed_tokens.weight[:0],
                               int(prompt_mask.sum(-1).max()) + max_new_tokens)
        for lay in self.layers:
            lay["kp"], lay["vp"] = lay["kp"].to(dtype), lay["vp"].to(dtype)
            lay["kc"] = torch.empty(N, self.Hkv, max_new_tokens, self.hd, dtype=dtype, device=device)
            lay["vc"] = torch.empty_like(lay["kc"])
        self.prompt_mask = prompt_mask
        # Additive mask over the prompt keys: -inf on left padding. [P, 1, 1, Lp]
        self.prompt_bias = None
        if not bool(prompt_mask.all()):
            self.prompt_bias = torch.zeros(prompt_mask.shape, dtype=dtype, device=device).masked_fill(
                prompt_mask == 0, float("-inf"))[:, None, None, :]

    def keep(self, live: Tensor) -> Tensor | None:
        """Groups with no live row leave the batch; returns the batch rows kept (None: all)."""
        group_live = live.view(-1, self.G).any(-1)
        n_groups = int(group_live.sum())  # the one host sync per step
        if n_groups == group_live.numel():
            return None
        keep = group_live.nonzero().squeeze(-1)
        rows = (keep[:, None] * self.G + torch.arange(self.G, device=keep.device)).reshape(-1)
        for lay in self.layers:
            lay["kp"], lay["vp"] = lay["kp"][keep], lay["vp"][keep]
            lay["kc"], lay["vc"] = lay["kc"][rows], lay["vc"][rows]
        if self.prompt_bias is not None:
            self.prompt_bias = self.prompt_bias[keep]
        return rows

    def row_caches(self, fed: list[int]) -> list["KeptRow"]:
        """Per row, its prompt's real tokens' keys and values and those of its first fed[r]
        completion tokens (`KeptRow`): what `prefill_after` continues from. Valid while no
        group has left the batch."""
        # Only the fed columns are kept: the rest of the preallocated cache is freed with the decoder.
        T = max(max(fed), 1)
        return KeptRows([(lay["kp"], lay["vp"], lay["kc"][:, :, :T].clone(), lay["vc"][:, :, :T].clone())
                         for lay in self.layers], self.prompt_mask, self.G, fed).rows()

    def reorder(self, rows: Tensor, t: int) -> None:
        """Row r continues from row rows[r] (within its group): the completion keys/values of the
        t tokens fed so far move with it; the group's prompt keys/values are untouched."""
        for lay in self.layers:
            lay["kc"][:, :, :t] = lay["kc"][rows, :, :t]
            lay["vc"][:, :, :t] = lay["vc"][rows, :, :t]

    def step(self, token: Tensor, position: Tensor, t: int) -> Tensor:
        """Feed token [B] (B = groups * G) at position [B, 1] as completion step t; returns the
        next-token logits [B, V].

        Written for few, large ops: on a busy CPU every op costs a scheduling slot whatever its
        size, so RoPE runs once on q and k together, the softmax scale is folded into q, and the
        prompt mask is only added when some prompt is padded.
        """
        model = self.model
        B, G, H, Hkv, rep, hd = token.shape[0], self.G, self.H, self.Hkv, self.rep, self.hd
        Pa = B // G
        x = model.model.embed_tokens(token)                              # [B, D]
        if self.rope is not None:
            cos, sin = self.rope[0][position.view(-1)], self.rope[1][position.view(-1)]  # [B, 1, hd]
        else:
            cos, sin = rope_tables(model, x, position)
        for lay in self.layers:
            h = lay["ln1"](x)
            qk = rope(torch.cat([lay["q"](h), lay["k"](h)], dim=-1).view(B, H + Hkv, hd), cos, sin)
            q = qk[:, :H] * self.scale                                   # [B, H, hd]
            kc, vc = lay["kc"], lay["vc"]
            kc[:, :, t] = qk[:, H:]
            vc[:, :, t] = lay["v"](h).view(B, Hkv, hd)
            # Queries of a group against its shared prompt: [Pa, Hkv, G*rep, hd] @ [Pa, Hkv, hd, Lp].
            qg = q.view(Pa, G, Hkv, rep, hd).transpose(1, 2).reshape(Pa, Hkv, G * rep, hd)
            s_p = torch.matmul(qg, lay["kp"].transpose(-1, -2))
            if self.prompt_bias is not None:
                s_p = s_p + self.prompt_bias
            # Each row against its own completion so far: [B, Hkv, rep, hd] x [B, Hkv, t+1, hd].
            # (Elementwise multiply-and-sum, not bmm: B*Hkv products of [rep x hd] @ [hd x t+1]
            # are far too small for a matmul kernel to pay for its call.)
            s_c = (q.view(B, Hkv, rep, 1, hd) * kc[:, :, None, :t + 1]).sum(-1)
            s_c = s_c.view(Pa, G, Hkv, rep, t + 1).transpose(1, 2).reshape(Pa, Hkv, G * rep, t + 1)
            p = torch.softmax(torch.cat([s_p, s_c], dim=-1), dim=-1)
            Lp = s_p.shape[-1]
            o = torch.matmul(p[..., :Lp], lay["vp"])                     # [Pa, Hkv, G*rep, hd]
            p_c = p[..., Lp:].reshape(Pa, Hkv, G, rep, t + 1).transpose(1, 2).reshape(B, Hkv, rep, t + 1)
            o_c = (p_c.unsqueeze(-1) * vc[:, :, None, :t + 1]).sum(-2)   # [B, Hkv, rep, hd]
            o = o.view(Pa, Hkv, G, rep, hd).transpose(1, 2).reshape(B, H * hd) + o_c.view(B, H * hd)
            x = x + lay["o"](o)
            x = x + lay["mlp"](lay["ln2"](x))
        return self.head(self.norm(x))
