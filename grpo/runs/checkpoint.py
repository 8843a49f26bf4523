"""Checkpoints: `checkpoint-<step>/` holds the model and tokenizer in Hugging Face format
(safetensors), `trainer_state.pt` with everything else a resumed run needs to continue exactly
(optimizer, scheduler, RNG states, data position, step) and `run.json`, what run it belongs to
(its config and the fingerprints of its data), which `--resume` checks.

A checkpoint is written to a temporary directory and renamed into place, so a crash while saving
never leaves a half-written `checkpoint-<step>` that `--resume` would pick up; a write that fails
(a full disk) removes the partial directory and says which checkpoint is the last good one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from grpo.engine.models import load_causal_lm
from grpo.errors import RunError

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


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, state: dict, keep: int = 0,
                    run: dict | None = None) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        if run is not None:
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
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
    # CPU first: optimizer.load_state_dict moves each state to its parameter's device, and the
    # file may come from a GPU this machine (or this rank) does not have.
    return torch.load(checkpoint / STATE_FILE, weights_only=False, map_location="cpu")


# ----------------------------------------------------------------------------------------------
# What `grpo train` keeps beside the weights, and how a resumed run gets it back.

def train_state(step: int, optimizer, scheduler, precision, sampler, config: dict, rng: list, rewards_state: list) -> dict:
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict(), "sampler": sampler.state_dict(), "config": config,
            "rng": rng, "reward_states": rewards_state}


def load_weights(checkpoint: Path, policy, model_init_kwargs: dict | None = None) -> None:
    """The checkpoint's weights into `policy`: the whole model, or a LoRA policy's adapter only
    (what its save_pretrained wrote)."""
    adapter = Path(checkpoint) / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(policy, load_file(str(adapter)))
        if getattr(result, "unexpected_keys", None):
            raise RunError(f"--resume: {checkpoint}'s adapter does not fit this model ({result.unexpected_keys[:3]} ...)")
        return
    policy.load_state_dict(load_causal_lm(str(checkpoint), torch.device("cpu"), torch.float32,
                                          model_init_kwargs=model_init_kwargs).state_dict())


def restore_train_state(checkpoint: Path, policy, optimizer, scheduler, precision, sampler, generator,
                        rank: int, model_init_kwargs: dict | None = None) -> dict:
    """Weights, optimizer, schedule, loss scale, data position and this process's RNG streams from
    `checkpoint`; returns its state (step, reward states, config)."""
    state = load_state(checkpoint)
    load_weights(checkpoint, policy, model_init_kwargs)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when the checkpoint was not float16
        precision.scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"][rank], generator)
    return state
