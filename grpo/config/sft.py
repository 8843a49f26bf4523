"""`grpo sft`: the supervised warm start (DeepSeek-R1's cold start) on prompt/completion pairs."""

from __future__ import annotations

from dataclasses import dataclass

from .common import LoopConfig
from .loading import at_least


@dataclass
class SFTConfig(LoopConfig):
    output_dir: str = "runs/sft"
    """Where the warmed-up model (a model directory `grpo train` takes) and its metrics go."""
    completion_column: str = "completion"
    """The dataset column holding the target completion; the loss is on its tokens only."""
    learning_rate: float = 1e-3
    adam_beta2: float = 0.999
    batch_size: int = 64
    """Prompt/completion pairs per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps."""
    max_completion_length: int = 256
    """Completion tokens kept (EOS included); a longer completion is cut at its end."""

    def validate(self, bad) -> None:
        super().validate(bad)
        at_least(self, bad, 1, "batch_size", "max_completion_length")
