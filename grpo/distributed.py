"""Multi-process training under `torchrun`, without wrapping the model.

Each process generates and scores its own prompts. Losses are divided by normalisers counted over
all processes, so summing gradients across processes gives exactly the single-process gradient of
the whole batch; that sum is the only communication the update needs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class World:
    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (returns it unchanged on one process)."""
        if self.size > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every process, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def sum_gradients(self, model) -> None:
        if self.size == 1:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
