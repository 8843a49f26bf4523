"""What every command that runs a model sets up first, in one place: device, processes, seeds,
threads and precision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.engine.models import pick_device, pick_dtype

from .distributed import World
from .optim import seed_everything
from .precision import Precision


@dataclass
class RunSetup:
    device: torch.device
    precision: Precision     # the compute dtype and its autocast / loss scaling
    world: World             # this process among the torchrun processes (one without torchrun)
    out: Path | None         # the output directory of a training command

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype


def start_run(cfg, *, distributed: bool = False) -> RunSetup:
    """`distributed`: join the torchrun processes (only `grpo train` shards its work)."""
    device = pick_device(cfg.device)
    world = World(device, distributed=distributed)
    seed_everything(cfg.seed + world.rank)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir) if getattr(cfg, "output_dir", "") else None
    return RunSetup(device, Precision(device, pick_dtype(cfg.dtype, device)), world, out)
