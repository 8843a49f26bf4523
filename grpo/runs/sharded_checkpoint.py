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

DCP's own reader unpickles `sharded/.metadata` with plain `pickle.load`, which runs whatever a
crafted file carries; `--resume` reads it through `SafeReader` instead, whose unpickler builds
only DCP's metadata classes, paths, sizes, dtypes and layouts. A damaged or refused metadata
file or shard is one RunError naming it, on every process.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from grpo.errors import ConfigError, GrpoError, RunError
from grpo.runtime.distributed import World

from .checkpoint import (RUN_FILE, STATE_FILE, NotStorable, cause_of, list_checkpoints, load_state,
                         restore_schedule_and_position, restoring, storable, write_failed)

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
            torch.save(storable({**state, "optimizer": None}, "the trainer state"), tmp / STATE_FILE)
            if run is not None:
                (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
    except (OSError, RuntimeError, CheckpointException, NotStorable) as e:  # a full disk, on any process
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


class _MetadataUnpickler(pickle.Unpickler):
    """What DCP's `.metadata` pickle is made of, and nothing else: its metadata dataclasses and
    enums, the storage records of its file system writer, paths, sizes, dtypes and layouts. Any
    other global (a function a crafted file would call) is refused, so it is never called."""

    PATHS = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}

    def find_class(self, module: str, name: str):
        if "." not in name and self._allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of a checkpoint's metadata")

    def _allowed(self, module: str, name: str) -> bool:
        if module == "torch.distributed.checkpoint.metadata":  # its own classes only, not what it imports
            import torch.distributed.checkpoint.metadata as metadata
            found = getattr(metadata, name, None)
            return isinstance(found, type) and found.__module__ == module
        if module in ("pathlib", "pathlib._local"):
            return name in self.PATHS
        if module == "torch" and name != "Size":
            return isinstance(getattr(torch, name, None), torch.dtype)
        return (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                  ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


def _safe_reader(path: Path):
    """DCP's file system reader, with `.metadata` read by `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            file = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(file, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # damaged, cut short, or refused: nothing in it ran
                raise RunError(f"--resume: {file} is not a readable checkpoint index ({cause_of(e)}); resume from an "
                               f"earlier checkpoint (move this one away) or start a fresh run") from None
            if not isinstance(metadata, Metadata):
                raise RunError(f"--resume: {file} is not a checkpoint index (it holds a {type(metadata).__name__})")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _load_shards(shards: dict, checkpoint: Path) -> None:
    """`dcp.load` of the checkpoint's shards, in place; what any process failed on is one RunError
    on every process (DCP gathers the failures), naming the directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    directory = checkpoint / SHARDS_DIR

    def unreadable(e: BaseException) -> RunError:
        return RunError(f"--resume: the shards in {directory} cannot be read ({cause_of(e)}); they are probably "
                        f"truncated or damaged: resume from an earlier checkpoint (move this one away) or start a "
                        f"fresh run")

    try:
        dcp.load(shards, storage_reader=_safe_reader(directory))
    except CheckpointException as e:
        failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        ours = next((f for f in failures if isinstance(f, GrpoError)), None)
        if ours is not None:
            raise RunError(str(ours)) from None
        raise unreadable(failures[0] if failures else e) from None
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
        if isinstance(e, GrpoError):
            raise
        raise unreadable(e) from None


def restore_sharded_train_state(checkpoint: Path, policy, optimizer, scheduler, precision, sampler, generator,
                                rank: int) -> dict:
    """`checkpoint.restore_train_state` for a sharded checkpoint: every process loads its own
    shards of the weights and the optimizer, then the rest of the state; returns that state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = Path(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise ConfigError(f"fsdp: {checkpoint} holds no {SHARDS_DIR}/ directory (it was saved by a run without "
                          f"fsdp); resume it with fsdp: false")
    state = load_state(checkpoint)
    options = _options(policy)
    model_state, optimizer_state = get_state_dict(policy, optimizer, options=options)
    shards = {"model": model_state, "optimizer": optimizer_state}
    _load_shards(shards, checkpoint)  # in place, into this process's shards
    with restoring(checkpoint, "sharded weights and optimizer"):
        loaded = set_state_dict(policy, optimizer, model_state_dict=shards["model"],
                                optim_state_dict=shards["optimizer"], options=options)
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    missing = sorted(trained & set(getattr(loaded, "missing_keys", ())))
    if missing:  # strict=False (the frozen base is not in the shards) must not pass over a trained weight
        raise ConfigError(f"--resume: {checkpoint} holds no {missing[0]} (and {len(missing) - 1} more trained weights)")
    restore_schedule_and_position(checkpoint, state, scheduler, precision, sampler, generator, rank)
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
