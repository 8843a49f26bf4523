"""`grpo sft`: the supervised warm start (DeepSeek-R1's cold start) on prompt/completion pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .common import LoopConfig
from .loading import at_least


@dataclass
class SFTConfig(LoopConfig):
    TOPICS: ClassVar[dict] = {
        "data": ("completion_column", "max_completion_length", "eval_dataset", "dataset_test_split",
                 "shuffle_dataset"),
        "optimisation": ("batch_size",),
        "evaluation": ("eval_steps", "eval_max_prompts", "eval_batch_size"),
        "logging and saving": ("model_card",),
    }

    # ---- data
    completion_column: str = "completion"
    """The dataset column holding the target completion; the loss is on its tokens only."""
    max_completion_length: int = 256
    """Completion tokens kept (EOS included); a longer completion is cut at its end."""
    eval_dataset: Any = ""
    """Held-out prompt/completion pairs (any form `dataset` takes): the completion loss before,
    during (eval_steps) and after training, and the greedy exact-match accuracy (the greedy
    completion, stripped, equals the target)."""
    dataset_test_split: str = "test"
    """The split of `eval_dataset` to evaluate on when it has several."""
    shuffle_dataset: bool = True
    """Draw pairs in a fresh random order each pass over the dataset; false: in file order."""

    # ---- optimisation
    max_steps: int = 1000
    """Optimizer steps."""
    learning_rate: float = 1e-3
    adam_beta2: float = 0.999
    batch_size: int = 64
    """Prompt/completion pairs per optimizer step."""

    # ---- evaluation
    eval_steps: int = 0
    """Every N steps the held-out pairs are evaluated; 0: only before and after training."""
    eval_max_prompts: int = 500
    """Held-out pairs used (the first N rows)."""
    eval_batch_size: int = 64
    """Pairs per held-out loss batch and greedy generation batch."""

    # ---- logging and saving
    output_dir: str = "runs/sft"
    """Where the warmed-up model (a model directory `grpo train` takes) and its metrics go."""
    model_card: bool = True
    """Write README.md (a Hugging Face model card) beside the final model; nothing is uploaded."""

    def validate(self, bad) -> None:
        super().validate(bad)
        at_least(self, bad, 1, "batch_size", "max_completion_length", "eval_max_prompts", "eval_batch_size")
        at_least(self, bad, 0, "eval_steps")
