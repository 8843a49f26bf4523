"""`fsdp: true`: parameters, gradients and optimizer state sharded across the torchrun processes
with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each decoder layer is one FSDP unit, the root (embeddings, final norm, LM head) another, as
FSDP2's own examples and TorchTitan cut a transformer: a forward through `model(...)` all-gathers
one layer at a time and frees it after (the root stays gathered from forward to backward), and
its backward reduce-scatters each layer's gradient as soon as it is complete. Every process then
holds 1/world of the float32 master weights, of their gradients and of the AdamW moments that
`make_optimizer` builds on the sharded parameters.

Gradients are *summed* across processes, not averaged: every loss is already divided by counts
over the whole batch on all processes (`grpo.runtime.distributed`), so the sum is the gradient of
the whole batch, exactly what `World.sum_gradients` gives without sharding. FSDP2 averages by
default; a divide factor of 1 with sum-only collectives turns that into a plain sum.

Mixed precision is FSDP2's own `MixedPrecisionPolicy`: the gathered parameters are cast to the
run's compute dtype (bf16 on CUDA), gradients are reduced in float32, and the sharded master
weights stay float32 (`grpo.runtime.precision` gives the reason).

The engine's fast paths call submodules directly (`decoders.GroupDecoder`, `packed`), which
FSDP's forward hooks never see. `gathered` unshards the whole model once for a rollout; inside
it no forward communicates, which is also what lets processes generate different numbers of
tokens (with per-layer all-gathers, every process would have to run the same number of forward
calls, or the collectives mismatch: the run hangs, or pairs up unrelated collectives).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from grpo.engine.models import is_sharded
from grpo.errors import ConfigError

from .distributed import World


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class Hugging Face lists in
    `_no_split_modules` (the units its own device-map and FSDP integrations never cut)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"fsdp: {type(model).__name__} names no decoder layer class in _no_split_modules "
                          f"({sorted(names)}); it cannot be sharded layer by layer")
    return layers


def shard_model(model: nn.Module, world: World, dtype: torch.dtype) -> nn.Module:
    """Shard `model` (float32 weights, on the CPU or on this process's device) in place across
    the processes of `world`: each decoder layer, then the root. `dtype` is the compute dtype.

    Works for trained and frozen models alike (the reference is sharded the same way, so that
    policy and reference still agree bit for bit at step 0). Returns the model, now an
    `FSDPModule` whose parameters are DTensors; build the optimizer after this call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if world.size < 2:
        raise ConfigError("fsdp: sharding needs two or more processes, and this is one (WORLD_SIZE unset or 1): "
                          "start it with `torchrun --nproc-per-node N -m grpo train ...`, or set fsdp: false")
    if dtype == torch.float16:
        # torch.amp.GradScaler decides on inf/NaN from this process's gradient shard alone, so
        # processes could disagree on skipping a step; bfloat16 needs no loss scaling.
        raise ConfigError("fsdp: dtype float16 is not supported with sharding (use bfloat16)")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ConfigError("fsdp: the model to shard must hold float32 weights (master weights)")
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                  reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=_reshard_after_forward(model, model))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)           # sum, not average (module docstring)
            module.set_force_sum_reduction_for_comms(True)   # ReduceOp.SUM, no PREMUL_SUM (gloo has none)
    return model


def _reshard_after_forward(unit: nn.Module, root: nn.Module) -> bool:
    """Layers free their gathered weights after each forward. A trained root (embeddings, LM
    head: used first in forward, last in backward) keeps them until its backward, as FSDP2 does
    by default, and so does a LoRA policy's frozen root: the chunked LM head runs on its weights
    after the model's forward has returned (`root.parameters()` counts the layers' adapters, so
    a LoRA policy's root counts as trained). The reference, with nothing trainable, has no
    backward to wait for, and is scored whole (`gathered`)."""
    return unit is not root or not any(p.requires_grad for p in root.parameters())


@contextlib.contextmanager
def gathered(*models):
    """Every FSDP unit of `models` (None and unsharded models are skipped) unsharded for the
    duration: all-gathered once on entry, freed on exit. Inside, the models' parameters are
    ordinary full tensors (in the compute dtype), any code may call any submodule, and no forward
    communicates. Every process must enter and leave together (the all-gathers are collectives).

    Costs one full copy of each model in the compute dtype for as long as it lasts: for a rollout
    (generation, pi_old and pi_ref passes, evaluation), not for the update, whose backward must
    run through FSDP's hooks to reduce-scatter the gradients. The body runs without grad: a
    gradient computed inside would land on the gathered copies and vanish when they are freed."""
    from torch.distributed.fsdp import FSDPModule

    roots = [m for m in models if m is not None and is_sharded(m)]
    units = [(root, u) for root in roots for u in root.modules() if isinstance(u, FSDPModule)]
    for _, unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    handles = [unit.unshard(async_op=True) for _, unit in units]
    for handle in handles:
        handle.wait()
    try:
        with torch.no_grad():
            yield
    finally:
        for root, unit in units:
            unit.set_reshard_after_forward(_reshard_after_forward(unit, root), recurse=False)
            unit.reshard()


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds for the model's parameters, their gradients and the optimizer's
    state (its own shard of each when sharded; everything otherwise). Counted from the tensors."""
    def nbytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    out = {"parameters": sum(nbytes(p) for p in params),
           "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(nbytes(v) for state in optimizer.state.values() for v in state.values()
                               if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out
