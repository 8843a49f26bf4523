"""The keys every command shares (`CommonConfig`) and those of every command that trains (`LoopConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from grpo.data.prompts import CHAT_TEMPLATE_MODES
from grpo.engine.models import DEVICES, DTYPES

from .loading import at_least

LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORTERS = ("tensorboard", "wandb")
# Hugging Face's `optim` names for the optimizers `grpo.runtime.optim` builds.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "rmsprop")


@dataclass
class CommonConfig:
    CHOICES: ClassVar[dict] = {"device": DEVICES, "dtype": ("auto", *DTYPES),
                               "apply_chat_template": CHAT_TEMPLATE_MODES}
    # Keys holding paths, and how a relative one in a config file is resolved (loading.resolve_paths):
    # `dir` against the file's directory when it exists there (else a hub id), `data` likewise or
    # when it names a data file, `rewards` the files and directories of `rewards:` entries, `out`
    # (what a command writes) against the working directory, as Hugging Face's Trainer. A leading
    # `~` is the home directory in all of them.
    PATHS: ClassVar[dict] = {"model": "dir", "dataset": "data", "eval_dataset": "data", "rewards": "rewards"}
    # The keys this class adds, by topic: `grpo config` prints every key under its topic's heading
    # (loading.topics merges the tables of a class hierarchy); the fields are written in this order.
    TOPICS: ClassVar[dict] = {
        "model": ("model",),
        "data": ("dataset", "dataset_config", "dataset_train_split", "rename_columns", "prompt_column",
                 "apply_chat_template", "chat_template_kwargs", "max_prompt_length"),
        "optimisation": ("seed",),
        "scale": ("device", "dtype", "num_threads"),
    }

    # ---- model
    model: str = ""
    """The model: a local directory or a hub id, loaded with `from_pretrained`. In a config file a
    relative directory is relative to the config file."""

    # ---- data
    dataset: Any = ""
    """The data: a JSONL, CSV or Parquet file (bad rows reported as file:line); any other file the
    `datasets` library reads (.json array, .arrow, .tsv, .txt); a `save_to_disk` directory; a
    Hugging Face Hub id; from Python also a datasets.Dataset, DatasetDict or list of dicts. In a
    config file a relative path is relative to the config file."""
    dataset_config: str = ""
    """The configuration of a hub dataset with several (e.g. `main` for openai/gsm8k)."""
    dataset_train_split: str = "train"
    """The split of `dataset` to train on when it has several (TRL's script argument)."""
    rename_columns: dict = field(default_factory=dict)
    """Dataset columns renamed on load, {old: new}, e.g. {question: prompt, solution: answer}."""
    prompt_column: str = "prompt"
    """The dataset column holding the prompt (text, or a list of chat messages)."""
    apply_chat_template: str = "auto"
    """`auto` (TRL's rule): chat messages go through the tokenizer's chat template, plain text is
    used as is; `always`: plain text too, as one user turn; `never`: plain text as is (chat
    messages always need a template)."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the tokenizer's chat template, e.g. {enable_thinking: false} for Qwen3."""
    max_prompt_length: int = 512
    """Prompt tokens kept; a longer prompt loses its start (the end, next to the answer, stays)."""

    # ---- optimisation
    seed: int = 0
    """Seeds every random number generator of the run (sampling, data order, initialisation)."""

    # ---- scale
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
        if self.dataset is None or (isinstance(self.dataset, str) and not self.dataset):
            bad("dataset", "required: a data file, a save_to_disk directory or a hub id")
        at_least(self, bad, 1, "max_prompt_length")
        at_least(self, bad, 0, "num_threads")


@dataclass
class LoopConfig(CommonConfig):
    CHOICES: ClassVar[dict] = {"lr_scheduler": LR_SCHEDULERS, "optim": OPTIMIZERS}
    PATHS: ClassVar[dict] = {"output_dir": "out"}
    # Hugging Face TrainingArguments' names for the same keys.
    ALIASES: ClassVar[dict] = {"lr_scheduler_type": "lr_scheduler"}
    TOPICS: ClassVar[dict] = {
        "optimisation": ("max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "optim",
                         "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm"),
        "scale": ("micro_batch_size",),
        "logging and saving": ("output_dir", "logging_steps", "report_to", "wandb_project", "save_steps",
                               "save_total_limit", "save_on_interrupt"),
    }

    # ---- optimisation
    max_steps: int = 100
    """Training steps (for `grpo train`: rollouts; each may hold several optimizer steps)."""
    learning_rate: float = 1e-6
    """AdamW's peak learning rate."""
    lr_scheduler: str = "constant"
    """The learning rate after warm-up: constant, or a linear or cosine decay to 0 at the last step."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to learning_rate."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all optimizer steps (ceil); 0: use warmup_steps."""
    optim: str = "adamw_torch"
    """The optimizer (Hugging Face's names): adamw_torch, adamw_torch_fused (CPU or CUDA; TRL's default), adafactor
    (torch.optim.Adafactor, no momentum), sgd, rmsprop."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.99
    """AdamW's second-moment decay."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon, added to the second-moment root."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, applied to matrices only (not to norms and biases)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm; 0 disables clipping."""

    # ---- scale
    micro_batch_size: int = 64
    """Sequences per forward/backward pass; the rest of a batch is gradient accumulation, which
    changes memory, never the gradient."""

    # ---- logging and saving
    output_dir: str = "runs/grpo"
    """Where the run writes its model, checkpoints, metrics and samples; relative to the working
    directory (as Hugging Face's Trainer), also in a config file."""
    logging_steps: int = 1
    """Every N steps a line goes to metrics.jsonl, TensorBoard and the console."""
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl: `tensorboard` (when installed), `wandb` (offline
    without an API key)."""
    wandb_project: str = "grpo"
    """The Weights & Biases project, with report_to: [wandb]."""
    save_steps: int = 0
    """Every N steps a resumable checkpoint-N/ is written; 0 keeps only the final model."""
    save_total_limit: int = 0
    """Checkpoints kept (the oldest are deleted); 0 keeps every checkpoint."""
    save_on_interrupt: bool = True
    """On Ctrl-C or SIGTERM: finish the step, save a checkpoint, say where, exit non-zero."""

    @classmethod
    def expand(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """TRL's and Hugging Face's spellings of these keys (grpo.config.trl)."""
        from .trl import translate_loop_keys
        return translate_loop_keys(values, source)

    def validate(self, bad) -> None:
        super().validate(bad)
        if not self.output_dir.strip():
            bad("output_dir", "required: the directory the run writes its model, checkpoints and metrics to")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            bad("output_dir", f"{self.output_dir} is a file, not a directory")
        at_least(self, bad, 1, "max_steps", "micro_batch_size", "logging_steps")
        at_least(self, bad, 0, "save_steps", "save_total_limit", "warmup_steps")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            bad("warmup_ratio", "give warmup_steps or warmup_ratio, not both")
        if self.adam_epsilon <= 0:
            bad("adam_epsilon", f"must be > 0, got {self.adam_epsilon}")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            bad("report_to", f"{unknown} not among {', '.join(REPORTERS)}")
