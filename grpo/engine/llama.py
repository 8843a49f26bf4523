"""What the engine's two hand-written Llama-style forwards share: which models they are exact
for, the attention shape, and one RoPE.

The group decoder (`decoders.GroupDecoder`, generation) and the packed forward (`packed`,
scoring and the update) both run the model's own submodules (norms, projections, MLP, rotary
embedding) and write only the attention around them; everything here is what they must agree on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models import unwrap

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
    heads, with sin's first half negated for `rope` (x [M, D] only supplies the dtype)."""
    cos, sin = unwrap(model).model.rotary_emb(x[None], position_ids.reshape(1, -1))
    cos, sin = cos[0, :, None], sin[0, :, None]
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE in Hugging Face's convention, x * cos + rotate_half(x) * sin, as one roll:
    rotate_half(x) * sin == roll(x, hd/2) * (sin with its first half negated), bit for bit
    (negation is exact). x [M, H, hd]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
