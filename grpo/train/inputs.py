"""Everything `grpo train` checks before it loads a model, in the order a user would want to hear
about it: the data, the rewards, the output directory (and what a resume would continue), the
model, every prompt as the tokenizer will format it, the beam width.

Each failure is one line naming the key, the file and line, or the reward function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grpo.config import TrainConfig, to_dict
from grpo.data import check_prompts, load_rows, require_columns
from grpo.data.rows import file_fingerprint
from grpo.engine.generation import count_completions
from grpo.engine.models import check_model_source, load_tokenizer
from grpo.errors import ConfigError
from grpo.rewards import build_rewards
from grpo.rewards.scoring import check_signatures

from .evaluate import accuracy_reward_name
from .run_dir import check_output_dir, check_resume, clear_output_dir


@dataclass
class TrainInputs:
    rows: list[dict]
    eval_rows: list[dict]
    rewards: list
    accuracy_name: str | None
    tokenizer: object
    checkpoint: Path | None                      # the checkpoint to resume, or None
    fingerprints: dict = field(default_factory=dict)  # what run.json records of the data and reward files
    config_changes: dict = field(default_factory=dict)


def fingerprints(cfg: TrainConfig) -> dict:
    """What a resumed run must find unchanged besides its config: the data and the reward files."""
    out = {"dataset": file_fingerprint(cfg.dataset)}
    if cfg.eval_dataset:
        out["eval_dataset"] = file_fingerprint(cfg.eval_dataset)
    for spec in cfg.rewards:
        target = (spec if isinstance(spec, str) else spec.get("function", "")).rsplit(":", 1)[0]
        if target.endswith(".py") and Path(target).is_file():
            out[f"reward file {target}"] = file_fingerprint(target)
    return out


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
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column], cfg.dataset)
    eval_rows = load_rows(cfg.eval_dataset)[: cfg.eval_max_prompts] if cfg.eval_dataset else []
    if eval_rows:
        require_columns(eval_rows, [cfg.prompt_column], cfg.eval_dataset)
    rewards = build_rewards(cfg.rewards, run.device, run.dtype)
    check_signatures(rewards, [k for k in rows[0] if k not in (cfg.prompt_column, "_line")])
    accuracy_name = accuracy_reward_name(rewards, cfg.accuracy_reward)
    if accuracy_name == "exact_answer":
        require_columns(rows, ["answer"], cfg.dataset)

    inputs = {"model": cfg.model, "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset,
              **{f"rewards[{i}]": s.get("model", "") for i, s in enumerate(cfg.rewards) if isinstance(s, dict)}}
    checkpoint = check_output_dir(run.out, inputs=inputs, resume=resume, overwrite=overwrite)
    model_config = check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    check_prompts(tokenizer, rows, cfg.prompt_column, cfg.dataset, cfg.apply_chat_template)
    check_prompts(tokenizer, eval_rows, cfg.prompt_column, cfg.eval_dataset, cfg.apply_chat_template)
    check_beam_width(cfg, model_config.vocab_size)

    found = fingerprints(cfg)
    changes = check_resume(checkpoint, to_dict(cfg), found, allow_changes, say) if checkpoint else {}
    if overwrite and run.world.main:
        clear_output_dir(run.out)  # every check passed: only now is the old run deleted
    run.world.barrier()
    return TrainInputs(rows, eval_rows, rewards, accuracy_name, tokenizer, checkpoint, found, changes)
