"""What the engine's two hand-written Llama-style forwards share: which models they are exact
for, the attention shape, and one RoPE.

The group decoder (`decoders.GroupDecoder`, generation) and the packed forward (`packed`,
scoring and the update) both run the model's own submodules (norms, projections, MLP, rotary
embedding) and write only the attention around them; everything here is what they must agree on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models import accumulate_matmul, cast, compute_dtype, unwrap

_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def supported(model, max_positions: int | None = None) -> bool:
    """Whether the hand-written Llama-style forwards compute exactly what this model's own
    forward does. A PEFT-wrapped model is judged by the model under the wrapper (its adapted
    Linear layers are called like the plain ones). A sliding window is harmless when it is at
    least `max_positions` long (the number of positions the caller will use): every key is then
    inside every query's window."""
    model = unwrap(model)
    cfg = model.config
    if type(model).__name__ not in _ARCHS:
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and (max_positions is None or window < max_positions):
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if model.training and getattr(cfg, "attention_dropout", 0.0):
        return False  # attention dropout is not implemented here
    layer = model.model.layers[0]
    attn = layer.self_attn
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
        not hasattr(attn, "q_norm") and all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


def attention_shape(model) -> tuple[int, int, int, float]:
    """(query heads, key/value heads, head size, softmax scale) of a supported model."""
    model = unwrap(model)
    cfg = model.config
    H = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return H, Hkv, hd, getattr(model.model.layers[0].self_attn, "scaling", hd ** -0.5)


def rope_tables(model, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The model's own rotary cos/sin at `position_ids`, shaped [M, 1, hd] to broadcast over
    heads, with sin's first half negated for `rope` (x, any tensor of the hidden states' dtype and
    device, e.g. zero rows of the embedding, only supplies those)."""
    cos, sin = unwrap(model).model.rotary_emb(x[None], position_ids.reshape(1, -1))
    cos, sin = cos[0, :, None], sin[0, :, None]
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope_table(model, x: Tensor, positions: int) -> tuple[Tensor, Tensor] | None:
    """`rope_tables` at positions 0..positions-1, computed once, for a decode loop to index
    (`cos[position]`): every entry is an elementwise function of its own position, so the table's
    rows are bit for bit what a call at that position returns. None for a RoPE whose tables depend
    on the positions asked together (dynamic scaling rescales by the longest)."""
    if getattr(unwrap(model).model.rotary_emb, "rope_type", "default") != "default":
        return None
    return rope_tables(model, x, torch.arange(positions, device=x.device))


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def rms_norm(norm, dtype: torch.dtype | None):
    """The model's RMSNorm module as a function of hidden states of `dtype` (None: not known, as
    under autocast): torch's fused
    `rms_norm` (one op where the module makes seven) when that is bit-exact, for float32 states and
    weights, where it computes the module's x * rsqrt(mean(x^2) + eps) * w in the same order; the
    module itself otherwise (its float32 detour and cast back round a lower precision elsewhere)."""
    if type(norm).__name__ in _RMS_NORMS and dtype == torch.float32 and norm.weight.dtype == torch.float32:
        shape, weight, eps = (norm.weight.shape[-1],), norm.weight, norm.variance_epsilon
        return lambda x: torch.nn.functional.rms_norm(x, shape, weight, eps)
    return norm


def hooked(module) -> bool:
    """Whether calling `module` runs forward hooks (its own or global ones) besides its forward."""
    from torch.nn.modules import module as nn_module
    return bool(module._forward_hooks or module._forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


def linear(module):
    """A projection as a function: `F.linear` on its weight and bias when it is a plain Linear
    with no hooks (a decode step calls a dozen of them on a few rows, where the module call's own
    overhead is a visible share of each), the module itself otherwise (a LoRA or quantized layer,
    or one whose hooks must run)."""
    if type(module) is torch.nn.Linear and not hooked(module):
        weight, bias = module.weight, module.bias
        return lambda x: torch.nn.functional.linear(x, weight, bias)
    return module


def swiglu(module):
    """A supported model's MLP, down(silu(gate(x)) * up(x)), as a function of its projections
    (`linear`): what its forward computes, in the same order."""
    if hooked(module):
        return module
    gate, up, down = linear(module.gate_proj), linear(module.up_proj), linear(module.down_proj)
    return lambda x: down(torch.nn.functional.silu(gate(x)) * up(x))


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE in Hugging Face's convention, x * cos + rotate_half(x) * sin, as one roll:
    rotate_half(x) * sin == roll(x, hd/2) * (sin with its first half negated), bit for bit
    (negation is exact). x [M, H, hd]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# ----------------------------------------------------------------------------------------------
# The MLP, down(silu(gate(x)) * up(x)), with its backward written out. Through autograd the
# backward keeps gate(x), up(x), silu(gate(x)) and their product (the down projection's input),
# 4 x I floats per token per layer and most of a Llama-style layer's activations, and makes
# whole-batch [M, I] temporaries for each of their gradients. silu and the product are cheap to
# recompute, so only gate(x) and up(x) are kept (as Liger-Kernel's SwiGLU does on GPUs), and the
# backward runs ROWS tokens at a time, accumulating the weight gradients in place. Same values
# and gradients (tests/test_fastpaths.py); at Qwen2-0.5B's width 4 x 4,864 kept floats per token
# and layer become 2 x 4,864 (bench/memory.py).

ROWS = 1024


class _SwiGLU(torch.autograd.Function):
    """linear(silu(a) * b, Wd, bd), a = linear(x, Wg, bg), b = linear(x, Wu, bu), for x [M, D];
    saves x, a and b. With s = sigmoid(a): d silu(a) / da = s (1 + a (1 - s))."""

    @staticmethod
    def forward(ctx, x, wg, bg, wu, bu, wd, bd):
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        a = torch.nn.functional.linear(xc, wg.to(dtype), cast(bg, dtype))
        b = torch.nn.functional.linear(xc, wu.to(dtype), cast(bu, dtype))
        w, bias = wd.to(dtype), cast(bd, dtype)
        out = a.new_empty(x.shape[0], wd.shape[0])
        for r in range(0, x.shape[0], ROWS):
            out[r:r + ROWS] = torch.nn.functional.linear(torch.nn.functional.silu(a[r:r + ROWS]) * b[r:r + ROWS],
                                                         w, bias)
        ctx.save_for_backward(x, a, b, wg, bg, wu, bu, wd, bd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, a, b, wg, bg, wu, bu, wd, bd = ctx.saved_tensors
        dtype = a.dtype
        need = ctx.needs_input_grad
        wg_c, wu_c, wd_c = wg.to(dtype), wu.to(dtype), wd.to(dtype)
        d_x = torch.empty_like(x) if need[0] else None
        # Keyed by the forward's argument positions: 1 wg, 2 bg, 3 wu, 4 bu, 5 wd, 6 bd.
        grads = {i: torch.zeros_like(t) for i, t in enumerate((wg, bg, wu, bu, wd, bd), start=1)
                 if t is not None and need[i]}
        for r in range(0, x.shape[0], ROWS):
            rows = slice(r, r + ROWS)
            gc, ac, bc = g[rows].to(dtype), a[rows], b[rows]
            s = torch.sigmoid(ac)
            silu = ac * s
            if 5 in grads:
                accumulate_matmul(grads[5], gc.T, silu * bc)
            if 6 in grads:
                grads[6].add_(gc.sum(0))
            d_p = gc @ wd_c
            d_b = silu.mul_(d_p)                                          # d up(x) = d_p * silu(a)
            d_a = d_p.mul_(bc).mul_(s.mul_(s.neg().add_(1).mul_(ac).add_(1)))  # d_p * b * s (1 + a (1 - s))
            if d_x is not None:
                d_x[rows] = torch.addmm(d_a @ wg_c, d_b, wu_c)
            xc = x[rows].to(dtype)
            for i, d in ((1, d_a), (3, d_b)):
                if i in grads:
                    accumulate_matmul(grads[i], d.T, xc)
                if i + 1 in grads:
                    grads[i + 1].add_(d.sum(0))
        return (d_x, *(grads.get(i) for i in range(1, 7)))


class _SiluMul(torch.autograd.Function):
    """silu(a) * b, saving a and b: for projections that are not plain Linear layers (LoRA's).
    Forward and backward ROWS tokens at a time, in place where they can: no whole-batch
    temporaries besides the results."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        out = torch.empty_like(a)
        for r in range(0, a.shape[0], ROWS):
            torch.mul(torch.nn.functional.silu(a[r:r + ROWS]), b[r:r + ROWS], out=out[r:r + ROWS])
        return out

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        d_a, d_b = torch.empty_like(a), torch.empty_like(b)
        for r in range(0, a.shape[0], ROWS):
            rows = slice(r, r + ROWS)
            ac, gc = a[rows], g[rows].to(a.dtype)
            s = torch.sigmoid(ac)
            torch.mul(ac * s, gc, out=d_b[rows])                                  # g * silu(a)
            torch.mul(s.mul_(s.neg().add_(1).mul_(ac).add_(1)).mul_(gc), b[rows], out=d_a[rows])
        return d_a, d_b


def mlp(module, x: Tensor) -> Tensor:
    """A supported model's MLP `module` on x [M, D]: the value and gradients of `module(x)`."""
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    if all(type(m) is torch.nn.Linear for m in (gate, up, down)):
        return _SwiGLU.apply(x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias)
    return down(_SiluMul.apply(gate(x), up(x)))
