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
    def __init__(self, device: torch.device | None = None, distributed: bool = True):
        """`device`: where this process trains (grpo.engine.models.pick_device gives each process
        the GPU of its LOCAL_RANK). Collectives run there: NCCL between GPUs, gloo on CPU.
        `distributed=False`: one process whatever torchrun says (commands that do not shard work)."""
        self.size = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
        self.rank = int(os.environ.get("RANK", 0)) if distributed else 0
        self.device = torch.device("cpu") if device is None else device
        if self.size > 1 and self.device.type == "cuda":
            # Before the first collective: all_gather_object works on the current device.
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

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any of them (a collective every process joins)."""
        if self.size == 1:
            return bool(flag)
        return bool(self.sum(torch.tensor([float(flag)])).item() > 0)

    def average_floats(self, record: dict) -> dict:
        """The record with every float value averaged over processes (metrics of one step)."""
        if self.size == 1:
            return record
        # Processes may log different metrics (a reward function's log_metric on one of them): each
        # key is averaged over the processes that have it.
        keys = sorted({k for keys in self.gather_objects([k for k, v in record.items() if isinstance(v, float)])
                       for k in keys})
        mine = [(record[k], 1.0) if isinstance(record.get(k), float) else (0.0, 0.0) for k in keys]
        totals = self.sum(torch.tensor(mine, dtype=torch.float64).reshape(len(keys), 2))
        return {**record, **{k: s / n for k, (s, n) in zip(keys, totals.tolist())}}

    def gather_objects(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order; a collective every process joins."""
        if self.size == 1:
            return [obj]
        everyone = [None] * self.size
        dist.all_gather_object(everyone, obj)
        return everyone

    def sum_gradients(self, model, bucket_bytes: int = 25 * 2**20) -> None:
        """Sum every gradient over processes. A parameter that has a gradient on some process but
        not on this one (its tokens were all masked) joins with zeros; one that has none anywhere
        stays without, as on a single process (AdamW then leaves it alone).

        Gradients travel in flat buckets of about `bucket_bytes` (as DDP's do): one collective per
        parameter would pay its latency ~300 times per step for a 0.5B model."""
        if self.size == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        anywhere = self.sum(torch.tensor([float(p.grad is not None) for p in params])).tolist()
        grads = []
        for p, n in zip(params, anywhere):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        bucket, size = [], 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            last = i == len(grads) - 1
            if size >= bucket_bytes or last or grads[i + 1].dtype != g.dtype:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
