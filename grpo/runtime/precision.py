"""Mixed precision with float32 master weights, for every command that trains."""

from __future__ import annotations

import torch


class Precision:
    """Mixed precision: trained weights stay float32, forward passes compute in `dtype`.

    Why not store the policy in bf16: AdamW moves a weight by about the learning rate per step
    (1e-6 in GRPO recipes), while bf16's spacing near a typical weight of 0.02 is ~1e-4 (8 bits of
    mantissa), so most weights would round back to where they were and training would silently
    stall. verl (FSDP mixed precision) and OpenRLHF (DeepSpeed bf16) keep fp32 master weights too.
    The compute runs under `torch.autocast` (matmuls in half precision; softmax, norms and the loss
    in fp32); float16 also scales the loss so small gradients do not underflow, bfloat16 needs no
    scaling. The reference is stored like the policy (so they agree exactly at step 0); frozen
    models used only for scoring or sampling (reward models) are stored in `dtype`, and so is a
    LoRA policy's frozen base (its adapter, the trained part, stays float32).
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
