"""The keys every command shares (`CommonConfig`) and those of every command that trains (`LoopConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from grpo.data.prompts import CHAT_TEMPLATE_MODES
from grpo.engine.models import DEVICES, DTYPES

from .loading import at_least

LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORTERS = ("tensorboard", "wandb")


@dataclass
class CommonConfig:
    CHOICES: ClassVar[dict] = {"device": DEVICES, "dtype": ("auto", *DTYPES),
                               "apply_chat_template": CHAT_TEMPLATE_MODES}

    model: str = ""
    """The model: a local directory or a hub id, loaded with `from_pretrained`."""
    dataset: str = ""
    """The data: a JSONL, CSV or Parquet file."""
    prompt_column: str = "prompt"
    """The dataset column holding the prompt (text, or a list of chat messages)."""
    apply_chat_template: str = "auto"
    """`auto`: prompts go through the tokenizer's chat template when it has one; `never`: plain
    text is used verbatim (chat messages always need a template)."""
    max_prompt_length: int = 512
    """Prompt tokens kept; a longer prompt loses its start (the end, next to the answer, stays)."""
    seed: int = 0
    """Seeds every random number generator of the run (sampling, data order, initialisation)."""
    device: str = "auto"
    """`auto`: the GPU of this process when CUDA is there (LOCAL_RANK under torchrun), else the CPU."""
    dtype: str = "auto"
    """What the forward passes compute in; `auto` is float32 on CPU and bfloat16 on CUDA. Trained
    weights and the optimizer stay float32 (master weights); float16 adds a loss scaler."""
    num_threads: int = 0
    """CPU threads for PyTorch's intra-op parallelism; 0 keeps PyTorch's default."""

    def validate(self, bad) -> None:
        """Values that are well typed but impossible; `bad(key, message)` raises."""
        if not self.model:
            bad("model", "required: a model directory or hub id")
        if not self.dataset:
            bad("dataset", "required: a JSONL, CSV or Parquet file")
        at_least(self, bad, 1, "max_prompt_length")
        at_least(self, bad, 0, "num_threads")


@dataclass
class LoopConfig(CommonConfig):
    CHOICES: ClassVar[dict] = {"lr_scheduler": LR_SCHEDULERS}

    output_dir: str = "runs/grpo"
    """Where the run writes its model, checkpoints, metrics and samples."""
    learning_rate: float = 1e-6
    """AdamW's peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, applied to matrices only (not to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.99
    """AdamW's second-moment decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to learning_rate."""
    lr_scheduler: str = "constant"
    """The learning rate after warm-up: constant, or a linear or cosine decay to 0 at the last step."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm; 0 disables clipping."""
    max_steps: int = 100
    """Training steps (for `grpo train`: rollouts; each may hold several optimizer steps)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward pass; the rest of a batch is gradient accumulation, which
    changes memory, never the gradient."""
    logging_steps: int = 1
    """Every N steps a line goes to metrics.jsonl, TensorBoard and the console."""
    save_steps: int = 0
    """Every N steps a resumable checkpoint-N/ is written; 0 keeps only the final model."""
    save_total_limit: int = 0
    """Checkpoints kept (the oldest are deleted); 0 keeps every checkpoint."""
    save_on_interrupt: bool = True
    """On Ctrl-C or SIGTERM: finish the step, save a checkpoint, say where, exit non-zero."""
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl: `tensorboard` (when installed), `wandb` (offline
    without an API key)."""
    wandb_project: str = "grpo"
    """The Weights & Biases project, with report_to: [wandb]."""

    def validate(self, bad) -> None:
        super().validate(bad)
        at_least(self, bad, 1, "max_steps", "micro_batch_size", "logging_steps")
        at_least(self, bad, 0, "save_steps", "save_total_limit", "warmup_steps")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            bad("report_to", f"{unknown} not among {', '.join(REPORTERS)}")
