"""Checkpoints of a sharded run (`grpo.runtime.sharding`), with `torch.distributed.checkpoint`.

`checkpoint-<step>/` holds, as `grpo.runs.checkpoint` does, `trainer_state.pt` (schedule, loss
scale, data position, every process's RNG streams, step) and the tokenizer, plus `sharded/`: the
model and the optimizer as each process's own shards (DCP's format: one file per process and a
`.metadata` index), written by all processes at once and never gathered. `list_checkpoints` and
`latest_checkpoint` find these directories as they find the others. Like every checkpoint it is
written to a temporary directory and renamed into place, so a crash while saving leaves nothing
that `--resume` would pick up. Every process must see the same output directory (one machine, or
a shared file system).

The final model is gathered instead: `save_gathered_pretrained` writes one ordinary
`save_pretrained` directory that plain `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from grpo.errors import ConfigError
from grpo.runtime.distributed import World

from .checkpoint import RUN_FILE, STATE_FILE, list_checkpoints, load_state, set_rng_state, write_failed

SHARDS_DIR = "sharded"


def _options(model, **kw):
    """A LoRA policy's shards hold the adapter only: its frozen base is what the run loads again
    from `model` (as an unsharded LoRA checkpoint holds the adapter only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from grpo.engine.adapters import is_peft
    return StateDictOptions(ignore_frozen_params=True, strict=False, **kw) if is_peft(model) else StateDictOptions(**kw)


def save_sharded_checkpoint(output_dir: Path, step: int, model, optimizer, tokenizer, state: dict, world: World,
                            keep: int = 0, run: dict | None = None) -> Path:
    """Every process calls this. `state` is `checkpoint.train_state(...)` (its "optimizer" entry,
    this process's shard only, is dropped: the optimizer is in the shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()  # nobody writes into the directory rank 0 is still clearing

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(model))
    failed = None
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / SHARDS_DIR))
        if world.main:
            model.config.save_pretrained(tmp)  # what the weights are, for whoever opens the directory
            tokenizer.save_pretrained(tmp)
            torch.save({**state, "optimizer": None}, tmp / STATE_FILE)
            if run is not None:
                (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
    except (OSError, RuntimeError, CheckpointException) as e:  # a full disk, on any process
        failed = e
    if world.any(failed is not None):  # every process stops together, none waits at a barrier
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(output_dir, step, f": {getattr(failed, 'strerror', None) or failed}" if failed
                           else " (on another process)")
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()  # every process returns once the checkpoint is complete
    return final


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / SHARDS_DIR).is_dir()


def restore_sharded_train_state(checkpoint: Path, policy, optimizer, scheduler, precision, sampler, generator,
                                rank: int) -> dict:
    """`checkpoint.restore_train_state` for a sharded checkpoint: every process loads its own
    shards of the weights and the optimizer, then the rest of the state; returns that state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = Path(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise ConfigError(f"fsdp: {checkpoint} holds no {SHARDS_DIR}/ directory (it was saved by a run without "
                          f"fsdp); resume it with fsdp: false")
    state = load_state(checkpoint)
    options = _options(policy)
    model_state, optimizer_state = get_state_dict(policy, optimizer, options=options)
    shards = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(shards, checkpoint_id=str(checkpoint / SHARDS_DIR))  # in place, into this process's shards
    loaded = set_state_dict(policy, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
                            options=options)
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    missing = sorted(trained & set(getattr(loaded, "missing_keys", ())))
    if missing:  # strict=False (the frozen base is not in the shards) must not pass over a trained weight
        raise ConfigError(f"--resume: {checkpoint} holds no {missing[0]} (and {len(missing) - 1} more trained weights)")
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        precision.scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"][rank], generator)
    return state


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on rank 0, on the CPU (every process calls this; the
    others get an empty dict, so only rank 0 holds a full copy). A LoRA policy's adapter only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(model, full_state_dict=True, cpu_offload=True))


def save_gathered_pretrained(model, tokenizer, directory: Path, world: World) -> None:
    """The sharded model as one Hugging Face directory (safetensors, config, generation config,
    tokenizer), written by rank 0. Every process calls this."""
    state = full_state_dict(model)
    if world.main:
        # Transformers writes the architecture without FSDP2's class prefix and drops tied copies.
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    world.barrier()
