"""Everything `grpo train` checks before it loads a model, in the order a user would want to hear
about it: the data, the rewards, the output directory (and what a resume would continue), the
model, every prompt as the tokenizer will format it, the beam width.

Each failure is one line naming the key, the file and line, or the reward function.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

from grpo.config import IterativeSpec, TrainConfig, to_dict
from grpo.config.loading import qualified_name
from grpo.config.train import preset_overrides
from grpo.data import Source, check_prompts, load_source, require_columns
from grpo.data.rows import file_fingerprint
from grpo.data.sources import META_COLUMNS
from grpo.engine.backend import blocked_token_ids
from grpo.engine.generation import count_completions
from grpo.engine.models import check_model_source, load_tokenizer
from grpo.errors import ConfigError, DataError
from grpo.rewards import build_rewards
from grpo.rewards.scoring import RESERVED_COLUMNS, check_signatures

from .run_dir import check_output_dir, check_resume, clear_output_dir


@dataclass
class TrainInputs:
    rows: list[dict]
    eval_rows: list[dict]
    rewards: list
    tokenizer: object
    checkpoint: Path | None                      # the checkpoint to resume, or None
    fingerprints: dict = field(default_factory=dict)  # what run.json records of the data and reward files
    config_changes: dict = field(default_factory=dict)


def fingerprints(cfg: TrainConfig, data: Source, eval_data: Source | None) -> dict:
    """What a resumed run must find unchanged besides its config: the data, the reward files and
    the source of reward functions given from Python."""
    out = {"dataset": data.fingerprint}
    if eval_data is not None:
        out["eval_dataset"] = eval_data.fingerprint
    iterative = IterativeSpec(**cfg.iterative_rl)
    if iterative.every and iterative.replay_dataset:
        out["iterative_rl.replay_dataset"] = file_fingerprint(iterative.replay_dataset)
    labeler = [iterative.labeler] if iterative.every else []
    for spec in [*cfg.rewards, *labeler]:
        function = spec if not isinstance(spec, dict) else spec.get("function", "")
        if callable(function):
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):  # defined where no source is kept (a REPL): its name stands for it
                continue
            out[f"reward function {qualified_name(function)}"] = f"sha256:{hashlib.sha256(source.encode()).hexdigest()}"
            continue
        target = str(function).rsplit(":", 1)[0]
        if target.endswith(".py") and Path(target).is_file():
            out[f"reward file {target}"] = file_fingerprint(target)
    return out


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


def check_inputs(cfg: TrainConfig, run, *, resume: bool, overwrite: bool, allow_changes: bool, say) -> TrainInputs:
    say_preset(cfg, say)
    data, eval_data = load_data(cfg, "dataset"), load_data(cfg, "eval_dataset")
    rows = data.rows
    eval_rows = eval_data.rows[: cfg.eval_max_prompts] if eval_data else []
    columns = check_columns(rows, cfg, data.label)
    rewards = build_rewards(cfg.rewards, run.device, run.dtype)
    check_signatures(rewards, columns)
    check_accuracy_reward(rewards, cfg.accuracy_reward)
    iterative = IterativeSpec(**cfg.iterative_rl)
    if iterative.every:  # its labeler and replayed pairs exist before any model is loaded
        labeler = build_rewards([iterative.labeler], run.device, run.dtype)
        check_signatures(labeler, columns)
        if iterative.replay_dataset and not Path(iterative.replay_dataset).is_file():
            raise ConfigError(f"iterative_rl.replay_dataset: {iterative.replay_dataset} is not a file")
    if "exact_answer" in [r.name for r in rewards] or (iterative.every and iterative.labeler == "exact_answer"):
        require_columns(rows, ["answer"], data.label)

    paths = {k: v for k, v in (("model", cfg.model), ("dataset", cfg.dataset), ("eval_dataset", cfg.eval_dataset))
             if isinstance(v, str)}
    inputs = {**paths, **{f"rewards[{i}]": m for i, s in enumerate(cfg.rewards) if isinstance(s, dict)
                          for m in (s["model"] if isinstance(s.get("model"), list) else [s.get("model") or ""])},
              **({"iterative_rl.replay_dataset": iterative.replay_dataset} if iterative.every else {})}
    checkpoint = check_output_dir(run.out, inputs=inputs, resume=resume, overwrite=overwrite)
    model_config = check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    for source, checked in ((data, rows), (eval_data, eval_rows)):
        if source is not None:
            check_prompts(tokenizer, checked, cfg.prompt_column, source.label, cfg.apply_chat_template,
                          cfg.chat_template_kwargs)
    check_beam_width(cfg, model_config.vocab_size - len(blocked_token_ids(tokenizer)))

    found = fingerprints(cfg, data, eval_data)
    changes = check_resume(checkpoint, to_dict(cfg), found, allow_changes, say) if checkpoint else {}
    if overwrite and run.world.main:
        clear_output_dir(run.out)  # every check passed: only now is the old run deleted
    run.world.barrier()
    return TrainInputs(rows, eval_rows, rewards, tokenizer, checkpoint, found, changes)
