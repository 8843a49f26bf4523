"""Configs: one dataclass per command family, each field with its default and a docstring.

The single place where a run's choices are made: the trainer reads them and passes them on; the
algorithm's allowed values come from its registries. `grpo config <command>` prints every key.
"""

from grpo.errors import ConfigError

from .common import LR_SCHEDULERS, CommonConfig, LoopConfig
from .loading import build, describe, field_docs, load_config, load_yaml, parse_overrides, to_dict
from .reward_model import PreferenceConfig, RewardModelConfig, RewardModelEvalConfig, StepLabelConfig
from .sft import SFTConfig
from .train import PRESETS, IterativeSpec, RewardSpec, TrainConfig

# The command families, for `grpo config <name>`: the config class and the command it configures.
COMMANDS = {"train": (TrainConfig, "grpo train"), "sft": (SFTConfig, "grpo sft"),
            "reward-model": (RewardModelConfig, "grpo reward-model train"),
            "reward-model-eval": (RewardModelEvalConfig, "grpo reward-model eval / score"),
            "make-preferences": (PreferenceConfig, "grpo reward-model make-preferences"),
            "make-step-labels": (StepLabelConfig, "grpo reward-model make-step-labels")}

__all__ = ["COMMANDS", "ConfigError", "IterativeSpec", "CommonConfig", "LR_SCHEDULERS", "LoopConfig", "PRESETS",
           "PreferenceConfig", "RewardModelConfig", "RewardModelEvalConfig", "RewardSpec", "SFTConfig",
           "StepLabelConfig", "TrainConfig", "build", "describe", "field_docs", "load_config", "load_yaml",
           "parse_overrides", "to_dict"]
