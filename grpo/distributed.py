"""Multi-process training under `torchrun`, without wrapping the model.

Each process generates and scores its own prompts. Losses are divided by normalisers counted over
all processes, so summing gradients across processes gives exactly the single-process gradient of
the whole batch; that sum is the only communication the update needs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class World:
    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        # NCCL only moves CUDA tensors, and each process must own its GPU before the first
        # collective (all_gather_object uses the current device): `device` is where the
        # collectives run; sum/gather bring results back to the caller's device.
        self.device = torch.device("cpu")
        if self.size > 1 and torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.size > 1 and not dist.is_initialized():
            # Rank 0 evaluates and saves alone while the others wait in the next collective:
            # give that more than NCCL's default 10 minutes.
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(hours=1))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (returns it unchanged on one process)."""
        if self.size > 1:
            y = x.to(self.device, copy=True)
            dist.all_reduce(y)
            x = y.to(x.device)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every process, in rank order."""
        if self.size == 1:
            return x
        mine = x.to(self.device).contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine)
        return torch.cat(parts).to(x.device)

    def sum_gradients(self, model) -> None:
        if self.size == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        if not self.sum(torch.tensor(float(any(p.grad is not None for p in params)))).item():
            return  # every process's minibatch was entirely masked: nothing to sum or apply
        for p in params:
            if p.grad is None:  # this process's tokens were all masked, others' were not
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
