"""Loading models and tokenizers, choosing device and precision, the optimizer and its schedule.

Shared by `grpo train`, `grpo sft` and the reward-model trainer so each makes these choices the
same way: fp32 on CPU (bf16 matmuls are very slow there), bf16 on CUDA, and in both cases float32
weights for whatever is trained (see `Precision`).
"""

from __future__ import annotations

import math
import os
import random

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    if name == "cuda":  # under torchrun each process takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Precision:
    """Mixed precision: trained weights stay float32, forward passes compute in `dtype`.

    Why not store the policy in bf16: AdamW moves a weight by about the learning rate per step
    (1e-6 in GRPO recipes), while bf16's spacing near a typical weight of 0.02 is ~1e-4 (8 bits of
    mantissa), so most weights would round back to where they were and training would silently
    stall. verl (FSDP mixed precision) and OpenRLHF (DeepSpeed bf16) keep fp32 master weights too.
    The compute runs under `torch.autocast` (matmuls in half precision; softmax, norms and the loss
    in fp32); float16 also scales the loss so small gradients do not underflow, bfloat16 needs no
    scaling. The reference is stored like the policy (so they agree exactly at step 0); frozen
    models used only for scoring or sampling (reward models) are stored in `dtype`.
    With dtype float32 both are no-ops.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.scaler.scale(torch.ones((), device=device))  # creates its scale now, not at the first backward

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer, parameters, max_grad_norm: float | None) -> torch.Tensor:
        """Unscale, clip and step; returns the gradient norm. A step whose gradient is not finite
        is skipped: the fp16 scaler then lowers its scale; in bf16/fp32 applying it would turn every
        weight it touches into NaN, and every later checkpoint with them."""
        parameters = [p for p in parameters if p.grad is not None]
        if not parameters:  # every token of the minibatch was masked out: nothing to unscale or apply
            optimizer.step()  # a no-op without gradients, kept so the schedule sees one optimizer step
            return torch.zeros(())
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)  # checks every gradient for inf/nan itself
            self.scaler.update()
        elif torch.isfinite(grad_norm):
            optimizer.step()
        return grad_norm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; EOS is safe because every mask excludes padding.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype, trainable: bool = True):
    """A trainable model is loaded in float32 whatever `dtype` is (master weights, see
    `Precision`); a frozen one in `dtype`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trainable else dtype)
    except OSError as e:
        raise RuntimeError(f"model: could not load {path!r} with AutoModelForCausalLM.from_pretrained: {e}") from None
    model.to(device)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    # Dropout would make pi_old differ from pi_theta at identical weights; GRPO implementations turn it off.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def make_scheduler(optimizer, cfg, total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0 or cosine decay to 0 at the last step."""
    warmup, total = cfg.warmup_steps, total_steps or cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
