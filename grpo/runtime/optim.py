"""The optimizer, its learning-rate schedule, and seeding."""

from __future__ import annotations

import math
import random

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from grpo.config import LR_SCHEDULERS

from . import host_memory


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.optim` names (Hugging Face's names), weight decay on matrices only.

    adamw_torch (the default: the multi-tensor "foreach" kernels) and adamw_torch_fused (one fused
    kernel per parameter group, on CPU and CUDA alike; Hugging Face's default since torch 2.8, so
    TRL's too) are AdamW with adam_beta1/2 and adam_epsilon. Same update; fused makes no
    full-size temporaries (foreach's lerp/sqrt/div on whole lists of tensors hold ~1 copy of
    the parameters at once on CPU: bench/memory.py); adafactor is torch.optim.Adafactor (factored second moments,
    no first moment: much less optimizer memory); sgd is plain SGD, w <- w - lr * (g + wd * w)
    with no momentum; rmsprop is torch's RMSprop with adam_beta2 as its smoothing constant."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    name = cfg.optim
    if name in ("adamw_torch", "adamw_torch_fused"):
        fused = name == "adamw_torch_fused" and all(
            p.device.type in _get_fused_kernels_supported_devices() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, **({"fused": True} if fused else {}))
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.learning_rate)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate, alpha=cfg.adam_beta2,
                                   eps=cfg.adam_epsilon)
    raise ValueError(f"optim {name!r} is not one of adamw_torch, adamw_torch_fused, adafactor, sgd, rmsprop")


def before_first_step(optimizer, device: torch.device) -> None:
    """Called before each optimizer step; acts before the first only, which allocates AdamW's two
    moments (2 x 4 bytes per trainable parameter, 1.3 GB for a 166M model). On CPU, glibc keeps
    what the backward just freed (its many tensors below the mmap threshold) as heap memory
    of the process, so the moments would come on top of it; malloc_trim hands it back first.
    (CUDA's caching allocator reuses its own freed blocks: nothing to do there.)"""
    if optimizer.state or device.type != "cpu":
        return
    host_memory.trim()  # not glibc (macOS, musl): nothing to hand back this way


def warmup_steps(cfg, total_steps: int) -> int:
    """warmup_steps, or warmup_ratio of all optimizer steps rounded up (Hugging Face's rule)."""
    ratio = cfg.warmup_ratio
    return math.ceil(ratio * total_steps) if ratio else cfg.warmup_steps


def make_scheduler(optimizer, cfg, total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 at the last step."""
    total = total_steps or cfg.max_steps
    warmup = warmup_steps(cfg, total)
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {cfg.lr_scheduler!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
