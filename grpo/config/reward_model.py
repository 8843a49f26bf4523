"""`grpo reward-model train | eval | score | make-preferences`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .common import CommonConfig, LoopConfig
from .loading import at_least


@dataclass
class PreferenceColumns:
    TOPICS: ClassVar[dict] = {
        "data": ("chosen_column", "rejected_column", "margin_column", "completions_column", "labels_column"),
    }

    # ---- data
    chosen_column: str = "chosen"
    """The preferred completion of a pair (text or chat messages)."""
    rejected_column: str = "rejected"
    """The other completion of the pair."""
    margin_column: str = "margin"
    """An optional per-pair margin for the Bradley-Terry loss; a missing value means 0."""
    completions_column: str = "completions"
    """A file whose rows have this column holds rankings, not pairs: the completions best to worst,
    an entry that is a list being a tie group; trained with the Plackett-Luce loss."""
    labels_column: str = "labels"
    """Rankings: an optional verifier label per completion (in written order), for eval's
    correct-vs-wrong accuracy."""


@dataclass
class RewardModelConfig(PreferenceColumns, LoopConfig):
    """`grpo reward-model train`. `model` is the backbone: any causal LM directory or hub id."""
    CHOICES: ClassVar[dict] = {"kind": ("score_head", "likelihood", "dpo", "process"),
                               "score_reduction": ("mean", "sum")}
    TOPICS: ClassVar[dict] = {
        "data": ("eval_dataset", "eval_fraction", "max_length"),
        "algorithm": ("kind", "nll_coef", "score_reduction", "dpo_beta", "step_separator"),
        "optimisation": ("batch_size",),
        "evaluation": ("eval_steps",),
    }

    # ---- data
    eval_dataset: str = ""
    """Held-out preference pairs; "" holds out eval_fraction of `dataset` instead."""
    eval_fraction: float = 0.1
    """The share of `dataset` held out when there is no eval_dataset."""
    max_length: int = 512
    """Tokens of prompt + completion; a longer text loses its start."""

    # ---- algorithm
    kind: str = "score_head"
    """What scores: `score_head` (a linear head on the backbone, InstructGPT), `likelihood` (the
    completion's log-likelihood under the causal LM itself, a generative verifier), `dpo`
    (DPO's implicit reward dpo_beta * log pi/pi_ref, pi_ref the backbone) or `process` (a process
    reward model: a token-classification head at each step's end, from TRL's PRM data: prompt,
    completions as a list of steps, labels one per step)."""
    nll_coef: float = 0.0
    """likelihood / dpo: weight of the NLL of the chosen completion added to the Bradley-Terry loss
    (0: none); it keeps the scoring model a model of good answers."""
    score_reduction: str = "mean"
    """likelihood: the score is the mean (or the sum) of the completion's token log-probs."""
    dpo_beta: float = 0.1
    """dpo: beta of the implicit reward beta * (log pi(y|x) - log pi_ref(y|x))."""
    step_separator: str = "\n"
    """process: the text after every step; the head is read on its last token."""

    # ---- optimisation
    max_steps: int = 300
    """Optimizer steps."""
    learning_rate: float = 1e-4
    adam_beta2: float = 0.999
    batch_size: int = 32
    """Preference pairs (or rankings) per optimizer step."""

    # ---- evaluation
    eval_steps: int = 50
    """Every N steps the held-out pairs are evaluated; 0: only at the end."""

    # ---- scale
    micro_batch_size: int = 64
    """Pairs per forward/backward pass (twice that many sequences); rankings of K: 2 *
    micro_batch_size / K per pass, about as many sequences."""

    # ---- logging and saving
    output_dir: str = "runs/reward_model"
    """Where the reward model (a directory `rewards: [{model: DIR}]` takes) and its metrics go."""
    logging_steps: int = 10

    def validate(self, bad) -> None:
        super().validate(bad)
        if not 0 <= self.eval_fraction < 1:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        at_least(self, bad, 0, "eval_steps", "nll_coef")
        at_least(self, bad, 1, "batch_size", "max_length")
        if self.dpo_beta <= 0:
            bad("dpo_beta", f"must be > 0, got {self.dpo_beta}")
        if self.kind == "process" and not self.step_separator:
            bad("step_separator", "must be a non-empty string")
        if self.nll_coef and self.kind in ("score_head", "process"):
            bad("nll_coef", f"a {self.kind} reward model has no likelihood to train; use kind: likelihood or dpo")


@dataclass
class RewardModelEvalConfig(PreferenceColumns, CommonConfig):
    """`grpo reward-model eval` (pairwise accuracy on a preference file) and `score`
    (a score for every prompt/completion row)."""
    PATHS: ClassVar[dict] = {"output_file": "out"}
    TOPICS: ClassVar[dict] = {
        "data": ("completion_column", "max_length"),
        "scale": ("seed", "batch_size"),
        "logging and saving": ("output_file",),
    }

    # ---- data
    completion_column: str = "completion"
    """score: the dataset column holding the completion to score."""
    max_length: int = 512
    """Tokens of prompt + completion; a longer text loses its start."""

    # ---- scale
    batch_size: int = 64
    """Sequences per forward pass."""

    # ---- logging and saving
    output_file: str = ""
    """score: where the rows and their score go (.jsonl or .csv)."""

    def validate(self, bad) -> None:
        super().validate(bad)
        at_least(self, bad, 1, "batch_size", "max_length")


@dataclass
class PreferenceConfig(CommonConfig):
    """`grpo reward-model make-preferences`: `model` is the policy that is sampled; `dataset`
    holds the task's prompts and answers."""
    PATHS: ClassVar[dict] = {"output_file": "out"}
    TOPICS: ClassVar[dict] = {
        "data": ("answer_column", "num_prompts"),
        "generation": ("seed", "samples_per_prompt", "temperature", "max_completion_length"),
        "rewards": ("task", "rankings", "rank_by", "correct_pairs_per_prompt", "closer_pairs_per_prompt",
                    "use_reference_answer"),
        "scale": ("batch_size",),
        "logging and saving": ("output_file",),
    }

    # ---- data
    max_prompt_length: int = 64
    """Prompt tokens kept."""
    answer_column: str = "answer"
    """The dataset column holding the reference answer."""
    num_prompts: int = 0
    """Prompts sampled from the dataset; 0: every row."""

    # ---- generation
    samples_per_prompt: int = 8
    """Completions sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_completion_length: int = 8
    """Tokens per sampled completion at most."""

    # ---- rewards
    task: str = "addition"
    """The built-in task whose verifier labels the samples (and, where it has one, whose distance
    ranks two wrong answers)."""
    rankings: int = 0
    """0: preference pairs. K >= 2: one ranking per prompt instead, of up to K distinct samples
    ordered by the task's verifier (right answers tied first), rows {prompt, completions (best
    first, a list = a tie group), labels, answer}."""
    rank_by: str = "verifier"
    """rankings: `verifier` (the wrong answers tied below the right ones) or `distance` (the wrong
    answers ordered closer to farther from the answer, equal distances tied)."""
    correct_pairs_per_prompt: int = 2
    """Correct-vs-incorrect pairs per prompt, at most."""
    closer_pairs_per_prompt: int = 1
    """Closer-vs-farther wrong-answer pairs per prompt, at most."""
    use_reference_answer: bool = True
    """When no sample of a prompt is right, the reference answer stands in as the chosen one."""

    # ---- scale
    batch_size: int = 64
    """Prompts per generation batch."""

    # ---- logging and saving
    output_file: str = "preferences.jsonl"
    """Where the pairs go (JSONL rows: prompt, chosen, rejected, kind, answer)."""

    def validate(self, bad) -> None:
        super().validate(bad)
        at_least(self, bad, 1, "samples_per_prompt", "max_completion_length", "batch_size")
        at_least(self, bad, 0, "num_prompts")
        if self.rank_by not in ("verifier", "distance"):
            bad("rank_by", f"must be one of 'verifier', 'distance'; got {self.rank_by!r}")
        if self.rankings == 1 or self.rankings < 0:
            bad("rankings", f"must be 0 (pairs) or >= 2 (completions per ranking), got {self.rankings}")
        if not self.output_file.strip():
            bad("output_file", "required: the file the preference pairs are written to")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0, got {self.temperature}")


@dataclass
class StepLabelConfig(CommonConfig):
    """`grpo reward-model make-step-labels`: Math-Shepherd's step labels (Wang et al. 2023,
    arXiv:2312.08935) for a process reward model, from the policy `model`'s own samples on the
    prompts and answers of `dataset`."""
    PATHS: ClassVar[dict] = {"output_file": "out", "verifier": "function"}
    TOPICS: ClassVar[dict] = {
        "data": ("answer_column", "num_prompts"),
        "generation": ("seed", "samples_per_prompt", "rollouts_per_step", "temperature", "max_completion_length"),
        "rewards": ("verifier", "step_delimiter", "estimate"),
        "scale": ("batch_size",),
        "logging and saving": ("output_file",),
    }

    # ---- data
    max_prompt_length: int = 64
    """Prompt tokens kept."""
    answer_column: str = "answer"
    """The dataset column holding the reference answer (passed to the verifier as `answer`)."""
    num_prompts: int = 0
    """Prompts sampled from the dataset; 0: every row."""

    # ---- generation
    samples_per_prompt: int = 1
    """Completions sampled per prompt and labelled step by step."""
    rollouts_per_step: int = 8
    """N: continuations sampled from the end of each step to estimate whether it can still reach
    the verified answer."""
    temperature: float = 1.0
    """Sampling temperature (samples and continuations)."""
    max_completion_length: int = 32
    """Tokens per sample at most (a continuation gets what its prefix leaves)."""

    # ---- rewards
    verifier: str = "grpo.recipes.steps:final_answer"
    """The reward function that says whether a whole completion is right (1): file.py:fn or
    module:fn, called with TRL's signature (prompts, completions, and the row's columns)."""
    step_delimiter: str = "\n"
    """A step ends just after each occurrence of this text (as `grpo train`'s step_delimiter)."""
    estimate: str = "hard"
    """`hard`: a step is good when any of its continuations reaches the answer; `soft`: the
    fraction that do (a number in [0, 1]; the PRM trains on it as a soft target)."""

    # ---- scale
    batch_size: int = 64
    """Prompts (with their continuations) per generation batch."""

    # ---- logging and saving
    output_file: str = "step_labels.jsonl"
    """Where the labelled rows go, in TRL's PRM format: prompt, completions (the steps), labels."""

    def validate(self, bad) -> None:
        super().validate(bad)
        at_least(self, bad, 1, "samples_per_prompt", "rollouts_per_step", "max_completion_length", "batch_size")
        at_least(self, bad, 0, "num_prompts")
        if self.estimate not in ("hard", "soft"):
            bad("estimate", f"{self.estimate!r} is not one of hard, soft")
        if not self.step_delimiter:
            bad("step_delimiter", "must be a non-empty string")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0, got {self.temperature}")
        if not self.output_file.strip():
            bad("output_file", "required: the file the labelled steps are written to")
