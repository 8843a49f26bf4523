"""Everything `grpo train` checks before it loads a model, in the order a user would want to hear
about it: the data, the rewards, the output directory (and what a resume would continue), the
model, every prompt as the tokenizer will format it, the beam width. Then the output directory is
claimed (locked, emptied under --overwrite, marked: `runs.run_dir`).

Each failure is one line naming the key, the file and line, or the reward function.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

from grpo.agents import check_setup
from grpo.config import IterativeSpec, TrainConfig, to_dict
from grpo.config.loading import qualified_name
from grpo.config.train import preset_overrides
from grpo.data import Source, check_prompts, load_source, require_columns
from grpo.data.rows import file_fingerprint
from grpo.data.sources import META_COLUMNS
from grpo.engine.backend import blocked_token_ids
from grpo.engine.generation import count_completions
from grpo.engine.models import check_model_source, load_tokenizer, trusts_remote_code
from grpo.errors import ConfigError, DataError, GrpoError, RunError
from grpo.rewards import build_rewards
from grpo.rewards.scoring import RESERVED_COLUMNS, check_signatures

from .run_dir import RunLock, check_output_dir, check_resume, check_steps_left, claim_output_dir


@dataclass
class TrainInputs:
    rows: list[dict]
    eval_rows: list[dict]
    rewards: list
    tokenizer: object
    checkpoint: Path | None                      # the checkpoint to resume, or None
    fingerprints: dict = field(default_factory=dict)  # what run.json records of the data and reward files
    config_changes: dict = field(default_factory=dict)
    model: dict | None = None                    # the base model's fingerprint (run.json), None when unknown
    lock: RunLock = field(default_factory=RunLock)  # held on the output directory until the run ends
    agent: tuple | None = None                   # (tools, environments) checked on the tokenizer, agent runs only


def fingerprints(cfg: TrainConfig, data: Source, eval_data: Source | None) -> dict:
    """What a resumed run must find unchanged besides its config: the data, the reward and agent
    files, and the source of reward functions, tools, environments and rollout_func given from Python."""
    out = {"dataset": data.fingerprint}
    if eval_data is not None:
        out["eval_dataset"] = eval_data.fingerprint
    iterative = IterativeSpec(**cfg.iterative_rl)
    if iterative.every and iterative.replay_dataset:
        out["iterative_rl.replay_dataset"] = file_fingerprint(iterative.replay_dataset)
    labeler = [iterative.labeler] if iterative.every else []
    for spec in [*cfg.rewards, *labeler]:
        _code_fingerprint(out, "reward", spec if not isinstance(spec, dict) else spec.get("function", ""))
    # An agent's code decides what its episodes hold: its tools, environment class and rollout_func.
    for spec in [*cfg.tools, cfg.environment_factory, cfg.rollout_func]:
        if spec:
            _code_fingerprint(out, "agent", spec)
    return out


def _code_fingerprint(out: dict, kind: str, spec) -> None:
    """The sha256 of a function's (or class's) source when given from Python, or of its file when
    named as `file.py:name`; nothing for a module path, or for code defined where no source is kept
    (a REPL), whose name stands for it."""
    if callable(spec):
        try:
            source = inspect.getsource(spec)
        except (OSError, TypeError):
            return
        out[f"{kind} function {qualified_name(spec)}"] = f"sha256:{hashlib.sha256(source.encode()).hexdigest()}"
        return
    target = str(spec).rsplit(":", 1)[0]
    if target.endswith(".py") and Path(target).is_file():
        out[f"{kind} file {target}"] = file_fingerprint(target)


def model_fingerprint(model: str) -> dict | None:
    """What identifies the base model's weights (its KL reference, the policy's start): for a local
    directory the sha256 of each weight file (*.safetensors, *.bin), read in blocks; for a hub id
    the commit its cached files come from; None when neither is known."""
    local = Path(model).expanduser()
    if local.is_dir():
        weights = sorted(p for p in local.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
        return {"files": {p.name: file_fingerprint(p) for p in weights}}
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # no cache, a name the hub library refuses: nothing recorded, nothing compared
        return None
    return {"revision": Path(found).parent.name} if isinstance(found, str) else None


def source_file(obj) -> str | None:
    """The file a user's function (a reward, a tool) comes from: `file.py:fn` names it, a
    function or an instance knows it (a partial's function, an instance's class)."""
    if isinstance(obj, str):
        target = obj.rsplit(":", 1)[0]
        return target if target.endswith(".py") else None
    fn = getattr(obj, "func", obj)  # functools.partial
    for candidate in (fn, getattr(fn, "__func__", None), type(fn)):
        try:
            path = inspect.getsourcefile(candidate) if candidate is not None else None
        except TypeError:  # a builtin: no file
            continue
        if path:
            return path
    return None


def run_inputs(cfg: TrainConfig, rewards, config_path: str | None) -> dict[str, str]:
    """Every input path of a run by key: the config file, the model, the data, the reward models,
    the files reward functions and tools come from (kept out of the output directory and out of
    any --overwrite)."""
    iterative = IterativeSpec(**cfg.iterative_rl)
    paths = {k: v for k, v in (("config", config_path or ""), ("model", cfg.model), ("dataset", cfg.dataset),
                               ("eval_dataset", cfg.eval_dataset)) if isinstance(v, str) and v}
    for i, spec in enumerate(cfg.rewards):
        if isinstance(spec, dict):
            models = spec.get("model") if isinstance(spec.get("model"), list) else [spec.get("model") or ""]
            paths.update({f"rewards[{i}].model" + (f"[{j}]" if len(models) > 1 else ""): m
                          for j, m in enumerate(models) if m})
            if spec.get("judge"):
                paths[f"rewards[{i}].judge"] = spec["judge"]
    for r in rewards:
        path = source_file(getattr(r.fn, "fn", r.fn))  # a group reward: the function it wraps
        if path:
            paths[f"reward {r.name}'s file"] = path
    for i, tool in enumerate(getattr(cfg, "tools", None) or []):
        path = source_file(getattr(tool, "fn", tool))
        if path:
            paths[f"tools[{i}]'s file"] = path
    environment = getattr(cfg, "environment_factory", None)
    path = source_file(environment) if environment else None
    if path:
        paths["environment_factory's file"] = path
    if iterative.every and iterative.replay_dataset:
        paths["iterative_rl.replay_dataset"] = iterative.replay_dataset
    return paths


def load_data(cfg, key: str = "dataset") -> Source | None:
    """The rows of `dataset` or `eval_dataset` (None when there is no eval set)."""
    source = getattr(cfg, key)
    if key == "eval_dataset" and (source is None or (isinstance(source, str) and not source)):
        return None
    split = cfg.dataset_train_split if key == "dataset" else cfg.dataset_test_split
    data = load_source(source, key=key, split=split, config_name=cfg.dataset_config, rename=cfg.rename_columns)
    require_columns(data.rows, [cfg.prompt_column], data.label)
    return data


def reward_columns(row: dict, prompt_column: str) -> list[str]:
    """The dataset columns reward functions get as keywords: all but the prompt (TRL's rule)."""
    return [k for k in row if k != prompt_column and k not in META_COLUMNS]


def check_columns(rows: list[dict], cfg, label: str) -> list[str]:
    """The columns reward functions will get; none may shadow one of TRL's keywords."""
    columns = reward_columns(rows[0], cfg.prompt_column)
    clash = [c for c in columns if c in RESERVED_COLUMNS]
    if clash:
        raise DataError(f"{label}: column {clash[0]!r} has the name of a keyword reward functions are called "
                        f"with; rename it (rename_columns: {{{clash[0]}: {clash[0]}_}})")
    return columns


def check_accuracy_reward(rewards, requested: str) -> None:
    """A named accuracy_reward must be one of the run's rewards (one line before any model loads)."""
    names = [r.name for r in rewards]
    if requested and requested not in names:
        raise ConfigError(f"accuracy_reward: {requested!r} is not one of the run's rewards {names}; name one "
                          f"of them, or leave it empty to use the first reward whose values are all 0 or 1")


def say_preset(cfg: TrainConfig, say) -> None:
    """A preset whose keys the user set otherwise says which of its keys it did not set."""
    overridden = preset_overrides(cfg)
    if overridden:
        listed = ", ".join(f"{k}: {mine!r} (the preset's {theirs!r})" for k, (theirs, mine) in overridden.items())
        say(f"preset {cfg.preset}: your config sets {listed}; the preset's value of "
            f"{'that key' if len(overridden) == 1 else 'those keys'} is not used")


def check_beam_width(cfg: TrainConfig, vocab_size: int) -> None:
    """Beam search of width G needs G distinct completions of at most max_completion_length tokens."""
    if cfg.generation != "beam":
        return
    available = count_completions(vocab_size, 1, cfg.max_completion_length, at_least=cfg.group_size)
    if available < cfg.group_size:
        raise ConfigError(f"group_size: beam search of width {cfg.group_size} needs {cfg.group_size} distinct "
                          f"completions, but a vocabulary of {vocab_size} tokens allows only {available} of at "
                          f"most max_completion_length={cfg.max_completion_length} tokens; lower group_size or "
                          f"raise max_completion_length")


def check_inputs(cfg: TrainConfig, run, *, resume: bool, overwrite: bool, allow_changes: bool, say,
                 config_path: str | None = None) -> TrainInputs:
    say_preset(cfg, say)
    data, eval_data = load_data(cfg, "dataset"), load_data(cfg, "eval_dataset")
    rows = data.rows
    eval_rows = eval_data.rows[: cfg.eval_max_prompts] if eval_data else []
    columns = check_columns(rows, cfg, data.label)
    rewards = build_rewards(cfg.rewards, run.device, run.dtype)
    check_signatures(rewards, columns)
    check_accuracy_reward(rewards, cfg.accuracy_reward)
    iterative = IterativeSpec(**cfg.iterative_rl)
    labeler = []
    if iterative.every:  # its labeler and replayed pairs exist before any model is loaded
        labeler = build_rewards([iterative.labeler], run.device, run.dtype)
        check_signatures(labeler, columns)
        if iterative.replay_dataset and not Path(iterative.replay_dataset).is_file():
            raise ConfigError(f"iterative_rl.replay_dataset: {iterative.replay_dataset} is not a file")
    if "exact_answer" in [r.name for r in rewards] or (iterative.every and iterative.labeler == "exact_answer"):
        require_columns(rows, ["answer"], data.label)

    inputs = run_inputs(cfg, rewards + labeler, config_path)
    checkpoint = check_output_dir(run.out, inputs=inputs, resume=resume, overwrite=overwrite)
    if checkpoint is not None:
        check_steps_left(checkpoint, cfg.max_steps)
    trust = trusts_remote_code(cfg.model_init_kwargs)
    model_config = check_model_source(cfg.model, trust_remote_code=trust)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=trust)
    for source, checked in ((data, rows), (eval_data, eval_rows)):
        if source is not None:  # over-long prompts lose their start, as TRL's do: said once, not silently
            check_prompts(tokenizer, checked, cfg.prompt_column, source.label, cfg.apply_chat_template,
                          cfg.chat_template_kwargs, max_length=cfg.max_prompt_length,
                          say=None if run.world.main else (lambda message: None))
    check_beam_width(cfg, model_config.vocab_size - len(blocked_token_ids(tokenizer)))
    # Tools importable, typed, documented and shown by the chat template; the environment class
    # made once: a bad one is one line naming it, before any model loads.
    agent = check_setup(tokenizer, list(cfg.tools), cfg.environment_factory or None,
                        template_kwargs=cfg.chat_template_kwargs or None) if cfg.agent else None

    found = fingerprints(cfg, data, eval_data)
    # The base model's weights, read once (rank 0) and shared: every process compares the same.
    model = run.world.gather_objects(model_fingerprint(cfg.model) if run.world.main else None)[0]
    changes = check_resume(checkpoint, to_dict(cfg), found, allow_changes, say, model) if checkpoint else {}
    lock = claim(run, inputs=inputs, resume=resume, overwrite=overwrite)
    return TrainInputs(rows, eval_rows, rewards, tokenizer, checkpoint, found, changes, model, lock, agent)


def claim(run, command: str = "grpo train", **checks) -> RunLock:
    """Every check passed: rank 0 locks the output directory, empties it under --overwrite (only
    now is an old run deleted) and marks it; every process hears whether it could. The other
    ranks write into the same directory under rank 0's lock."""
    world = run.world
    world.barrier()  # every process has looked at the directory's lock before rank 0 takes it
    lock, problem = RunLock(), None
    if world.main:
        try:
            lock = claim_output_dir(run.out, command, **checks)
        except GrpoError as e:
            problem = str(e)
    problem = world.gather_objects(problem)[0]
    if problem:
        lock.release()
        raise RunError(problem)
    world.barrier()
    return lock
