"""Mixture-of-experts models: the router's load-balancing loss, as the model itself defines it.

Mixtral, Qwen2-MoE and Qwen3-MoE route each token to `num_experts_per_tok` of `num_experts`
experts; without a penalty the router collapses onto a few of them. Their Hugging Face forward
adds `router_aux_loss_coef * aux_loss` to the language-modelling loss (Switch Transformer, Fedus
et al. 2021, eqs. 4-6: aux = E * sum_e f_e * P_e, f_e the fraction of token slots sent to expert e,
P_e its mean router probability), and TRL adds the same term to its trainers' losses
(`router_aux_loss_coef`). Here it is computed by the model's own `load_balancing_loss_func` over the
router logits of the scoring forward(s) of one micro-batch, counting each real token of those
forwards once (padding is not counted; a prompt run once for its group counts once).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from .models import unwrap


def _loss_func(model):
    base = unwrap(model)
    for cls in type(base).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if fn is not None:
            return fn
    return None


def is_moe(model) -> bool:
    """Whether the model routes tokens to experts and defines a load-balancing loss."""
    base = unwrap(model)
    return getattr(base, "num_experts_per_tok", None) is not None and _loss_func(model) is not None


class RouterLogits:
    """Inside the block, records the router logits [tokens, experts] of every MoE layer the model
    runs (hooks on the router modules named by the model's own `_can_record_outputs`, as
    `output_router_logits=True` would, without the model's forward computing its own aux loss:
    that one assumes the attention mask covers only the new tokens, which a KV-cache pass breaks).
    `logits`: one tensor per MoE layer, in call order."""

    def __init__(self, model):
        base = unwrap(model)
        spec = getattr(base, "_can_record_outputs", None) or {}
        spec = spec.get("router_logits")
        if spec is None:
            raise ValueError(f"router_aux_loss: {type(base).__name__} records no router logits")
        target = getattr(spec, "target_class", spec)
        self.index = getattr(spec, "index", 0)
        layer_name = getattr(spec, "layer_name", None)
        self.logits: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for n, m in base.named_modules()
                        if isinstance(m, target) and (layer_name is None or layer_name in n)]

    def _hook(self, module, args, output):
        self.logits.append(output[self.index] if isinstance(output, (tuple, list)) else output)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def load_balancing_loss(model, parts: list[tuple[tuple[Tensor, ...], Tensor]]) -> Tensor:
    """The model's router auxiliary loss over several forwards: `parts` holds, per forward, its
    router logits (one [tokens, experts] tensor per MoE layer, `RouterLogits.logits`) and a bool
    mask over those tokens (True: counted)."""
    if not is_moe(model):
        raise ValueError(f"router_aux_loss: {type(unwrap(model)).__name__} is not a mixture-of-experts model "
                         "with a load-balancing loss")
    base = unwrap(model)
    layers = len(parts[0][0])
    logits = tuple(torch.cat([p[0][i] for p in parts]) for i in range(layers))
    mask = torch.cat([p[1].reshape(-1) for p in parts])
    num_experts = getattr(base, "num_experts", None) or base.config.num_local_experts
    return _loss_func(model)(logits, num_experts, base.num_experts_per_tok, mask)
