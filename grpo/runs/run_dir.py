"""The output directory of a command: what a run may write there, and the only place that says
what grpo may delete.

A user's work is sacred: no command deletes or overwrites a file it did not write, and a resumed
run is the run it claims to be.

Claiming a directory. `grpo train`, `grpo sft`, `grpo reward-model train` and the recipes (`grpo
demo`, its seed pipeline) write into a directory only after claiming it (`claim_output_dir`):
- they take an OS lock on `.grpo-lock` inside it (`fcntl.flock`, released when the process ends,
  however it ends) and write the holder's pid and command into that file; a second process that
  would write there is refused with a RunError naming the holder. The lock is taken before
  anything is deleted. Under torchrun only rank 0 takes it: every rank writes into the same
  directory, legitimately;
- they write the marker `.grpo-run` (JSON: which command made the directory, with what
  arguments). Only a directory that holds this marker (or `.grpo-recipe`, the marker of older
  demos) was made by grpo.

Deleting. Only `--overwrite` on a fresh run (and a recipe replacing its own earlier output)
deletes, and only when every check passes, just before the run starts, under the lock:
- never `/`, the home directory, the working directory or any directory above these, nor a
  directory that holds (or is) an input of the run: the config file, data files, models, reward
  models, reward functions' source files;
- never a directory reached through a symbolic link (`output_dir` itself a link): give the real
  path;
- never a directory without grpo's marker: grpo did not make it, so what it holds is not grpo's;
- never a directory that holds anything grpo does not write there. What grpo writes is known by
  name (`RUN_LAYOUT`, `RECIPE_LAYOUT`: models, tokenizers, checkpoints, metrics, samples,
  summaries, reports), down into the directories it writes (a checkpoint, the adapter, a nested
  run with its own marker); any other entry, and any symbolic link, is the user's, and then
  nothing at all is deleted: the error names the entries and asks to move them away. So
  `--overwrite` empties a directory exactly when everything in it is grpo's own output;
- never while another process holds the directory's lock (nor the lock of a run nested in it).

A recipe (`claim_recipe_dir`) replaces its own earlier output without `--overwrite` when its
marker names the same recipe and everything there is the recipe's; a user's file in it refuses
with or without `--overwrite`.

Everything else:
- a fresh run refuses a directory that holds anything but grpo's marker and lock, unless told
  `--overwrite`;
- `--resume` refuses a directory with no checkpoint to resume, a checkpoint at or past max_steps
  (nothing to train), and a checkpoint whose run differs from this one in anything that changes
  the run (config keys, the data, the reward files, the base model's weights), unless told
  `--allow-changes`, which prints the difference;
- no run writes into the directory of its input model; no command writes its output file over an
  input, into an input directory, or through a symbolic link;
- the final model is written to a temporary directory inside the run directory and moved into
  place (`publish`), its config.json last: a model directory is never half written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from grpo.errors import RunError

from .checkpoint import RUN_FILE, list_checkpoints

try:
    import fcntl
except ImportError:  # not on Windows: there runs are not locked
    fcntl = None

MARKER = ".grpo-run"        # grpo made this directory (JSON: the command and its arguments)
LOCK = ".grpo-lock"         # held (flock) by the process writing here; its pid and command inside
LEGACY_MARKER = ".grpo-recipe"  # older demos' marker: the recipe's name
STAGING = ".tmp-final-model"    # the final model while it is written (see `publish`)
RECIPE_COMMANDS = ("grpo demo", "grpo demo --pipeline seed")

# Keys a resumed run may change without becoming another run: how long it goes on, what it
# logs and saves, how it is spread over memory and threads (micro_batch_size changes memory, never
# the gradient). Everything else is part of what the checkpoint's run is.
RESUME_FREE_KEYS = frozenset({
    "max_steps", "logging_steps", "save_steps", "save_total_limit", "save_on_interrupt", "eval_steps",
    "eval_max_prompts", "eval_batch_size", "samples_steps", "num_samples", "report_to", "wandb_project",
    "num_threads", "micro_batch_size", "reward_timeout", "output_dir",
})


# ----------------------------------------------------------------------------------------------
# What grpo writes, by name. A layout is a tuple of (name pattern, what it is): FILE, ANY (a
# directory written whole by grpo or a library it drives, not looked into), or a layout (a
# directory whose entries are checked in turn).

FILE, ANY = "file", "any"


def _files(*patterns: str) -> tuple:
    return tuple((p, FILE) for p in patterns)


# What save_pretrained writes for a model, an adapter, a tokenizer or a reward model (the
# custom-code files are copied beside a trust_remote_code model; README.md is peft's or our card).
MODEL_FILES = _files(
    r"config\.json", r"generation_config\.json",
    r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)",
    r"(model|pytorch_model|adapter_model)\.(safetensors|bin)\.index\.json", r"adapter_config\.json",
    r"tokenizer(_config)?\.json", r"tokenizer\.model", r"special_tokens_map\.json", r"added_tokens\.json",
    r"vocab\.(json|txt)", r"merges\.txt", r"chat_template\.(jinja|json)", r"README\.md", r"reward_model\.json",
    r"(configuration|modeling|tokenization)_\w+\.py")
MODEL_LAYOUT = MODEL_FILES + (("reference", MODEL_FILES),)  # a DPO-style reward model's reference
CHECKPOINT_LAYOUT = MODEL_LAYOUT + _files(r"trainer_state\.pt", re.escape(RUN_FILE)) + (("sharded", ANY),)
MARKERS = _files(re.escape(MARKER), re.escape(LOCK), re.escape(LEGACY_MARKER))
RUN_LAYOUT = MODEL_LAYOUT + MARKERS + _files(
    r"metrics\.jsonl", r"samples\.jsonl", r"train_config\.json", r"summary\.json", r"wandb_run_id\.txt",
    r"report\.html") + (
    (r"checkpoint-\d+", CHECKPOINT_LAYOUT), (r"\.tmp-checkpoint-\d+", ANY), (re.escape(STAGING), ANY),
    # best-model: grpo.train.best_model.BEST_DIR; reward_model: what iterative RL leaves
    ("best-model", MODEL_LAYOUT), ("adapter", MODEL_LAYOUT), ("reward_model", MODEL_LAYOUT),
    ("tensorboard", ANY), ("wandb", ANY), ("plots", ANY))
RECIPE_DATA = _files(r"(train|heldout|preferences_train|preferences_heldout|heldout_correct_pairs)\.jsonl")
RECIPE_LAYOUT = MARKERS + _files(r"summary\.json", r"report\.html") + (
    ("plots", ANY), ("base", MODEL_LAYOUT), ("data", RECIPE_DATA), ("sft|grpo|beam|sample|reward_model", RUN_LAYOUT))


def _match(name: str, layout: tuple):
    for pattern, kind in layout:
        if re.fullmatch(pattern, name):
            return kind
    return None


def read_marker(directory: Path) -> dict | None:
    """What grpo's marker in `directory` says ({"command": ...}), or None: no marker, grpo did
    not make it."""
    marker, legacy = directory / MARKER, directory / LEGACY_MARKER
    try:
        if marker.is_file() and not marker.is_symlink():
            try:
                found = json.loads(marker.read_text())
            except ValueError:
                found = None
            return found if isinstance(found, dict) else {"command": "grpo"}
        if legacy.is_file() and not legacy.is_symlink():
            recipe = legacy.read_text().strip()
            return {"command": "grpo demo --pipeline seed" if recipe == "seed pipeline" else "grpo demo"}
    except OSError:
        return None
    return None


def _layout_of(marker: dict) -> tuple:
    return RECIPE_LAYOUT if marker.get("command") in RECIPE_COMMANDS else RUN_LAYOUT


def _scan(directory: Path, layout: tuple, top: Path, foreign: list, busy: list) -> None:
    """The entries under `directory` that grpo does not write (`foreign`), and the locks of runs
    held by a process now (`busy`)."""
    nested = read_marker(directory)
    if nested is not None and directory != top:  # a run nested here is read by its own marker
        layout = _layout_of(nested)
    for entry in sorted(directory.iterdir()):
        kind = _match(entry.name, layout)
        is_dir = entry.is_dir() and not entry.is_symlink()
        if entry.is_symlink() or kind is None or (kind == FILE) == is_dir:
            foreign.append(str(entry.relative_to(top)) + ("/" if is_dir else ""))
        elif entry.name == LOCK and directory != top:
            holder = lock_holder(entry)
            if holder:
                busy.append((entry.parent, holder))
        elif is_dir and kind != ANY:
            _scan(entry, kind, top, foreign, busy)


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _contents(out: Path) -> list[Path]:
    """What a directory holds besides grpo's own marker and lock."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name not in (MARKER, LOCK)]


def check_clearable(out: Path, inputs: dict[str, str], what: str = "--overwrite") -> None:
    """Refuse, naming why, unless every entry of `out` may be deleted (the rules above)."""
    if out.is_symlink():
        raise RunError(f"{what}: output_dir {out} is a symbolic link (to {os.path.realpath(out)}); grpo never "
                       f"empties a directory reached through a link: give the real path, or choose another "
                       f"output_dir")
    resolved = out.resolve()
    if resolved == Path(resolved.anchor):
        raise RunError(f"{what}: output_dir {out} is the root directory; grpo never empties it: choose another "
                       f"output_dir")
    for name, protected in (("the home directory", Path.home()), ("the working directory", Path.cwd())):
        if _inside(protected, out):
            where = "is" if protected.resolve() == resolved else "holds"
            raise RunError(f"{what}: output_dir {out} {where} {name} ({protected}); grpo never empties it: "
                           f"choose another output_dir")
    for key, path in inputs.items():
        if path and os.path.lexists(path) and _inside(Path(path), out):
            raise RunError(f"{what} would delete this run's own input: {key} {path} is inside output_dir "
                           f"{out}; choose another output_dir")
    marker = read_marker(out)
    if marker is None:
        raise RunError(f"{what}: output_dir {out} was not made by grpo (it has no {MARKER} marker), so grpo "
                       f"will not delete what it holds ({_shown(sorted(p.name for p in _contents(out)))}); "
                       f"delete it yourself if it should go, or choose another output_dir")
    foreign, busy = [], []
    _scan(out, _layout_of(marker), out, foreign, busy)
    if foreign:
        raise RunError(f"{what}: output_dir {out} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                       f"grpo did not write ({_shown(foreign)}); grpo deletes only what it wrote: move "
                       f"{'it' if len(foreign) == 1 else 'them'} out of {out}, or choose another output_dir")
    if busy:
        where, holder = busy[0]
        raise RunError(f"{what}: {where} is being written by another grpo process ({holder}); wait for it to "
                       f"end or stop it, or choose another output_dir")


def check_output_dir(out: Path, *, inputs: dict[str, str], resume: bool, overwrite: bool,
                     replace_own: str = "", probe_lock: bool = True) -> Path | None:
    """Before anything is loaded: refuse what would lose or mix up work; returns the checkpoint
    to resume (None for a fresh run). `inputs` names the run's input paths by key (config,
    model, dataset, reward files, ...), to keep the run out of them and them out of an overwrite.
    `replace_own`: a recipe's command, whose own earlier output it replaces without `overwrite`.
    `probe_lock`: refuse when another process holds the directory's lock (not when we do)."""
    model = inputs.get("model", "")
    if model and Path(model).exists() and out.resolve() == Path(model).resolve():
        raise RunError(f"output_dir {out} is the input model's directory: a run never writes over its input "
                       f"model; choose another output_dir")
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other: give one")
    holder = lock_holder(out / LOCK) if probe_lock else None
    if holder:
        raise RunError(f"output_dir {out} is being written by another grpo process ({holder}); wait for it to "
                       f"end or stop it, or choose another output_dir")
    if resume:
        found = list_checkpoints(out)
        if not found:
            what = "it does not exist" if not out.exists() else "it holds no checkpoint-N/ directory"
            raise RunError(f"--resume: nothing to resume in {out}: {what} (a run writes checkpoints every "
                           f"save_steps steps); start a fresh run without --resume")
        return found[-1]
    held = _contents(out)
    if not held:
        return None
    marker = read_marker(out)
    own = bool(replace_own) and marker is not None and marker.get("command") == replace_own
    if overwrite or own:
        check_clearable(out, inputs, "--overwrite" if overwrite else replace_own)
        return None
    shown = _shown(sorted(p.name for p in held))
    if marker is None:
        raise RunError(f"output_dir {out} is not empty (it holds {shown}) and was not made by grpo; choose "
                       f"another output_dir (--overwrite deletes only what grpo wrote)")
    if replace_own:
        raise RunError(f"{out} is not empty and was not written by `{replace_own}` (it holds {shown}); pass "
                       f"--overwrite to replace what is there, or choose another --output-dir")
    raise RunError(f"output_dir {out} is not empty (it holds {shown}); pass --overwrite to replace what is "
                   f"there, --resume to continue the run it holds, or choose another output_dir")


# ----------------------------------------------------------------------------------------------
# The lock and the marker


class RunLock:
    """The lock on a run directory, held while a command writes there (a context manager:
    released at its end, or when the process ends). `RunLock()` holds nothing (a torchrun rank
    other than 0)."""

    def __init__(self, fd: int | None = None, directory: Path | None = None):
        self.fd, self.directory = fd, directory

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    line = shlex.join(argv)
    return line if len(line) <= 200 else line[:197] + "..."


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file `path` now ("pid N: command"), or None when nobody does."""
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(path.read_text())
                return f"pid {info['pid']}: {info['command']}"
            except (OSError, ValueError, KeyError, TypeError):
                return "a process that has not yet said which"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_run_dir(out: Path) -> RunLock:
    """Create `out` if need be and hold its lock; refuse when another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return RunLock()
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"output_dir {out} is being written by another grpo process ({lock_holder(path) or 'unknown'}); "
                       f"wait for it to end or stop it, or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": _command_line()}).encode())
    return RunLock(fd, out)


def claim_output_dir(out: Path, command: str, *, inputs: dict[str, str], resume: bool, overwrite: bool,
                     replace_own: str = "") -> RunLock:
    """Lock `out`, check it again under the lock (another process may have written there since
    `check_output_dir`), empty it when `overwrite` (or a recipe's own output) says so, and mark it
    as grpo's. Returns the held lock."""
    lock = lock_run_dir(out)
    try:
        check_output_dir(out, inputs=inputs, resume=resume, overwrite=overwrite, replace_own=replace_own,
                         probe_lock=False)
        if not resume and _contents(out):  # passed the checks above: everything here is grpo's
            clear_output_dir(out)
        marker = out / MARKER
        tmp = out / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"command": command, "argv": _command_line()}, indent=2) + "\n")
        os.replace(tmp, marker)
    except BaseException:
        lock.release()
        raise
    return lock


def clear_output_dir(out: Path) -> None:
    """Delete what `out` holds but its marker and lock. Only ever called on a directory that
    passed `check_clearable` (under the lock): everything it deletes is grpo's own output."""
    for entry in _contents(out):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ----------------------------------------------------------------------------------------------
# The final model


def staging_dir(out: Path) -> Path:
    """An empty directory inside `out` to write the final model into before `publish`."""
    tmp = out / STAGING
    if tmp.exists():  # what an earlier, killed save left: our own
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move everything written into `tmp` into `out`, replacing entries of the same name. The
    old config.json goes first and the new one comes last: a directory with a config.json holds
    one whole model, never a mix of two or a half-written one (each file is renamed, whole)."""
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    if (tmp / "config.json").exists() and (out / "config.json").exists():
        (out / "config.json").unlink()
    for entry in entries:
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


# ----------------------------------------------------------------------------------------------
# One output file


def check_output_file(path: Path, *, inputs: dict[str, str], overwrite: bool) -> None:
    """A command that writes one file (scores, preference pairs) never writes over an input, into
    an input directory (a model's), through a symbolic link, nor over an existing file unless told
    `--overwrite`."""
    for key, source in inputs.items():
        if not source or not os.path.exists(source):
            continue
        if path.resolve() == Path(source).resolve():
            raise RunError(f"output_file {path} is this command's {key}: choose another output_file")
        if Path(source).is_dir() and _inside(path, Path(source)):
            raise RunError(f"output_file {path} is inside this command's {key} {source}: a command never writes "
                           f"into an input directory; choose another output_file")
    if path.is_symlink():
        raise RunError(f"output_file {path} is a symbolic link (to {os.path.realpath(path)}); grpo does not "
                       f"write through a link: give the real path, or choose another output_file")
    if path.is_dir():
        raise RunError(f"output_file {path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise RunError(f"output_file {path} exists; pass --overwrite to replace it, or choose another output_file")


# ----------------------------------------------------------------------------------------------
# Resume


def read_run(checkpoint: Path) -> dict:
    """The run a checkpoint belongs to: its config and data fingerprints (run.json)."""
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise RunError(f"--resume: {checkpoint} has no {RUN_FILE} (written by an older grpo?), so it cannot be "
                       f"checked against this run; start a fresh run")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"--resume: {path} is not readable JSON ({e}); resume from an earlier checkpoint "
                       f"(move this one away) or start a fresh run") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise RunError(f"--resume: {path} does not hold a run's config (a JSON object with a 'config' object); "
                       f"resume from an earlier checkpoint (move this one away) or start a fresh run")
    return saved


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def check_steps_left(checkpoint: Path, max_steps: int) -> None:
    """A resume has steps to train: a checkpoint at or past max_steps would only save its own
    weights again, over the model the run finished with."""
    step = checkpoint_step(checkpoint)
    if max_steps <= step:
        raise RunError(f"--resume: {checkpoint} is at step {step} and max_steps is {max_steps}: nothing to train; "
                       f"raise max_steps above {step} to continue the run")


def run_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """Keys whose values differ between a checkpoint's run and this one, the free keys left out."""
    keys = (set(saved) | set(current)) - RESUME_FREE_KEYS
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}


def _model_changes(path: str, saved: dict, current: dict) -> dict[str, tuple]:
    """How the base model differs: each weight file whose content changed, or its revision."""
    if "files" in saved and "files" in current:
        old, new = saved["files"], current["files"]
        return {f"model {path} {name}": (old.get(name), new.get(name))
                for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)}
    return {f"model {path}": (saved, current)}


def check_resume(checkpoint: Path, config: dict, data: dict, allow_changes: bool, say,
                 model: dict | None = None) -> dict:
    """Refuse to resume `checkpoint` into a run it is not (another config, other data or reward
    files, a base model whose weights changed: its KL reference), unless `allow_changes`: then
    print what changed. Returns the differences. `model`: the base model's fingerprint now
    (`inputs.model_fingerprint`); a checkpoint that recorded none is not compared."""
    saved = read_run(checkpoint)
    changes = run_differences(saved["config"], config)
    recorded = saved.get("data", {})
    # A checkpoint from before agent code was fingerprinted records none: its config still names it.
    changes.update({f"data {k}": (recorded.get(k), v) for k, v in data.items()
                    if recorded.get(k) != v and (k in recorded or not k.startswith("agent "))})
    if model and saved.get("model") and saved["model"] != model:
        changes.update(_model_changes(config.get("model", ""), saved["model"], model))
    if not changes:
        return {}
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if not allow_changes:
        raise RunError(f"--resume: {checkpoint} belongs to a different run ({listed}); resume with the "
                       f"checkpoint's config, or pass --allow-changes to continue with these changes")
    say(f"resuming {checkpoint} with changes: {listed}")
    return changes
