"""The scoring forward written for groups: G completions per prompt, packed, through the model's
own layers.

`completion_logprobs` needs, for every completion token it will score, the hidden state that
predicts it: for the policy in the update (with grad) and for pi_ref / pi_old (without). Run
through `model(...)` on a padded batch [N, Lp + T], that costs

- the prompt G times (every row of a group carries the same prompt), and
- every row padded to the longest completion: with EOS at ~12 of 16 tokens, a quarter of the
  completion columns are padding whose forward and backward are paid for and thrown away.

Here one forward of the model's own `forward` runs over a packed token list instead (batch 1):
each distinct prompt once, then each row's completion tokens up to the last one that is scored,
nothing else, each at its true position id. Everything but attention is the model's own code:
embeddings, norms (q_norm/k_norm included), biases, rotary tables, MLPs and MoE blocks,
LoRA-wrapped Linear layers, Hugging Face's gradient checkpointing and FSDP2's module hooks. Only
the attention function is ours, registered with transformers' `AttentionInterface`: each row's
completion queries attend, in one call of PyTorch's fused attention, to their group's prompt keys
followed by their own earlier completion tokens (`_packed_attention`), with the model's sliding
window and attention-logit softcapping where it has them.

How the function is reached: `prepare(model)` switches the model's attention implementation to
`grpo_packed_<original>` (once; the original is `sdpa` or `eager`). That function does the packed
attention when the forward carries `grpo_packed=PackedGroups` among its keyword arguments (the
model hands its **kwargs down to the attention call) and is the original implementation, called
with the original mask, otherwise: generation and every other forward of the model compute what
they did before. The switch is permanent rather than per call because Hugging Face's gradient
checkpointing recomputes the layers in the backward, after the call has returned: the recompute
must still find the packed function, and it finds `grpo_packed` in its recorded kwargs.

For Llama-style models (`llama.supported`) a hand-written version of the same forward
(`llama_hidden`, at the end of this file) is a few percent faster on small models, can keep half
of each MLP's activations, checkpoints its own layers under activation checkpointing, and is
taken unless the layers are FSDP2-sharded.

Same numbers as `model(...)` on the padded batch (fp32 tolerance; tests/test_fastpaths.py and
tests/test_architectures.py check log-probs, entropy and gradients against it for every
architecture in `PACKED_MODEL_TYPES`). A model outside that set, or one `unsupported_reason`
turns away, is scored by `logprobs`' KV-cache hand-over or plain forward instead, with the same
numbers.
"""

from __future__ import annotations

import contextvars
import sys

import torch
import torch.utils.checkpoint
from torch import Tensor

from .models import supports_logits_to_keep, unwrap

# Architectures (config.model_type) whose packed forward is tested against their plain forward
# (tests/test_architectures.py). Any model that runs its attention through AttentionInterface and
# takes position_ids should work; a new one joins this set together with its test.
PACKED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "smollm3",
    "gpt2", "gpt_neox", "qwen2_moe", "qwen3_moe", "mixtral",
})
PREFIX = "grpo_packed_"
_ORIGINALS = ("sdpa", "eager")
# Set while a packed forward builds its masks: the mask functions then return None (the packed
# attention builds its own from PackedGroups). Masks are built once per forward, before the
# layers, so the backward's recompute never needs this.
_PACKED_MASKS = contextvars.ContextVar("grpo_packed_masks", default=False)


class PackedGroups:
    """Where every token of a packed batch sits: the index bookkeeping, computed once per call.

    prompts/prompt_mask [U, Lp]: the distinct prompts, left-padded. inverse [N]: each row's prompt
    (rows of one prompt are consecutive). targets [N, T]: completion tokens. lengths [N]: how many
    leading completion tokens of each row are scored (0 .. T).

    Packed order: the U*Lp prompt tokens (padding included: U*Lp is small and a fixed layout makes
    the prompt's attention a plain view), then row 0's fed completion tokens, row 1's, ... Row i
    feeds lengths[i] - 1 of them: its last scored token predicts nothing that is needed.
    """

    def __init__(self, prompts: Tensor, prompt_mask: Tensor, inverse: Tensor, targets: Tensor, lengths: Tensor):
        device = prompts.device
        U, Lp = prompts.shape
        N, T = targets.shape
        self.U, self.Lp = U, Lp
        fed = (lengths - 1).clamp(min=0)                                 # completion tokens fed per row
        self.Tc = max(int(fed.max()), 1) if N else 1
        # Each row's slot in its group: rows of prompt u are consecutive, slot = rank among them.
        counts = torch.bincount(inverse, minlength=U)
        self.Gmax = max(int(counts.max()), 1)
        group_start = torch.cumsum(counts, 0) - counts
        slot = inverse * self.Gmax + (torch.arange(N, device=device) - group_start[inverse])

        # Fed completion tokens: (row, column) pairs in packed order.
        col = torch.arange(self.Tc, device=device)
        feeds = col[None, :] < fed[:, None]                              # [N, Tc]
        row_of, col_of = feeds.nonzero(as_tuple=True)
        prompt_len = prompt_mask.sum(-1)
        self.prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)     # [U, Lp]
        self.input_ids = torch.cat([prompts.reshape(-1), targets[row_of, col_of]])
        self.position_ids = torch.cat([self.prompt_pos.reshape(-1), prompt_len[inverse][row_of] + col_of])
        # Real tokens of the packed list (prompt padding is not): what the MoE router loss counts.
        self.real = torch.cat([prompt_mask.reshape(-1) != 0, torch.ones_like(row_of, dtype=torch.bool)])
        # Where each fed token goes in the attention layout [U * Gmax * Tc].
        self.layout_index = slot[row_of] * self.Tc + col_of
        self.key_real = prompt_mask != 0                                 # [U, Lp]
        # Query positions of the layout's completion columns, per group: [U, Tc].
        self.completion_pos = prompt_len[:, None] + col[None, :]
        self._masks: dict = {}
        self.calls = 0  # attention calls that took the packed path in the last forward

        # The hidden states that predict scored token t of row i: the prompt's last position for
        # t = 0, fed completion token t - 1 otherwise. `score_index` picks them out of the packed
        # list; (score_row, score_col) is where each lands in the [N, T] result.
        scored = torch.arange(T, device=device)[None, :] < lengths[:, None]
        srow, scol = scored.nonzero(as_tuple=True)
        fed_start = torch.cumsum(fed, 0) - fed                           # packed offset of each row
        from_prompt = inverse[srow] * Lp + (Lp - 1)
        from_completion = U * Lp + fed_start[srow] + scol - 1
        self.score_index = torch.where(scol == 0, from_prompt, from_completion)
        self.score_row, self.score_col = srow, scol
        self.score_targets = targets[srow, scol]

    def masks(self, window: int | None) -> tuple[Tensor, Tensor]:
        """(prompt mask [U, 1, Lp, Lp], completion mask [U * Gmax, 1, Tc, Lp + Tc]), True = may
        attend, for a layer with this sliding window (None: none).

        Prompts: causal within the prompt, padding keys hidden; a padding query would see no key
        at all (NaN), so it sees itself. Completions: the group's real prompt tokens, then the
        row's own tokens causally. A sliding window W keeps the keys whose position is within
        W - 1 of the query's (Hugging Face's `kv_idx > q_idx - W`; in a left-padded row the
        column distance of two real tokens is their position distance)."""
        if window in self._masks:
            return self._masks[window]
        device, Lp, Tc = self.key_real.device, self.Lp, self.Tc
        causal = torch.ones(Lp, Lp, dtype=torch.bool, device=device).tril()
        eye = torch.eye(Lp, dtype=torch.bool, device=device)
        prompt = causal & (self.key_real[:, None, :] | eye)             # [U, Lp(q), Lp(k)]
        own = torch.ones(Tc, Tc, dtype=torch.bool, device=device).tril()
        completion = torch.cat([self.key_real[:, None, :].expand(-1, Tc, Lp),
                                own.expand(self.U, Tc, Tc)], dim=-1)     # [U, Tc, Lp + Tc]
        if window is not None:
            pp, cp = self.prompt_pos, self.completion_pos
            prompt = prompt & (pp[:, :, None] - pp[:, None, :] < window)
            keys = torch.cat([pp, cp], dim=-1)                           # [U, Lp + Tc]
            completion = completion & (cp[:, :, None] - keys[:, None, :] < window)
        out = prompt[:, None], completion[:, None].repeat_interleave(self.Gmax, dim=0)
        self._masks[window] = out
        return out


def _scatter(zeros: Tensor, index, x: Tensor) -> Tensor:
    """zeros[index] = x. Not `index_copy`: its backward keeps `x` (a view of the whole q, k or v
    here, [M, D] for q) until the end of the backward; indexing assignment keeps the index only."""
    zeros[index] = x
    return zeros


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float | None) -> Tensor:
    """softmax(q k^T * scale [softcapped], masked) v, for q [..., H, L, d] and k, v [..., Hkv, S, d]
    (grouped-query attention: each key/value head serves H / Hkv query heads). Fused SDPA, which
    reads the shared heads in place (`enable_gqa`: no H / Hkv copies of the keys and values kept
    for the backward), or with softcapping (Gemma 2/3) the eager maths of the model's own
    attention: scores / cap, tanh, * cap, before the mask."""
    rep = q.shape[-3] // k.shape[-3]
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=rep > 1)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _packed_attention(module, query: Tensor, key: Tensor, value: Tensor, pk: PackedGroups, *,
                      scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None, **kwargs) -> Tensor:
    """query [1, H, M, hd], key/value [1, Hkv, M, hd] in packed order -> [1, M, H, hd].

    Two attention calls: the prompts among themselves, then every row's completion against its
    group's prompt keys followed by its own keys. The prompt keys are expanded to the G rows of a
    group, not copied into the packed list: its projections, like everything else about the
    prompt, ran once."""
    if dropout:
        raise RuntimeError("packed attention: attention dropout is on (engine.models.disable_dropout turns it off)")
    if is_causal is False or any(kwargs.get(k) is not None for k in ("s_aux", "position_bias")):
        raise RuntimeError(f"packed attention: {type(module).__name__} needs an attention this path does not have")
    pk.calls += 1
    q, k, v = query[0], key[0], value[0]                                 # [H(kv), M, hd], as the model made them
    H, _, hd = q.shape
    scale = hd ** -0.5 if scaling is None else scaling
    U, Lp, Gmax, Tc = pk.U, pk.Lp, pk.Gmax, pk.Tc
    n_prompt, rows = U * Lp, U * Gmax
    prompt_mask, completion_mask = pk.masks(sliding_window)

    def prompts(x):  # [H, M, d] -> the prompts' [U, H, Lp, d] (H: x's heads, query or key/value)
        return x[:, :n_prompt].reshape(x.shape[0], U, Lp, x.shape[-1]).transpose(0, 1)

    # Copies (U * Lp rows, few): SDPA keeps its inputs for the backward, and views would keep
    # the whole of q, k and v with them.
    qp, kp, vp = (prompts(x).contiguous() for x in (q, k, v))
    out_prompt = _attend(qp, kp, vp, prompt_mask, scale, softcap)      # [U, H, Lp, dv]

    # The completions, scattered into [U * Gmax rows, Tc] (empty slots stay zero, never read).
    def layout(x):  # [H, M, d] -> [rows, H, Tc, d]
        h, d = x.shape[0], x.shape[-1]
        return _scatter(x.new_zeros(h, rows * Tc, d), (slice(None), pk.layout_index), x[:, n_prompt:]) \
            .view(h, rows, Tc, d).transpose(0, 1)
    keys = torch.cat([kp.repeat_interleave(Gmax, dim=0), layout(k)], dim=2)   # [rows, H, Lp + Tc, hd]
    values = torch.cat([vp.repeat_interleave(Gmax, dim=0), layout(v)], dim=2)
    out = _attend(layout(q), keys, values, completion_mask, scale, softcap)     # [rows, H, Tc, dv]
    dv = out.shape[-1]
    out_completion = out.transpose(1, 2).reshape(rows * Tc, H, dv).index_select(0, pk.layout_index)
    return torch.cat([out_prompt.transpose(1, 2).reshape(n_prompt, H, dv), out_completion])[None]


def _original_attention(module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if name == "eager":  # every modeling file defines its own eager attention
        for cls in type(module).__mro__:  # (a wrapper's subclass, e.g. FSDP2's, lives elsewhere)
            fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
            if fn is not None:
                return fn
        raise RuntimeError(f"packed attention: no eager attention found for {type(module).__name__}")
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_attention(original: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        pk = kwargs.pop("grpo_packed", None)
        if pk is None:
            return _original_attention(module, original)(module, query, key, value, attention_mask, **kwargs)
        return _packed_attention(module, query, key, value, pk, **kwargs), None
    return attention


def _make_mask(original: str):
    def mask(**kwargs):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        if _PACKED_MASKS.get():
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[original](**kwargs)
    return mask


def _register(original: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(original))
        AttentionMaskInterface.register(name, _make_mask(original))
    assert name in ALL_MASK_ATTENTION_FUNCTIONS
    return name


def unsupported_reason(model) -> str | None:
    """Why the packed forward would not compute exactly what `model(...)` does (None: it would)."""
    base = unwrap(model)
    cfg = base.config
    if getattr(cfg, "model_type", None) not in PACKED_MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not among the tested PACKED_MODEL_TYPES"
    if not supports_logits_to_keep(base):
        return f"{type(base).__name__}.forward has no logits_to_keep (the LM head would run on every packed token)"
    if not base._can_set_attn_implementation():
        return f"{type(base).__name__} does not route attention through transformers' AttentionInterface"
    impl = cfg._attn_implementation
    if not (impl in _ORIGINALS or impl.startswith(PREFIX)):
        return f"attention implementation {impl!r} (the packed path wraps sdpa or eager)"
    if getattr(cfg, "reorder_and_upcast_attn", False) or getattr(cfg, "use_bidirectional_attention", False):
        return "an attention variant the packed attention does not implement"
    if base.training and attention_dropout_on(base):
        return "attention dropout is on in training mode"
    return None


def supported(model) -> bool:
    return unsupported_reason(model) is None


def attention_dropout_on(model) -> bool:
    """Whether the config asks for attention-probability dropout. (Modules copy it at init;
    `models.disable_dropout` zeroes both, and the packed attention refuses a non-zero one.)"""
    cfg = model.config
    return any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "attn_pdrop"))


def prepare(model) -> None:
    """Switch the model's attention implementation to the packed-aware wrapper of the original
    one (idempotent). Every forward without `grpo_packed` computes exactly what it did."""
    base = unwrap(model)
    impl = base.config._attn_implementation
    if not impl.startswith(PREFIX):
        base.set_attn_implementation(_register(impl))


def forward(model, pk: PackedGroups, call):
    """`call(**inputs)` (the model, or a function that calls it) on the packed token list (batch
    1, true position ids, `grpo_packed=pk` for the attention function); returns what it returns.
    The caller picks the LM head's positions (`logits_to_keep=pk.score_index`)."""
    prepare(model)
    pk.calls = 0
    token = _PACKED_MASKS.set(True)
    try:
        result = call(input_ids=pk.input_ids[None], position_ids=pk.position_ids[None], use_cache=False, grpo_packed=pk)
    finally:
        _PACKED_MASKS.reset(token)
    layers = unwrap(model).config.num_hidden_layers
    if pk.calls != layers:  # the kwarg did not reach every attention call: its numbers would be wrong
        raise RuntimeError(f"packed forward: {pk.calls} of {layers} attention layers took the packed path "
                           f"({type(unwrap(model)).__name__} does not pass its kwargs down to attention)")
    return result


# ----------------------------------------------------------------------------------------------
# The hand-written Llama-style forward over the same packed list. It computes what `forward` does
# for the models `llama.supported` accepts, a little faster on the ~1M-parameter models this
# repository's CPU tests and benchmarks train (no Hugging Face layer machinery per op), and on
# real models lighter: its MLP can keep half of its activations
# (`llama.mlp`). It calls the layers' submodules directly, which would bypass Hugging Face's
# activation checkpointing (a wrapper around each layer's __call__), so under checkpointing it
# checkpoints each of its layers itself (torch.utils.checkpoint, non-reentrant, as HF does); it is
# not taken on FSDP2-sharded layers (whose parameters only exist whole inside their layer's own
# forward).

def hand_written(model, positions: int) -> bool:
    """Whether `llama_hidden` may stand in for `forward` on this model (`positions`: the
    longest prompt + completion it will see, for sliding windows)."""
    from .llama import supported as llama_supported
    if not llama_supported(model, positions):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed
        return True
    base = unwrap(model)
    return not isinstance(base, FSDPModule) and not isinstance(base.model.layers[0], FSDPModule)


class _WriteRows(torch.autograd.Function):
    """out[a:b] = rows, in place, for an `out` whose rows are each written once: the backward hands
    `rows` its slice of the gradient as a view and passes the gradient on to the earlier `out`
    unchanged. (Autograd's own in-place copy zeroes the written slice in a clone of the whole
    gradient, one [M, width] copy per write.) Passing it on unzeroed is exact here because the
    writes are disjoint: the rows a later write covers are rows no earlier write touched, so that
    part of the gradient reaches only the unwritten buffer, which needs none."""

    @staticmethod
    def forward(ctx, out, rows, a: int, b: int):
        out[a:b] = rows
        ctx.mark_dirty(out)
        ctx.span = a, b
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.span
        return grad, grad[a:b], None, None


def _llama_attention(q: Tensor, k: Tensor, v: Tensor, pk: PackedGroups, scale: float,
                     per_call: int | None = None) -> Tensor:
    """`_packed_attention` for q [M, H, hd], k/v [M, Hkv, hd] -> [M, H * hd] (no sliding window,
    no softcapping: what `llama.supported` models have).

    `per_call`: the completion rows run that many at a time (None: all in one call), each run
    from its own rows of q/k/v straight into its rows of the result. Then the laid-out queries,
    SDPA's output and its transpose exist a run at a time, not for the whole batch, and so do
    the largest buffers of SDPA's backward on a CPU (with grouped-query attention it widens the
    key and value gradients to H heads: two [rows, H, Lp + Tc, hd])."""
    M, H, hd = q.shape
    gqa = k.shape[1] != H  # grouped-query attention: SDPA reads each key/value head for H / Hkv query heads
    U, Lp, Gmax, Tc = pk.U, pk.Lp, pk.Gmax, pk.Tc
    n_prompt, rows = U * Lp, U * Gmax
    prompt_mask, completion_mask = pk.masks(None)

    def sdpa(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    def heads_first(x, n):  # [n * L, h, hd] -> [n, h, L, hd]
        return x.reshape(n, -1, x.shape[1], hd).transpose(1, 2)

    # Layout rows r0 .. r1 hold the fed tokens a .. b (packed order is row by row). q, k and v are
    # split, not sliced: the backward of a slice is a whole-size tensor of zeros per run.
    per_call = per_call or rows
    bounds = torch.arange(0, rows + per_call, per_call, device=q.device).clamp(max=rows) * Tc
    starts = torch.searchsorted(pk.layout_index, bounds).tolist()
    sizes = [n_prompt] + [b - a for a, b in zip(starts, starts[1:])]
    (qp, *q_runs), (kp, *k_runs), (vp, *v_runs) = (x.split(sizes) for x in (q, k, v))
    # Copies (U * Lp rows, few): the prompts' SDPA keeps its inputs for the backward, and views
    # would keep the whole of q, k and v alive with them.
    qp, kp, vp = (heads_first(x, U).contiguous() for x in (qp, kp, vp))
    out = q.new_empty(M, H * hd)
    out = _WriteRows.apply(out, sdpa(qp, kp, vp, prompt_mask).transpose(1, 2).reshape(n_prompt, H * hd), 0, n_prompt)
    for r0, (a, b), q_run, k_run, v_run in zip(range(0, rows, per_call), zip(starts, starts[1:]),
                                                q_runs, k_runs, v_runs):
        r1 = min(r0 + per_call, rows)
        where = pk.layout_index[a:b] - r0 * Tc                          # the fed tokens' slots in this run

        def layout(x):  # [b - a, heads, hd] -> this run's layout [r1 - r0, heads, Tc, hd]
            return heads_first(_scatter(x.new_zeros((r1 - r0) * Tc, x.shape[1], hd), where, x), r1 - r0)
        prompt_of = torch.arange(r0, r1, device=q.device) // Gmax
        keys = torch.cat([kp.index_select(0, prompt_of), layout(k_run)], dim=2)
        values = torch.cat([vp.index_select(0, prompt_of), layout(v_run)], dim=2)
        o = sdpa(layout(q_run), keys, values, completion_mask[r0:r1])
        out = _WriteRows.apply(out, o.transpose(1, 2).reshape(-1, H * hd).index_select(0, where),
                               n_prompt + a, n_prompt + b)
    return out


def llama_hidden(model, pk: PackedGroups, recompute_mlp: bool = False) -> Tensor:
    """Final hidden states [K, D] (after the last norm) at `pk.score_index`, for `hand_written`
    models: their embedding, norms, projections, rotary tables and MLPs; our attention.
    `recompute_mlp`: each MLP keeps two [M, I] tensors for the backward instead of four
    (`llama.mlp`), and where nothing of it is kept anyway (no grad, or under checkpointing) it runs
    `llama.ROWS` tokens at a time, so that no [M, I] tensor is ever made (`mlp_rows`)."""
    from .llama import ROWS, attention_shape, mlp, rope, rope_tables
    from .models import checkpointing_active
    base = unwrap(model).model
    H, Hkv, hd, scale = attention_shape(model)
    M = pk.input_ids.shape[0]
    cos, sin = rope_tables(model, base.embed_tokens.weight[:0], pk.position_ids)  # [M, 1, hd]

    def attention_block(layer, x):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        # q, k and v are made in the call, not named here: then they die when the attention
        # returns, before o_proj makes its [M, D] output (the rotated queries are [M, D] too,
        # and under checkpointing the recompute at the backward's peak would hold both).
        out = _llama_attention(rope(a.q_proj(h).view(M, H, hd), cos, sin),
                               rope(a.k_proj(h).view(M, Hkv, hd), cos, sin),
                               a.v_proj(h).view(M, Hkv, hd), pk, scale, per_call)
        return x + a.o_proj(out)

    def mlp_block(layer, x):  # row-wise: any rows of x give those rows of the result
        h = layer.post_attention_layernorm(x)
        return x + (mlp(layer.mlp, h) if recompute_mlp else layer.mlp(h))

    def decoder_layer(layer, x):
        return mlp_block(layer, attention_block(layer, x))

    checkpointed = checkpointing_active(model)

    def run(block, layer, x):  # checkpointed: keeps the block's input; the backward recomputes the rest
        return torch.utils.checkpoint.checkpoint(block, layer, x, use_reentrant=False) if checkpointed \
            else block(layer, x)

    def embedding_first(block):  # the block embeds the ids it is given, then runs
        return lambda layer, ids: block(layer, base.embed_tokens(ids))

    blocks = attention_block, decoder_layer
    # Checkpointed, the first checkpoint starts from the ids: the backward then looks the [M, D]
    # embedding up again instead of keeping it from the first layer's forward to the end.
    x = pk.input_ids if checkpointed else base.embed_tokens(pk.input_ids)  # [M] or [M, D]
    by_rows = recompute_mlp and (checkpointed or not torch.is_grad_enabled())
    per_call = max(1, ROWS // pk.Tc) if by_rows else None  # attention: `llama.ROWS` query tokens per call
    for i, layer in enumerate(base.layers):
        attention, decoder = [embedding_first(b) for b in blocks] if checkpointed and i == 0 else blocks
        if by_rows:
            x = mlp_rows(run, mlp_block, layer, run(attention, layer, x))
        else:
            x = run(decoder, layer, x)
    return base.norm(x.index_select(0, pk.score_index))


def mlp_rows(run, block, layer, x: Tensor) -> Tensor:
    """`run(block, layer, x)` for a row-wise block (norm, MLP, residual), `llama.ROWS` rows at a time.
    The MLP's [M, I] activations (I = 4,864 for Qwen2-0.5B: 5.4x the hidden width, and four of them
    in flight) are its largest tensors; a row chunk of them is all that exists at once. Without
    grad that is the whole story; under checkpointing each chunk is its own checkpoint (keeping
    only its input rows, which the caller keeps anyway), so the backward recomputes and
    differentiates one chunk at a time. The layer's checkpoint is then split in two, attention
    and MLP, which keeps the residual between them as well ([M, D], a fifth of one [M, I] tensor)
    and recomputes each part once, as one checkpoint would."""
    from .llama import ROWS
    if x.shape[0] <= ROWS:
        return run(block, layer, x)
    # Split, not sliced: the backward of each slice would be a whole-size tensor of zeros.
    return torch.cat([run(block, layer, rows) for rows in x.split(ROWS)])
