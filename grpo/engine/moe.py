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


def load_balancing_loss(model, parts: list[tuple[tuple[Tensor, ...], Tensor]]) -> Tensor:
    """The model's router auxiliary loss over several forwards: `parts` holds, per forward, its
    `output.router_logits` (one [tokens, experts] tensor per MoE layer) and a bool mask over
    those tokens (True: counted)."""
    if not is_moe(model):
        raise ValueError(f"router_aux_loss: {type(unwrap(model)).__name__} is not a mixture-of-experts model "
                         "with a load-balancing loss")
    base = unwrap(model)
    layers = len(parts[0][0])
    logits = tuple(torch.cat([p[0][i] for p in parts]) for i in range(layers))
    mask = torch.cat([p[1].reshape(-1) for p in parts])
    num_experts = getattr(base, "num_experts", None) or base.config.num_local_experts
    return _loss_func(model)(logits, num_experts, base.num_experts_per_tok, mask)
