"""Checkpoints: `checkpoint-<step>/` holds the model and tokenizer in Hugging Face format
(safetensors), `trainer_state.pt` with everything else a resumed run needs to continue exactly
(optimizer, scheduler, RNG states, data position, step) and `run.json`, what run it belongs to
(its config and the fingerprints of its data), which `--resume` checks.

A checkpoint is written to a temporary directory and renamed into place, so a crash while saving
never leaves a half-written `checkpoint-<step>` that `--resume` would pick up; a write that fails
(a full disk) removes the partial directory and says which checkpoint is the last good one.

A checkpoint is also an input: it may come from someone else, or be cut short or damaged on disk.
`trainer_state.pt` is read with torch's safe unpickler only (`weights_only=True`: tensors and plain
containers, never an arbitrary object, so a crafted file cannot run code), and it is written so
that it always passes it (`storable`: numbers, strings, tensors, lists and dicts). A state file
that is not readable so, a state that does not fit the run, or a weights file cut short is one
RunError naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

from grpo.engine.models import _safetensors_problem, load_causal_lm
from grpo.errors import GrpoError, ModelError, RunError

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"


def rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(directory: Path, model, tokenizer) -> None:
    """The model and tokenizer as a Hugging Face directory; a failed write names the directory."""
    try:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    except OSError as e:
        last = latest_checkpoint(directory)
        raise RunError(f"could not save the model to {directory}: {e.strerror or e}"
                       + (f"; the last complete checkpoint is {last}" if last else "")) from None


class NotStorable(Exception):
    """A value of the trainer state that torch's safe unpickler would refuse (see `storable`)."""


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)


def storable(value, where: str = "state"):
    """`value` as what `torch.load(weights_only=True)` reads back: tensors, numbers, strings, None,
    torch sizes, dtypes and devices, in dicts (ordered ones too, with a state_dict's versions),
    lists, tuples and sets. NumPy values (a user reward's running statistics, say) become tensors
    or Python numbers; another dict subclass or a named tuple becomes the plain container.
    Anything else would make a checkpoint that cannot be resumed, so it is refused now, naming
    where it is (NotStorable)."""
    if isinstance(value, torch.Tensor) or type(value) in _ATOMS:
        return value
    if isinstance(value, dict):
        ordered = isinstance(value, OrderedDict)
        out = OrderedDict() if ordered else {}
        for k, v in value.items():
            if type(k) not in _ATOMS:
                raise NotStorable(f"{where} has a key of type {type(k).__name__}")
            out[k] = storable(v, f"{where}[{k!r}]")
        if ordered and getattr(value, "_metadata", None) is not None:
            # A module's state_dict carries its modules' versions there, which load_state_dict reads.
            out._metadata = storable(value._metadata, f"{where}._metadata")
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [storable(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, list):
            return items
        return set(items) if isinstance(value, (set, frozenset)) else tuple(items)
    if type(value).__module__.split(".")[0] == "numpy":
        import numpy as np
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray) and value.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(value).copy())
    for plain in (int, float, str):  # a subclass (an IntEnum, say) is pickled as its class
        if isinstance(value, plain):
            return plain(value)
    raise NotStorable(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
                      f"cannot hold safely (state_dict() must return tensors, numbers, strings, lists and dicts)")


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, state: dict, keep: int = 0,
                    run: dict | None = None) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state = storable(state, "the trainer state")  # before anything is written
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        if run is not None:
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
    except (OSError, RuntimeError, NotStorable) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(output_dir, step, f": {getattr(e, 'strerror', None) or e}") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def write_failed(output_dir: Path, step: int, cause: str) -> RunError:
    """The one line a checkpoint that could not be written stops the run with."""
    last = latest_checkpoint(output_dir)
    return RunError(f"could not write checkpoint-{step} in {output_dir}{cause}; "
                    + (f"the last complete checkpoint is {last.name}" if last else "no checkpoint was saved"))


def load_state(checkpoint: Path) -> dict:
    """`trainer_state.pt` of `checkpoint`, read with torch's safe unpickler only and checked to
    be the dict grpo writes; a file that is missing, damaged, foreign or refused is one RunError
    naming it. Never retried with `weights_only=False`: that would run whatever a crafted pickle
    carries."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise RunError(f"--resume: {path} is missing, so {checkpoint} is not a complete checkpoint; resume from "
                       f"an earlier one (move this one away) or start a fresh run")
    try:
        # CPU first: optimizer.load_state_dict moves each state to its parameter's device, and the
        # file may come from a GPU this machine (or this rank) does not have.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # whatever a damaged or foreign file makes the reader raise; nothing in it ran
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise RunError(f"--resume: {path} holds a Python object ({refused.group(1)}) that torch's safe loader "
                           f"(weights_only=True) refuses: the checkpoint is from an older grpo, or was not written "
                           f"by grpo, and cannot be loaded safely (unpickling it fully could run any code it "
                           f"carries); start a fresh run, or resume from a checkpoint this grpo wrote") from None
        raise RunError(f"--resume: {path} is not a readable trainer state ({cause_of(e)}); "
                       f"it is probably truncated or damaged: resume from an earlier checkpoint (move this one "
                       f"away) or start a fresh run") from None
    _check_state(state, path)
    return state


def cause_of(e: BaseException) -> str:
    """An exception in one line: its type, and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _check_state(state, path: Path) -> None:
    """The shape of what `train_state` writes, so that a damaged or foreign state is named here
    rather than failing later, deep inside a load_state_dict or at the first step."""
    def wrong(what: str) -> RunError:
        return RunError(f"--resume: {path} is not a trainer state grpo wrote: {what}; resume from an earlier "
                        f"checkpoint (move this one away) or start a fresh run")

    if not isinstance(state, dict):
        raise wrong(f"it holds a {type(state).__name__}, not a dict")
    kinds = {"step": int, "optimizer": (dict, type(None)), "scheduler": dict, "sampler": dict, "rng": list}
    for key, kind in kinds.items():
        if key not in state:
            raise wrong(f"it has no {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise wrong(f"its {key!r} is a {type(state[key]).__name__}")
    optional = {"scaler": dict, "reward_states": (list, dict), "reference": dict, "iterative": dict, "best": dict}
    for key, kind in optional.items():
        if state.get(key) is not None and not isinstance(state[key], kind):
            raise wrong(f"its {key!r} is a {type(state[key]).__name__}")
    if state["step"] < 0:
        raise wrong(f"its step is {state['step']}")
    sampler = state["sampler"]
    if not all(isinstance(sampler.get(k), int) and not isinstance(sampler.get(k), bool) and sampler[k] >= 0
               for k in ("epoch", "index")):
        raise wrong("its sampler position is not two counts (epoch, index)")
    if not state["rng"] or not all(isinstance(r, dict) and {"python", "torch", "generator"} <= set(r)
                                   for r in state["rng"]):
        raise wrong("its RNG states are not one dict of streams per process")


@contextlib.contextmanager
def restoring(checkpoint: Path, what: str):
    """Around one load_state_dict of a resume: a state that does not fit this run (another
    optimizer, a damaged entry) is one RunError naming the file and the part."""
    try:
        yield
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        if isinstance(e, GrpoError):
            raise
        raise RunError(f"--resume: {Path(checkpoint) / STATE_FILE}: its {what} does not fit this run "
                       f"({cause_of(e)}); resume from an earlier checkpoint (move this one away) or start a "
                       f"fresh run") from None


def restore_rng(state: dict, generator: torch.Generator, rank: int, checkpoint: Path) -> None:
    """This process's RNG streams. A process the checkpoint has none for (the run saved from
    fewer processes) keeps the streams it was seeded with."""
    if rank < len(state["rng"]):
        with restoring(checkpoint, "RNG state"):
            set_rng_state(state["rng"][rank], generator)


# ----------------------------------------------------------------------------------------------
# What `grpo train` keeps beside the weights, and how a resumed run gets it back.

def train_state(step: int, optimizer, scheduler, precision, sampler, config: dict, rng: list,
                rewards_state: list) -> dict:
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict(), "sampler": sampler.state_dict(), "config": config,
            "rng": rng, "reward_states": rewards_state}


def load_weights(checkpoint: Path, policy, model_init_kwargs: dict | None = None) -> None:
    """The checkpoint's weights into `policy`: the whole model, or a LoRA policy's adapter only
    (what its save_pretrained wrote). A weights file cut short, or weights that do not fit the
    policy, is one RunError naming the file."""
    checkpoint = Path(checkpoint)
    for file in sorted(checkpoint.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            raise RunError(f"{file} is not a valid safetensors file: {problem}; it is probably truncated (a crash, a "
                           f"full disk or an interrupted copy), so {checkpoint} cannot be loaded")
    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            result = set_peft_model_state_dict(policy, load_file(str(adapter)))
        except Exception as e:  # SafetensorError (a damaged file) or RuntimeError (shapes that do not fit)
            if not (type(e).__name__ == "SafetensorError" or isinstance(e, (RuntimeError, ValueError, KeyError))):
                raise
            raise RunError(f"{adapter} cannot be loaded into this run's adapter: {cause_of(e)}") from None
        if getattr(result, "unexpected_keys", None):
            raise RunError(f"--resume: {checkpoint}'s adapter does not fit this model "
                           f"({result.unexpected_keys[:3]} ...)")
        return
    try:
        weights = load_causal_lm(str(checkpoint), torch.device("cpu"), torch.float32,
                                 model_init_kwargs=model_init_kwargs).state_dict()
    except ModelError as e:  # no weights, or a config.json that is not one
        raise RunError(f"{checkpoint} holds no loadable model: {e}") from None
    try:
        policy.load_state_dict(weights)
    except RuntimeError as e:  # missing keys or other shapes
        raise RunError(f"{checkpoint}'s weights do not fit this run's model: {cause_of(e)}") from None


def restore_train_state(checkpoint: Path, policy, optimizer, scheduler, precision, sampler, generator,
                        rank: int, model_init_kwargs: dict | None = None) -> dict:
    """Weights, optimizer, schedule, loss scale, data position and this process's RNG streams from
    `checkpoint`; returns its state (step, reward states, config)."""
    state = load_state(checkpoint)
    load_weights(checkpoint, policy, model_init_kwargs)
    if state["optimizer"] is None:
        raise RunError(f"--resume: {Path(checkpoint) / STATE_FILE} holds no optimizer state (only a sharded "
                       f"checkpoint keeps it elsewhere, in its shards)")
    with restoring(checkpoint, "optimizer state"):
        optimizer.load_state_dict(state["optimizer"])
    restore_schedule_and_position(checkpoint, state, scheduler, precision, sampler, generator, rank)
    return state


def restore_schedule_and_position(checkpoint: Path, state: dict, scheduler, precision, sampler, generator,
                                  rank: int) -> None:
    """What every checkpoint, plain or sharded, restores after the weights and the optimizer: the
    learning-rate schedule, the loss scale, the data position and this process's RNG streams."""
    with restoring(checkpoint, "learning-rate schedule"):
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when the checkpoint was not float16
        with restoring(checkpoint, "loss scale"):
            precision.scaler.load_state_dict(state["scaler"])
    with restoring(checkpoint, "data position"):
        sampler.load_state_dict(state["sampler"])
    restore_rng(state, generator, rank, checkpoint)
