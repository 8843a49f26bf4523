"""The output directory of a training command: what a run may write there, and what it may not.

A user's work is never overwritten unasked:
- a fresh run refuses a directory that holds anything, unless told `--overwrite` (then the
  directory is emptied, after every check has passed, and never when an input of the run lives
  in it);
- `--resume` refuses a directory with no checkpoint to resume, and a checkpoint whose run differs
  from this one in anything that changes the run (config keys, the data), unless told
  `--allow-changes`, which prints the difference;
- no run writes into the directory of its input model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from grpo.errors import RunError

from .checkpoint import RUN_FILE, list_checkpoints

# Keys a resumed run may change without becoming another run: how long it goes on, what it
# logs and saves, how it is spread over memory and threads (micro_batch_size changes memory, never
# the gradient). Everything else is part of what the checkpoint's run is.
RESUME_FREE_KEYS = frozenset({
    "max_steps", "logging_steps", "save_steps", "save_total_limit", "save_on_interrupt", "eval_steps",
    "eval_max_prompts", "eval_batch_size", "samples_steps", "num_samples", "report_to", "wandb_project",
    "num_threads", "micro_batch_size", "reward_timeout", "output_dir",
})


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def check_output_dir(out: Path, *, inputs: dict[str, str], resume: bool, overwrite: bool) -> Path | None:
    """Before anything is loaded: refuse what would lose or mix up work; returns the checkpoint
    to resume (None for a fresh run). `inputs` names the run's input paths by key (model,
    dataset, ...), to keep the run out of them and them out of an overwrite."""
    model = inputs.get("model", "")
    if model and Path(model).exists() and out.resolve() == Path(model).resolve():
        raise RunError(f"output_dir {out} is the input model's directory: a run never writes over its input "
                       f"model; choose another output_dir")
    if resume:
        if overwrite:
            raise RunError("--resume and --overwrite contradict each other: give one")
        found = list_checkpoints(out)
        if not found:
            what = "it does not exist" if not out.exists() else "it holds no checkpoint-N/ directory"
            raise RunError(f"--resume: nothing to resume in {out}: {what} (a run writes checkpoints every "
                           f"save_steps steps); start a fresh run without --resume")
        return found[-1]
    if out.exists() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        if not overwrite:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise RunError(f"output_dir {out} is not empty (it holds {shown}); pass --overwrite to replace "
                           f"what is there, --resume to continue the run it holds, or choose another "
                           f"output_dir")
        for key, path in inputs.items():
            if path and Path(path).exists() and _inside(Path(path), out):
                raise RunError(f"--overwrite would delete this run's own input: {key} {path} is inside "
                               f"output_dir {out}; choose another output_dir")
    return None


def check_output_file(path: Path, *, inputs: dict[str, str], overwrite: bool) -> None:
    """A command that writes one file (scores, preference pairs) never writes over its input,
    nor over an existing file unless told `--overwrite`."""
    for key, source in inputs.items():
        if source and Path(source).exists() and path.resolve() == Path(source).resolve():
            raise RunError(f"output_file {path} is this command's {key}: choose another output_file")
    if path.exists() and not overwrite:
        raise RunError(f"output_file {path} exists; pass --overwrite to replace it, or choose another output_file")


def clear_output_dir(out: Path) -> None:
    """Empty the directory (a fresh run with --overwrite, once every check has passed)."""
    if not out.exists():
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def read_run(checkpoint: Path) -> dict:
    """The run a checkpoint belongs to: its config and data fingerprints (run.json)."""
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise RunError(f"--resume: {checkpoint} has no {RUN_FILE} (written by an older grpo?), so it cannot be "
                       f"checked against this run; start a fresh run")
    return json.loads(path.read_text())


def run_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """Keys whose values differ between a checkpoint's run and this one, the free keys left out."""
    keys = (set(saved) | set(current)) - RESUME_FREE_KEYS
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}


def check_resume(checkpoint: Path, config: dict, data: dict, allow_changes: bool, say) -> dict:
    """Refuse to resume `checkpoint` into a run it is not (another config, other data), unless
    `allow_changes`: then print what changed. Returns the differences."""
    saved = read_run(checkpoint)
    changes = run_differences(saved["config"], config)
    changes.update({f"data {k}": (saved.get("data", {}).get(k), v) for k, v in data.items()
                    if saved.get("data", {}).get(k) != v})
    if not changes:
        return {}
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if not allow_changes:
        raise RunError(f"--resume: {checkpoint} belongs to a different run ({listed}); resume with the "
                       f"checkpoint's config, or pass --allow-changes to continue with these changes")
    say(f"resuming {checkpoint} with changes: {listed}")
    return changes
