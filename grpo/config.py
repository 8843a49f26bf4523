"""One typed config per command: every choice of a run is made here and nowhere else.

A config is a YAML file plus `--set key=value` overrides. It is validated before any model is
loaded: an unknown key, a wrong type or an impossible value stops the run with one message that
names the key, the file it came from and what is allowed.

`preset` picks a coherent bundle of algorithm choices (DESIGN.md's table); any key the user sets
explicitly wins over the preset.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the key, the source and what is expected."""


# DESIGN.md "Presets". Papers: DeepSeekMath (2402.03300), DAPO (2503.14476),
# Dr. GRPO (2503.20783), GSPO (2507.18071).
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(scale_rewards="group", loss_aggregation="sequence_mean", ratio_level="token",
                 epsilon_low=0.2, epsilon_high=0.2, beta=0.04, kl_estimator="k3"),
    "dapo": dict(scale_rewards="group", loss_aggregation="token_mean", ratio_level="token",
                 epsilon_low=0.2, epsilon_high=0.28, beta=0.0, kl_estimator="k3"),
    "dr_grpo": dict(scale_rewards="none", loss_aggregation="constant_normalizer", ratio_level="token",
                    epsilon_low=0.2, epsilon_high=0.2, beta=0.0, kl_estimator="k3"),
    "gspo": dict(scale_rewards="group", loss_aggregation="sequence_mean", ratio_level="sequence",
                 epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0, kl_estimator="k3"),
}

CHOICES: dict[str, tuple] = {
    "preset": tuple(PRESETS),
    "generation": ("sample", "beam"),
    "scale_rewards": ("group", "batch", "none"),
    "ratio_level": ("token", "sequence"),
    "ratio_anchor": ("old", "reference"),
    "kl_estimator": ("k1", "k2", "k3"),
    "loss_aggregation": ("sequence_mean", "token_mean", "constant_normalizer", "group_sum"),
    "lr_scheduler": ("constant", "linear", "cosine"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "apply_chat_template": ("auto", "never"),
}


@dataclass
class CommonConfig:
    """Keys shared by every training command."""
    model: str = ""                      # local directory or hub id, loaded with from_pretrained
    output_dir: str = "runs/grpo"
    seed: int = 0
    dataset: str = ""                    # JSONL, CSV or Parquet file
    prompt_column: str = "prompt"
    apply_chat_template: str = "auto"    # auto: when the tokenizer has one; never: raw text
    max_prompt_length: int = 512         # prompts longer than this are cut from the left
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    max_grad_norm: float = 1.0
    max_steps: int = 100
    micro_batch_size: int = 64           # sequences per forward/backward (gradient accumulation)
    logging_steps: int = 1
    save_steps: int = 0                  # 0: only the final model
    save_total_limit: int = 0            # 0: keep every checkpoint
    dtype: str = "auto"                  # compute dtype; auto: float32 on CPU, bfloat16 on CUDA (weights stay fp32)
    device: str = "auto"
    num_threads: int = 0                 # 0: torch's default


@dataclass
class TrainConfig(CommonConfig):
    """`grpo train`: DESIGN.md's maths, one key per choice."""
    preset: str = "grpo"
    learning_rate: float = 1e-6
    max_steps: int = 100
    # Data and rewards
    eval_dataset: str = ""
    eval_steps: int = 0                  # 0: no periodic evaluation
    eval_max_prompts: int = 500
    rewards: list = field(default_factory=lambda: [])  # [{function|model: ..., weight: 1.0, normalize: false}]
    accuracy_reward: str = ""            # reward whose value 1.0 means "correct"; "" picks exact_answer if used
    # Rollout
    prompts_per_step: int = 8            # P
    group_size: int = 8                  # G, the seed's K
    generation: str = "sample"
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mask_truncated_completions: bool = False
    # Advantages, ratio, loss (DESIGN.md "The maths"); preset values unless set
    scale_rewards: str = "group"
    advantage_eps: float = 1e-4
    ratio_level: str = "token"
    ratio_anchor: str = "old"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    kl_estimator: str = "k3"
    loss_aggregation: str = "sequence_mean"
    num_iterations: int = 1              # mu: passes over each rollout
    num_minibatches: int = 1             # optimizer steps per pass
    samples_steps: int = 0               # every N steps: sample completions to console and samples.jsonl
    num_samples: int = 4                 # completions shown per sample table
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard (if installed), wandb
    wandb_project: str = "grpo"


@dataclass
class SFTConfig(CommonConfig):
    """`grpo sft`: supervised warm start on prompt/completion pairs (loss on completion tokens)."""
    output_dir: str = "runs/sft"
    completion_column: str = "completion"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    batch_size: int = 64
    max_steps: int = 1000
    max_completion_length: int = 256


# ----------------------------------------------------------------------------------------------

def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) a value against a field's annotation."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), None)
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; everyone writes learning rates that way.
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if kind is str:
        return isinstance(value, str), value
    if kind is list:
        return isinstance(value, list), value
    return True, value


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML so `beta=0`, `rewards=[...]` work."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def build(cls, values: dict[str, Any], source: str = "config"):
    """Make a `cls` from a dict: unknown keys, wrong types and bad choices raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = dict(values)
    if "preset" in fields:
        preset = values.get("preset", "grpo")
        if preset not in PRESETS:
            raise ConfigError(f"{source}: preset: {preset!r} is not one of {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **values}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        ok, value = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {_type_name(hints[key])}, got "
                              f"{type(value).__name__} {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(CHOICES[key])}")
        kwargs[key] = value
    cfg = cls(**kwargs)
    validate(cfg, source)
    return cfg


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    values = load_yaml(path) if path else {}
    values.update(parse_overrides(overrides or []))
    source = str(path) if path else "config"
    return build(cls, values, source)


def validate(cfg, source: str = "config") -> None:
    """Values that are well typed but impossible."""
    def bad(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")

    if not cfg.model:
        bad("model", "required: a model directory or hub id")
    if not cfg.dataset:
        bad("dataset", "required: a JSONL, CSV or Parquet file")
    for key in ("max_steps", "micro_batch_size", "max_prompt_length", "logging_steps"):
        if getattr(cfg, key) < 1:
            bad(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("save_steps", "save_total_limit", "warmup_steps", "num_threads"):
        if getattr(cfg, key) < 0:
            bad(key, f"must be >= 0, got {getattr(cfg, key)}")
    if cfg.learning_rate <= 0:
        bad("learning_rate", f"must be > 0, got {cfg.learning_rate}")
    if cfg.max_grad_norm < 0:
        bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
    if not isinstance(cfg, TrainConfig):
        if cfg.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {cfg.batch_size}")
        return
    if cfg.group_size < 2:
        bad("group_size", f"must be >= 2: advantages are relative to the group, got {cfg.group_size}")
    if cfg.prompts_per_step < 1:
        bad("prompts_per_step", f"must be >= 1, got {cfg.prompts_per_step}")
    n = cfg.prompts_per_step * cfg.group_size
    if cfg.num_minibatches < 1 or n % cfg.num_minibatches:
        bad("num_minibatches", f"must divide prompts_per_step * group_size = {n} into whole "
                               f"minibatches, got {cfg.num_minibatches}")
    if (n // cfg.num_minibatches) % cfg.group_size:
        bad("num_minibatches", f"each minibatch must hold whole groups of {cfg.group_size}; "
                               f"{n} completions / {cfg.num_minibatches} minibatches does not")
    if cfg.num_iterations < 1:
        bad("num_iterations", f"must be >= 1, got {cfg.num_iterations}")
    if cfg.max_completion_length < 1:
        bad("max_completion_length", f"must be >= 1, got {cfg.max_completion_length}")
    if cfg.temperature <= 0:
        bad("temperature", f"must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        bad("top_p", f"must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        bad("top_k", f"must be >= 0 (0 disables), got {cfg.top_k}")
    if cfg.beta < 0:
        bad("beta", f"must be >= 0, got {cfg.beta}")
    if not 0 <= cfg.epsilon_low < 1:
        bad("epsilon_low", f"must be in [0, 1), got {cfg.epsilon_low}")
    if cfg.epsilon_high < 0:
        bad("epsilon_high", f"must be >= 0, got {cfg.epsilon_high}")
    if cfg.advantage_eps <= 0:
        bad("advantage_eps", f"must be > 0, got {cfg.advantage_eps}")
    if cfg.eval_steps < 0 or cfg.samples_steps < 0:
        bad("eval_steps", "must be >= 0")
    if not cfg.rewards:
        bad("rewards", "at least one reward is required, e.g. rewards: [{function: exact_answer}]")
    for i, spec in enumerate(cfg.rewards):
        where = f"rewards[{i}]"
        if isinstance(spec, str):
            continue
        if not isinstance(spec, dict):
            bad(where, f"expected a mapping like {{function: exact_answer, weight: 1.0}}, got {spec!r}")
        allowed = {"function", "model", "weight", "name", "normalize", "batch_size"}
        unknown = set(spec) - allowed
        if unknown:
            bad(where, f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if ("function" in spec) == ("model" in spec):
            bad(where, "give exactly one of 'function' (built-in name, file.py:fn or module:fn) "
                       "or 'model' (a reward model directory)")
        if not isinstance(spec.get("weight", 1.0), (int, float)) or isinstance(spec.get("weight"), bool):
            bad(f"{where}.weight", f"expected a number, got {spec.get('weight')!r}")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
