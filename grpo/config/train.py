"""`grpo train`: every choice of a GRPO run, one key each (docs/design.md, "The maths").

The algorithm keys default to DeepSeekMath's GRPO. A `preset` changes a coherent bundle of them
(PRESETS below lists only what each changes); any key the user sets explicitly wins over it.
Papers: DeepSeekMath (2402.03300), DAPO (2503.14476), Dr. GRPO (2503.20783), GSPO (2507.18071),
CISPO (MiniMax-M1, 2506.13585), GMPO (2507.20673).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from grpo.algorithm import (ADVANTAGE_ESTIMATORS, AGGREGATIONS, KL_ESTIMATORS, OFF_POLICY_CORRECTIONS, POLICY_LOSSES,
                            RATIO_ANCHORS, RATIO_LEVELS)
from grpo.engine.backend import ROLLOUT_BACKENDS
from grpo.engine import vllm_backend  # registers rollout_backend: vllm (vLLM itself loads lazily)
from grpo.engine.generation import STRATEGIES
from grpo.errors import ConfigError

from .common import LoopConfig
from .loading import at_least
from .trl import TRAIN_KEYS as TRL_TRAIN_KEYS
from .trl import translate_train_keys

# reward_timeout's bound, in seconds.
MAX_REWARD_TIMEOUT = 365 * 24 * 3600

# What each preset changes from the defaults (which are `grpo`, DeepSeekMath's).
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "dapo": dict(loss_aggregation="token_mean", epsilon_high=0.28, beta=0.0),
    "dr_grpo": dict(advantage_estimator="none", loss_aggregation="constant_normalizer", beta=0.0),
    "gspo": dict(ratio_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0),
    # No lower bound on the IS weight (the paper's choice), the weight capped at 1 + 4 = 5.
    "cispo": dict(policy_loss="cispo", loss_aggregation="token_mean", epsilon_low=1.0, epsilon_high=4.0,
                  beta=0.0),
    # GMPO's clip band is in log space: the paper's (e^-0.4, e^0.4).
    "gmpo": dict(policy_loss="gmpo", epsilon_low=0.4, epsilon_high=0.4),
}


@dataclass
class RewardSpec:
    """One entry of `rewards:` (a plain string is short for {function: ...})."""
    function: Any = ""
    """A built-in (exact_answer, answer_distance, think_format), path/to/file.py:fn or
    package.module:fn; from Python also the function itself (sync or async def)."""
    model: str = ""
    """A reward-model directory (`grpo reward-model train` saves one, of any kind), or a list of
    them: an ensemble, combined by `ensemble`."""
    weight: float = 1.0
    """Its weight in the sum of rewards; 0 logs it without rewarding it."""
    name: str = ""
    """Its name in metrics (rewards/<name>/mean); default: the function's name, or rm_<directory>."""
    normalize: bool = False
    """Reward models only: standardise scores with running moments of every score seen so far."""
    batch_size: int = 64
    """Reward models: sequences per scoring forward; judges: judge prompts per generation batch."""
    max_length: int = 1024
    """Reward models: tokens of prompt + completion scored; judges: tokens of the judge prompt. A
    longer text loses its start."""
    clip: float = 0.0
    """Reward models only: the (normalised) score is clipped to [-clip, clip]; 0: not clipped."""
    ensemble: str = "mean"
    """Reward-model ensembles only: `mean` of the members' scores, or `min` (worst case: a
    completion scores well only when every member agrees; Coste et al. 2023)."""
    per: str = ""
    """What one call of the reward scores. `completion`: each completion (TRL's contract, all N in
    one call). `group`: functions only, called once per group, fn(prompt, completions, **row
    columns) -> G scores or a ranking. `step`: each step of each completion (process supervision,
    `advantage_estimator: process`): the function also gets `steps`, each completion's step texts,
    and returns a list of scores per completion; a `model` is then a process reward model
    (`grpo reward-model train --kind process`). "": `group` when the function's first parameter is
    named `prompt`, else `completion`."""
    judge: str = ""
    """A listwise judge: a causal LM directory (any from_pretrained one) that ranks each group's
    G completions in one prompt (RULER-style); the ranking becomes scores in [0, 1]."""
    template: str = ""
    """Judges only: the judge's prompt, inline or a file, with {prompt}, {candidates} and {n};
    "": the built-in one (docs/rewards.md)."""
    max_new_tokens: int = 32
    """Judges only: tokens of the judge's answer at most."""

    FIELDS: ClassVar[tuple] = ("function", "model", "weight", "name", "normalize", "batch_size", "max_length",
                               "clip", "ensemble", "per", "judge", "template", "max_new_tokens")

    @classmethod
    def parse(cls, spec: Any, where: str, bad) -> "RewardSpec":
        if isinstance(spec, str) or callable(spec):
            spec = {"function": spec}
        if not isinstance(spec, dict):
            bad(where, f"expected a mapping like {{function: exact_answer, weight: 1.0}}, got {spec!r}")
        function = spec.get("function")
        if function and not (isinstance(function, str) or callable(function)):
            bad(f"{where}.function", f"expected a name, file.py:fn, module:fn or a Python function, got {function!r}")
        unknown = set(spec) - set(cls.FIELDS)
        if unknown:
            bad(where, f"unknown field(s) {sorted(unknown)}; allowed: {sorted(cls.FIELDS)}")
        if sum(bool(spec.get(k)) for k in ("function", "model", "judge")) != 1:
            bad(where, "give exactly one of 'function' (built-in name, file.py:fn or module:fn), "
                       "'model' (a reward model directory) or 'judge' (a causal LM directory that ranks each group)")
        if spec.get("judge") and any(k in spec for k in ("normalize", "clip", "ensemble")):
            bad(where, "normalize, clip and ensemble apply to reward models ({model: DIR}), not to a judge")
        only_judges = sorted(k for k in ("template", "max_new_tokens") if k in spec)
        if only_judges and not spec.get("judge"):
            bad(where, f"{only_judges} apply to judges ({{judge: DIR}}) only")
        if spec.get("judge") is not None and not isinstance(spec.get("judge"), str):
            bad(f"{where}.judge", f"expected a directory, got {spec['judge']!r}")
        if spec.get("template") is not None and not isinstance(spec.get("template"), str):
            bad(f"{where}.template", f"expected the template's text or a file, got {spec['template']!r}")
        only_models = sorted(k for k in ("normalize", "batch_size", "max_length", "clip", "ensemble") if k in spec)
        if spec.get("function") and only_models:
            bad(where, f"{only_models} apply to reward models ({{model: DIR}}), not to a function")
        models = spec.get("model")
        if isinstance(models, list) and not (models and all(isinstance(m, str) and m for m in models)):
            bad(f"{where}.model", f"expected a directory or a non-empty list of directories, got {models!r}")
        if spec.get("per", "") not in ("", "completion", "group", "step"):
            bad(f"{where}.per", f"{spec['per']!r} is not one of completion, group, step")
        if spec.get("per") == "group" and not spec.get("function"):
            bad(f"{where}.per", "group applies to functions ({function: file.py:fn, per: group}), not to reward "
                                "models or judges")
        if spec.get("per") == "step" and spec.get("judge"):
            bad(f"{where}.per", "a judge ranks whole completions; per: step takes a function or a process reward model")
        if spec.get("per") == "step" and isinstance(spec.get("model"), list):
            bad(f"{where}.per", "per: step takes one process reward model directory, not an ensemble")
        if spec.get("ensemble", "mean") not in ("mean", "min"):
            bad(f"{where}.ensemble", f"{spec['ensemble']!r} is not one of mean, min")
        for key, kind in (("weight", (int, float)), ("batch_size", int), ("max_length", int), ("clip", (int, float)),
                          ("max_new_tokens", int)):
            value = spec.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                bad(f"{where}.{key}", f"expected a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                bad(f"{where}.{key}", f"expected a finite number, got {value}")
        for key in ("batch_size", "max_length", "max_new_tokens"):
            if spec.get(key, 1) < 1:
                bad(f"{where}.{key}", f"must be >= 1, got {spec[key]}")
        if spec.get("clip", 0) < 0:
            bad(f"{where}.clip", f"must be >= 0 (0: not clipped), got {spec['clip']}")
        return cls(**spec)


@dataclass
class IterativeSpec:
    """`iterative_rl:` DeepSeekMath's iterative RL (section 4.2, Algorithm 1): every `every` steps
    the reward model is trained further on pairs from the current policy's own samples."""
    every: int = 0
    """GRPO steps per round; 0: off (the reward model stays as loaded)."""
    labeler: str = "exact_answer"
    """The reward function that labels the policy's samples (a built-in, file.py:fn or module:fn):
    two samples of one prompt with different labels make a pair, the higher one chosen."""
    prompts: int = 256
    """Training prompts sampled per round (their own draw order, not the training batches')."""
    samples_per_prompt: int = 8
    """Completions sampled per prompt, with the run's sampling settings."""
    pairs_per_prompt: int = 2
    """Preference pairs kept per prompt, at most."""
    steps: int = 50
    """Optimizer steps of the reward model per round (its AdamW state carries over rounds)."""
    batch_size: int = 32
    """Pairs per reward-model step."""
    learning_rate: float = 1e-4
    """The reward model's learning rate."""
    replay: float = 0.1
    """The share of each batch drawn from the pairs of earlier rounds and of `replay_dataset`
    (DeepSeekMath: 10% of historical data)."""
    replay_dataset: str = ""
    """The reward model's original preference pairs (a file), replayed from the first round on."""
    nll_coef: float = 1.0
    """likelihood / dpo reward models: weight of the NLL of the chosen completion."""
    reset_reference: bool = True
    """Each round pi_ref <- pi_theta (Algorithm 1, line 2): the KL then measures the drift within
    one round."""

    FIELDS: ClassVar[tuple] = ("every", "labeler", "prompts", "samples_per_prompt", "pairs_per_prompt", "steps",
                               "batch_size", "learning_rate", "replay", "replay_dataset", "nll_coef",
                               "reset_reference")

    @classmethod
    def parse(cls, spec: Any, where: str, bad) -> "IterativeSpec":
        if not isinstance(spec, dict):
            bad(where, f"expected a mapping like {{every: 25, labeler: exact_answer}}, got {spec!r}")
        unknown = set(spec) - set(cls.FIELDS)
        if unknown:
            bad(where, f"unknown field(s) {sorted(unknown)}; allowed: {sorted(cls.FIELDS)}")
        out = cls(**spec)
        for key in ("learning_rate", "replay", "nll_coef"):
            value = getattr(out, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                bad(f"{where}.{key}", f"expected a finite number, got {value!r}")
        for key, kind in (("labeler", str), ("replay_dataset", str), ("reset_reference", bool)):
            if not isinstance(getattr(out, key), kind):
                bad(f"{where}.{key}", f"expected {kind.__name__}, got {getattr(out, key)!r}")
        for key in ("every", "prompts", "samples_per_prompt", "pairs_per_prompt", "steps", "batch_size"):
            value = getattr(out, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "every" else 1):
                bad(f"{where}.{key}", f"expected an integer >= {0 if key == 'every' else 1}, got {value!r}")
        if out.samples_per_prompt < 2:
            bad(f"{where}.samples_per_prompt", "must be >= 2: pairs are made of two samples of one prompt")
        if not 0 <= out.replay < 1:
            bad(f"{where}.replay", f"must be in [0, 1), got {out.replay}")
        if out.learning_rate <= 0 or out.nll_coef < 0:
            bad(where, "learning_rate must be > 0 and nll_coef >= 0")
        return out


@dataclass
class TrainConfig(LoopConfig):
    # iterative_rl: its replay_dataset and labeler; step_splitter: file.py:fn as a reward's (see CommonConfig)
    PATHS: ClassVar[dict] = {"iterative_rl": "iterative", "step_splitter": "function"}
    CHOICES: ClassVar[dict] = {
        "preset": tuple(PRESETS),
        "generation": STRATEGIES,
        "rollout_backend": ROLLOUT_BACKENDS.names,
        "advantage_estimator": ADVANTAGE_ESTIMATORS.names,
        "policy_loss": POLICY_LOSSES.names,
        "ratio_level": RATIO_LEVELS,
        "ratio_anchor": RATIO_ANCHORS,
        "kl_estimator": KL_ESTIMATORS,
        "loss_aggregation": AGGREGATIONS,
        "off_policy_correction": OFF_POLICY_CORRECTIONS,
        "mlp_activations": ("auto", "recompute", "keep"),
    }
    # TRL's names for the same keys (more in grpo.config.trl, which translates values too).
    ALIASES: ClassVar[dict] = {"scale_rewards": "advantage_estimator", "num_generations": "group_size",
                               "importance_sampling_level": "ratio_level", "reward_funcs": "rewards",
                               "steps_per_generation": "num_minibatches"}
    TRL_KEYS: ClassVar[dict] = TRL_TRAIN_KEYS
    # The fields of each entry of a list-valued key (for `grpo config train`).
    NESTED: ClassVar[dict] = {"rewards": RewardSpec, "iterative_rl": IterativeSpec}
    TOPICS: ClassVar[dict] = {
        "model": ("model_init_kwargs", "peft", "merge_adapter"),
        "data": ("eval_dataset", "dataset_test_split", "shuffle_dataset"),
        "generation": ("prompts_per_step", "group_size", "generation", "rollout_backend", "max_completion_length",
                       "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs",
                       "dynamic_sampling", "max_generation_rounds", "vllm_gpu_memory_utilization",
                       "vllm_max_model_len", "vllm_enable_sleep_mode", "vllm_tensor_parallel_size", "vllm_lora"),
        "rewards": ("rewards", "accuracy_reward", "reward_timeout", "reward_kl_coef", "iterative_rl",
                    "step_delimiter", "step_splitter"),
        "agents": ("tools", "environment_factory", "rollout_func", "max_turns", "tool_timeout",
                   "parallel_tool_calls"),
        "algorithm": ("preset", "advantage_estimator", "advantage_eps", "policy_loss", "ratio_level",
                      "ratio_anchor", "epsilon_low", "epsilon_high", "delta", "beta", "kl_estimator",
                      "loss_aggregation", "mask_truncated_completions", "num_iterations", "num_minibatches",
                      "off_policy_correction", "off_policy_cap", "top_entropy_quantile", "sync_ref_model",
                      "ref_model_sync_steps", "ref_model_mixup_alpha", "router_aux_loss_coef"),
        "evaluation": ("eval_steps", "eval_max_prompts", "eval_batch_size", "num_generations_eval",
                       "early_stopping_patience", "metric_for_best_model", "greater_is_better",
                       "load_best_model_at_end"),
        "scale": ("fsdp", "gradient_checkpointing", "logprob_chunk_size", "mlp_activations",
                  "malloc_mmap_threshold"),
        "logging and saving": ("samples_steps", "num_samples", "model_card"),
    }

    # ---- model
    model_init_kwargs: dict = field(default_factory=dict)
    """Passed to from_pretrained for the policy and the reference, as TRL's: e.g.
    {attn_implementation: sdpa, trust_remote_code: true}; the trained weights stay float32."""
    peft: dict = field(default_factory=dict)
    """LoRA through peft ({r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}); {}: full
    fine-tuning. The reference is the base model with the adapter off: beta > 0 costs no copy.
    QLoRA: `quantization: nf4` (or fp4) stores the base's Linear layers in 4 bits (bitsandbytes,
    extra grpo[qlora]), `double_quant: true` quantizes their scales too (arXiv:2305.14314)."""
    merge_adapter: bool = False
    """With peft: the output directory holds the merged model (plain transformers loads it) and
    adapter/ the adapter; otherwise it holds the adapter."""

    # ---- data
    eval_dataset: Any = ""
    """Held-out prompts (any form `dataset` takes): accuracy and reward of greedy completions (or
    num_generations_eval samples) before, during (eval_steps) and after training."""
    dataset_test_split: str = "test"
    """The split of `eval_dataset` to evaluate on when it has several (TRL's script argument)."""
    shuffle_dataset: bool = True
    """Draw prompts in a fresh random order each pass over the dataset; false: in file order."""

    # ---- generation
    prompts_per_step: int = 8
    """P: prompts per step and process."""
    group_size: int = 8
    """G, the seed's K: completions per prompt; each group is its own baseline."""
    generation: str = "sample"
    """How a group is made: `sample` (G i.i.d. samples, the papers), `beam` (the G best beams of
    one beam search, the seed's reading; deterministic) or `stochastic_beam` (G distinct samples
    without replacement, Kool et al. 2019)."""
    rollout_backend: str = "local"
    """The engine that generates (registered in grpo.engine.backend): `local` samples the training
    model itself; `vllm` runs vLLM's engine in the training process on a copy of the policy,
    synced after every optimizer step (TRL's use_vllm with vllm_mode colocate; docs/vllm.md);
    under torchrun each process runs its own engine on its own prompts (with fsdp, the sharded
    policy is gathered into it one layer at a time).
    With vllm, off_policy_correction defaults to token and off_policy_cap to TRL's 3."""
    max_completion_length: int = 256
    """Tokens per completion at most; a completion without EOS by then is "truncated"."""
    temperature: float = 1.0
    """Sampling temperature; log-probs in the loss use the same tempered distribution."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding top_p of the mass; 1 disables it."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 disables it."""
    min_p: float = 0.0
    """Sampling: drop tokens whose probability is below min_p times the most likely token's; 0: off."""
    repetition_penalty: float = 1.0
    """Sampling: the logit of every token already in the prompt or the completion is divided by it
    (multiplied when negative), as in Hugging Face and vLLM; 1: off."""
    generation_kwargs: dict = field(default_factory=dict)
    """TRL's bag of sampling options: its temperature, top_p, top_k, min_p, repetition_penalty and
    max_new_tokens entries override those keys."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (section 3.2): groups whose rewards all tie (zero variance, so zero
    advantage and no policy gradient) are dropped, and more prompts are generated until the step
    holds prompts_per_step groups that teach. Each extra round costs a generation pass; it pays
    where many groups tie: a task the policy mostly fails, or, later in a run, mostly solves."""
    max_generation_rounds: int = 4
    """With dynamic_sampling: generation calls per step at most, each of at most prompts_per_step
    prompts; a batch still short after them is topped up with tied groups (logged)."""

    vllm_gpu_memory_utilization: float = 0.3
    """rollout_backend vllm: the share of the GPU's memory vLLM takes for its weights and KV cache
    (TRL's default for colocate is 0.3: the trainer needs the rest). On a CPU the KV cache is sized
    for one step's sequences instead."""
    vllm_max_model_len: int = 0
    """rollout_backend vllm: prompt + completion tokens per sequence at most; 0: the model's own
    maximum. Smaller values leave more room for the KV cache."""
    vllm_enable_sleep_mode: bool = False
    """rollout_backend vllm: free vLLM's KV cache and offload its weights after each rollout, and
    wake it before the next one, so the update has the memory (GPU only: vLLM has no sleep mode on
    a CPU)."""
    vllm_tensor_parallel_size: int = 1
    """rollout_backend vllm: GPUs one engine is split over; only 1 (one engine per training
    process) is supported yet."""
    vllm_lora: str = "merge"
    """rollout_backend vllm with peft: how the LoRA policy reaches the engine after each optimizer
    step. `merge`: W + (alpha / r) B A computed per adapted layer and loaded as full weights;
    `adapter`: the adapter alone, saved and loaded through vLLM's LoRA support (enable_lora),
    which then adds B A x in every forward (not with fsdp). Which is faster: docs/benchmarks.md."""

    # ---- rewards
    rewards: list = field(default_factory=lambda: [])
    """The rewards, summed with their weights: [{function: exact_answer}, {model: DIR, weight: 0.5}]."""
    accuracy_reward: str = ""
    """The reward whose value 1.0 means "correct", for the accuracy metrics; "" picks exact_answer
    when it is one of the rewards."""
    reward_timeout: float = 300.0
    """Seconds one call of a reward function may take; after that the run stops with an error
    naming it (a function that never returns would otherwise hang the run, and under torchrun
    every process with it). At most a year (31536000)."""
    reward_kl_coef: float = 0.0
    """KL to the reference in the reward (InstructGPT): r_i - coef * sum_t (l_t - l_ref_t) before the
    advantages; 0: none (beta is the KL in the loss)."""
    iterative_rl: dict = field(default_factory=dict)
    """Iterative RL (DeepSeekMath section 4.2): keep training the reward model on the policy's own
    samples, labelled by a verifier; {}: off. Fields below."""
    step_delimiter: str = "\n"
    """Process supervision: a step of a completion ends just after each occurrence of this text (a
    newline, or a token's text such as "<step>"); a completion without it is one step."""
    step_splitter: Any = ""
    """Process supervision, instead of step_delimiter: path/to/file.py:fn (in a config file relative
    to it) or module:fn (from Python the function itself), fn(completion: str) -> the character
    offsets where its steps end."""

    # ---- agents
    tools: list = field(default_factory=list)
    """Functions the model may call during an episode (docs/agents.md): path/to/file.py:fn or
    package.module:fn; from Python also the functions themselves. Each needs a type hint on every
    argument and a Google-style docstring; the chat template shows them to the model."""
    environment_factory: Any = ""
    """An environment class, one instance per episode, reset(**row) at its start: its public
    methods are tools (TRL's environment_factory), or it has step(text) (a text environment). Its
    reward, when it has one, is one more reward column named after the class, weight 1."""
    rollout_func: Any = None
    """Python only: rollout_func(prompts, trainer) runs the episodes itself and returns a list of
    grpo.agents.Episode or TRL's dict of prompt_ids, completion_ids, logprobs (and env_mask)."""
    max_turns: int = 10
    """Model turns per episode at most (TRL's max_tool_calling_iterations is max_turns - 1)."""
    tool_timeout: float = 60.0
    """Seconds one tool call may take; a call that overruns is an error the model reads."""
    parallel_tool_calls: bool = False
    """The calls of one turn run at once (independent tools) instead of in the order written."""

    # ---- algorithm
    preset: str = "grpo"
    """A bundle of algorithm keys (grpo: DeepSeekMath; dapo; dr_grpo; gspo; cispo; gmpo); keys you set win."""
    advantage_estimator: str = "group"
    """The registered advantage estimator: group ((r - mean) / std in the group, DeepSeekMath),
    batch (std over the whole batch), none (r - mean, Dr. GRPO), rloo (leave-one-out mean),
    reinforce_pp / reinforce_pp_baseline (REINFORCE++), priority (stochastic_beam groups), rank
    (centred ranks within the group, ties at their mean rank: blind to the rewards' scale), process
    (step rewards to per-token advantages, DeepSeekMath's process supervision; rewards with per: step)."""
    advantage_eps: float = 1e-4
    """Added to the standard deviation before dividing."""
    policy_loss: str = "ppo_clip"
    """The registered policy loss: ppo_clip (PPO's clipped surrogate, DeepSeekMath eq. 3), cispo
    (clipped importance weight on the REINFORCE term, MiniMax-M1) or gmpo (geometric mean of the
    token terms; its epsilons are log-space bounds)."""
    ratio_level: str = "token"
    """The importance ratio per token (PPO) or per sequence (GSPO's length-normalised ratio)."""
    ratio_anchor: str = "old"
    """The ratio's denominator: `old` (pi_old, the papers) or `reference` (pi_ref, the seed notes'
    "Loss" section)."""
    epsilon_low: float = 0.2
    """The clip band's lower side: ratios below 1 - epsilon_low are clipped (1: no lower bound)."""
    epsilon_high: float = 0.2
    """The clip band's upper side: 1 + epsilon_high (DAPO's clip-higher raises it to 0.28)."""
    delta: float = 0.0
    """Two-sided clipping (INTELLECT-2, TRL's `delta`): the unclipped ratio is also capped at delta,
    so a token with negative advantage and a huge ratio cannot blow up the loss; 0: off, else
    > 1 + epsilon_high (above the clip band)."""
    beta: float = 0.04
    """The KL penalty's weight; 0 loads no reference model at all."""
    kl_estimator: str = "k3"
    """The per-token estimator of KL(pi_theta || pi_ref): k1, k2, or k3 (DeepSeekMath eq. 4)."""
    loss_aggregation: str = "sequence_mean"
    """How token losses become one number: sequence_mean (DeepSeekMath), token_mean (DAPO),
    constant_normalizer (Dr. GRPO), group_sum (the seed notes)."""
    mask_truncated_completions: bool = False
    """DAPO's overlong filtering: leave truncated completions out of the loss."""
    num_iterations: int = 1
    """mu: passes over each rollout (more than 1 makes pi_old differ from pi_theta)."""
    num_minibatches: int = 1
    """Optimizer steps per pass, each over whole groups."""
    off_policy_correction: str = "none"
    """Truncated importance sampling from the distribution completions were drawn from (with its
    top_k/top_p) to the trainer's pi_old: none, token (a weight per token) or sequence (one per
    completion). generation: sample only. Default: none, or token with rollout_backend vllm."""
    off_policy_cap: float = 2.0
    """C in the weight min(pi_old / pi_sampler, C) (verl's rollout_is_threshold; TRL's
    vllm_importance_sampling_cap, now vllm_importance_sampling_clip_max). Default: 2, or TRL's 3
    with rollout_backend vllm."""
    top_entropy_quantile: float = 1.0
    """rho: only the top rho of the batch's tokens by entropy get the policy gradient (0.2 in
    "Beyond the 80/20 rule"); 1 keeps every token. Below 1 it needs a per-token surrogate: not
    gmpo, nor ratio_level sequence (except with cispo)."""
    sync_ref_model: bool = False
    """TR-DPO's reference update: every ref_model_sync_steps optimizer steps
    pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref (needs a reference: beta > 0)."""
    ref_model_sync_steps: int = 512
    """tau: optimizer steps between two reference updates, with sync_ref_model."""
    ref_model_mixup_alpha: float = 0.6
    """alpha: the policy's share in each reference update, with sync_ref_model (1 copies it)."""
    router_aux_loss_coef: float = 0.0
    """Mixture-of-experts models: weight of the router's load-balancing loss added to the GRPO loss
    (e.g. Mixtral's 0.02); 0: none."""

    # ---- evaluation
    eval_steps: int = 0
    """Every N steps the held-out set is evaluated; 0: only before and after training."""
    eval_max_prompts: int = 500
    """Held-out prompts used (the first N rows)."""
    eval_batch_size: int = 256
    """Prompts per greedy generation batch in evaluation."""
    num_generations_eval: int = 1
    """Completions per held-out prompt: 1 is one greedy completion; more are sampled as in
    training, and the held-out numbers are their means."""
    early_stopping_patience: int = 0
    """Stop after this many held-out evaluations without a new best metric_for_best_model; 0: never."""
    metric_for_best_model: str = "eval_accuracy"
    """The held-out number early stopping and load_best_model_at_end watch: eval_accuracy, eval_reward
    or eval_<a logged held-out metric>, TRL's spelling; the logged name (eval/accuracy) is accepted too."""
    greater_is_better: bool = True
    """Whether a larger metric_for_best_model is better."""
    load_best_model_at_end: bool = False
    """The final model is the best held-out evaluation's (kept as best-model/ in output_dir)."""

    # ---- scale
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state over the processes with
    PyTorch's FSDP2 (per decoder layer, then the root); checkpoints are sharded
    (torch.distributed.checkpoint), the final model is gathered into one directory."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them."""
    logprob_chunk_size: int = -1
    """Scored tokens per pass through the LM head, so the [tokens x vocabulary] logits never exist
    at once (forward or backward); 0: all at once; -1: 128 when the vocabulary has 65,536
    tokens or more (Qwen2's 151,936: a 128 x 151,936 float32 chunk is 78 MB), else all at once."""
    mlp_activations: str = "auto"
    """What a Llama-style MLP, down(silu(gate(x)) * up(x)), keeps for the backward on the packed
    fast path: `recompute`: gate(x) and up(x) only, silu and the product recomputed in a
    hand-written backward (half the MLP's activation memory, same gradients); `keep`: all four
    tensors, as autograd does; `auto`: recompute for vocabularies of 65,536 tokens or more (real
    LLMs, as logprob_chunk_size), keep for the small models of tests and the demo."""
    malloc_mmap_threshold: int = -1
    """CPU, glibc: tensors of this many bytes or more are handed back to the operating system when
    freed (mallopt M_MMAP_THRESHOLD, as the MALLOC_MMAP_THRESHOLD_ variable) instead of staying in
    the process's heap, where glibc's own moving threshold keeps everything up to 32 MiB
    (grpo.runtime.host_memory); 0: glibc's default; -1: 1 MiB on a CPU when the vocabulary has
    65,536 tokens or more (as logprob_chunk_size), else glibc's default. No effect on CUDA."""

    # ---- logging and saving
    save_steps: int = 100
    """Every N steps a resumable checkpoint-N/ is written; 0 keeps only the final model."""
    save_total_limit: int = 3
    """Checkpoints kept (the oldest are deleted); 0 keeps every checkpoint."""
    samples_steps: int = 0
    """Every N steps (and at step 1) a table of sample completions goes to the console and samples.jsonl; 0: never."""
    num_samples: int = 4
    """Completions per sample table."""
    model_card: bool = True
    """Write README.md (a Hugging Face model card: base model, data, config, held-out results)
    beside the final model, as push_to_hub would (nothing is uploaded)."""

    @classmethod
    def expand(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """TRL's spellings (grpo.config.trl), then the preset's bundle under the user's own keys."""
        values = translate_train_keys(values, source)
        if values.get("rollout_backend") == "vllm" and values.get("generation", "sample") == "sample":
            # Another engine's numerics: correct towards the distribution tokens were drawn from
            # (truncated importance sampling, TRL's default cap for its vLLM correction).
            values = {"off_policy_correction": "token", "off_policy_cap": 3.0, **values}
        preset = values.get("preset", "grpo")
        if preset not in PRESETS:
            raise ConfigError(f"{source}: preset: {preset!r} is not one of {', '.join(PRESETS)}")
        return {**PRESETS[preset], **values}

    @property
    def scale_rewards(self) -> str:
        """TRL's name for advantage_estimator."""
        return self.advantage_estimator

    def validate(self, bad) -> None:
        super().validate(bad)
        if self.group_size < 2:
            bad("group_size", f"must be >= 2: advantages are relative to the group, got {self.group_size}")
        at_least(self, bad, 1, "prompts_per_step", "num_iterations", "max_completion_length", "eval_max_prompts",
                 "eval_batch_size", "num_samples")
        at_least(self, bad, 0, "top_k", "beta", "epsilon_high", "eval_steps", "samples_steps")
        n = self.prompts_per_step * self.group_size
        if self.num_minibatches < 1 or n % self.num_minibatches:
            bad("num_minibatches", f"must divide prompts_per_step * group_size = {n} into whole "
                                   f"minibatches, got {self.num_minibatches}")
        if (n // self.num_minibatches) % self.group_size:
            bad("num_minibatches", f"each minibatch must hold whole groups of {self.group_size}; "
                                   f"{n} completions / {self.num_minibatches} minibatches does not")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.epsilon_low <= 1:
            bad("epsilon_low", f"must be in [0, 1], got {self.epsilon_low}")
        if self.advantage_eps <= 0:
            bad("advantage_eps", f"must be > 0, got {self.advantage_eps}")
        unknown = set(self.peft) - {"r", "alpha", "dropout", "target_modules", "quantization", "double_quant"}
        if unknown:
            bad("peft", f"unknown field(s) {sorted(unknown)}; allowed: alpha, dropout, double_quant, quantization, r, "
                        "target_modules")
        quantization = self.peft.get("quantization")
        if quantization is not None and quantization not in ("nf4", "fp4"):
            bad("peft.quantization", f"expected nf4 or fp4 (4-bit base, bitsandbytes) or null, got {quantization!r}")
        if self.peft.get("double_quant") and quantization is None:
            bad("peft.double_quant", "quantizes the scales of a 4-bit base: set peft.quantization too")
        if "quantization_config" in self.model_init_kwargs:
            bad("model_init_kwargs", "quantization_config: a quantized base can only be trained through an adapter; "
                                     "set peft.quantization (nf4 or fp4) and peft.double_quant instead")
        if self.merge_adapter and not self.peft:
            bad("merge_adapter", "there is no adapter to merge without peft")
        if self.fsdp and self.peft.get("quantization") is not None:
            bad("fsdp", "a 4-bit base (peft.quantization) is not sharded here: bitsandbytes' 4-bit layers and "
                        "FSDP2 do not go together yet; QLoRA runs on one process or as plain data parallel")
        if self.fsdp and self.dynamic_sampling:
            bad("fsdp", "dynamic_sampling with fsdp is not supported yet: processes that are already full stop "
                        "generating, and a sharded model's generation is a collective every process must join")
        if {"dtype", "torch_dtype"} & set(self.model_init_kwargs):
            bad("model_init_kwargs", "the trained weights stay float32 (master weights); the compute dtype is the "
                                     "`dtype` key: remove dtype / torch_dtype from model_init_kwargs")
        at_least(self, bad, -1, "logprob_chunk_size")
        at_least(self, bad, -1, "malloc_mmap_threshold")
        if self.malloc_mmap_threshold > 32 << 20:
            bad("malloc_mmap_threshold", f"glibc takes at most 32 MiB (33554432), got {self.malloc_mmap_threshold}")
        at_least(self, bad, 0, "router_aux_loss_coef")
        if self.iterative_rl:
            it = IterativeSpec.parse(self.iterative_rl, "iterative_rl", bad)
            if it.every and not any(isinstance(r, dict) and r.get("model") and not isinstance(r["model"], list)
                                    for r in self.rewards):
                bad("iterative_rl", "needs a reward model among the rewards ({model: DIR}) to keep training")
            if it.reset_reference and (self.peft or self.fsdp):
                bad("iterative_rl.reset_reference", "not with peft or fsdp yet")
        at_least(self, bad, 0, "reward_kl_coef", "early_stopping_patience")
        watching = "early_stopping_patience" if self.early_stopping_patience else "load_best_model_at_end"
        if (self.early_stopping_patience or self.load_best_model_at_end) and \
                not (self.eval_dataset and 0 < self.eval_steps <= self.max_steps):
            bad(watching, f"needs an eval_dataset and 0 < eval_steps <= max_steps to watch (eval_steps is "
                          f"{self.eval_steps}): otherwise only the warm start is ever evaluated")
        if (self.early_stopping_patience or self.load_best_model_at_end) and \
                not self.metric_for_best_model.startswith(("eval_", "eval/")):
            bad("metric_for_best_model", f"a held-out number, eval_accuracy or eval_reward (or eval_<a logged "
                                         f"metric>), got {self.metric_for_best_model!r}")
        if self.load_best_model_at_end and self.fsdp:
            bad("load_best_model_at_end", "not with fsdp yet")
        if not 0 < self.reward_timeout <= MAX_REWARD_TIMEOUT:
            bad("reward_timeout", f"must be > 0 and at most {MAX_REWARD_TIMEOUT} seconds (a year: a reward slower "
                                  f"than that is a hang, and Python's thread timeouts end not far above), "
                                  f"got {self.reward_timeout:g}")
        if not self.rewards and not (self.environment_factory or self.rollout_func):
            bad("rewards", "at least one reward is required, e.g. rewards: [{function: exact_answer}]")
        self.validate_agents(bad)
        for i, spec in enumerate(self.rewards):
            RewardSpec.parse(spec, f"rewards[{i}]", bad)
        self.validate_process(bad)
        self.validate_groups_that_teach(bad)
        self.validate_trl_options(bad)
        self.validate_vllm(bad)

    def validate_vllm(self, bad) -> None:
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            bad("vllm_gpu_memory_utilization", f"must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        at_least(self, bad, 0, "vllm_max_model_len")
        at_least(self, bad, 1, "vllm_tensor_parallel_size")
        if self.vllm_lora not in vllm_backend.LORA_SYNCS:
            bad("vllm_lora", f"expected {' or '.join(vllm_backend.LORA_SYNCS)}, got {self.vllm_lora!r}")
        if self.rollout_backend != "vllm":
            return
        if self.vllm_lora == "adapter" and not self.peft:
            bad("vllm_lora", "adapter serves a LoRA adapter through vLLM's LoRA support: set peft, or use merge "
                             "(full fine-tuning has no adapter)")
        largest = vllm_backend.VLLM_LORA_RANKS[-1]
        if self.vllm_lora == "adapter" and isinstance(self.peft.get("r", 16), int) and self.peft.get("r", 16) > largest:
            bad("vllm_lora", f"adapter: vLLM serves LoRA ranks up to {largest}, got peft.r {self.peft['r']}; use merge")
        if self.vllm_tensor_parallel_size != 1:
            bad("vllm_tensor_parallel_size", "a colocated vLLM engine runs on its training process's own device; "
                                             "tensor parallelism across the processes is not supported yet (use 1)")
        if self.vllm_max_model_len and self.vllm_max_model_len < self.max_prompt_length + self.max_completion_length:
            bad("vllm_max_model_len", f"must hold max_prompt_length + max_completion_length = "
                                      f"{self.max_prompt_length + self.max_completion_length} tokens, got "
                                      f"{self.vllm_max_model_len} (0: the model's own maximum)")
        if self.generation != "sample":
            bad("generation", f"{self.generation} is not available with rollout_backend: vllm: vLLM's beam search "
                              f"keeps the best of a candidate list, not this package's exact beams, and has no "
                              f"sampling without replacement; use generation: sample (or rollout_backend: local)")
        if self.fsdp and self.vllm_lora == "adapter":
            bad("vllm_lora", "adapter with fsdp is not supported yet: the sharded adapter would have to be gathered "
                             "before vLLM reads it; use vllm_lora: merge (merged layer by layer)")
        if self.peft.get("quantization") is not None:
            bad("peft.quantization", "rollout_backend: vllm syncs merged float weights; a 4-bit base would have to "
                                     "be dequantized first, which is not supported yet")
        if self.reward_kl_coef:
            bad("reward_kl_coef", "the KL in the reward needs the trainer's log-probs of every generated token, "
                                  "and rollout_backend: vllm returns the sampler's; use beta (the KL in the loss)")

    @property
    def agent(self) -> bool:
        """Episodes of several turns (tools, an environment or the user's rollout_func) make the rollout."""
        return bool(self.tools or self.environment_factory or self.rollout_func)

    def validate_agents(self, bad) -> None:
        at_least(self, bad, 1, "max_turns")
        if self.tool_timeout <= 0:
            bad("tool_timeout", f"must be > 0, got {self.tool_timeout:g}")
        if not isinstance(self.tools, list):
            bad("tools", f"expected a list of file.py:fn, module:fn or functions, got {self.tools!r}")
        if self.rollout_func is not None and not callable(self.rollout_func):
            bad("rollout_func", f"a Python function (train({{..., 'rollout_func': fn}})), got {self.rollout_func!r}")
        if self.rollout_func is not None and (self.tools or self.environment_factory):
            bad("rollout_func", "runs the episodes itself: give it, or tools / environment_factory, not both")
        if self.agent and self.generation != "sample":
            bad("generation", f"episodes with tools or an environment are sampled turn by turn; "
                              f"generation: {self.generation} makes whole groups at once (use sample)")

    def validate_process(self, bad) -> None:
        """Step rewards and the `process` estimator go together, with what per-token advantages allow."""
        per_step = [i for i, r in enumerate(self.rewards) if isinstance(r, dict) and r.get("per") == "step"]
        if per_step and self.advantage_estimator != "process":
            bad(f"rewards[{per_step[0]}].per", f"step rewards need advantage_estimator: process, got "
                                               f"{self.advantage_estimator!r}")
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            bad("step_delimiter", f"expected a non-empty string, got {self.step_delimiter!r}")
        if self.step_splitter and not (isinstance(self.step_splitter, str) or callable(self.step_splitter)):
            bad("step_splitter", f"expected file.py:fn, module:fn or a Python function, got {self.step_splitter!r}")
        if self.advantage_estimator != "process":
            return
        for key, on, why in (("policy_loss", self.policy_loss == "gmpo", "gmpo takes one advantage per sequence"),
                             ("dynamic_sampling", self.dynamic_sampling, "it filters on completion rewards"),
                             ("reward_kl_coef", self.reward_kl_coef > 0, "the KL is in the loss (beta) here"),
                             ("rewards", self.agent and bool(per_step), "an episode's steps are its turns, "
                                                                         "scored by the environment's step")):
            if on:
                bad(key, f"not with advantage_estimator: process ({why})")

    def validate_groups_that_teach(self, bad) -> None:
        at_least(self, bad, 1, "max_generation_rounds")
        if self.off_policy_cap < 1:
            bad("off_policy_cap", f"must be >= 1 (a cap below 1 shrinks even the weights of tokens the sampler "
                                  f"and the trainer agree on), got {self.off_policy_cap}")
        if self.off_policy_correction != "none" and self.generation != "sample":
            bad("off_policy_correction", f"corrects towards the distribution tokens were sampled from; "
                                         f"generation: {self.generation} samples no tokens i.i.d. (use sample)")
        if not 0 < self.top_entropy_quantile <= 1:
            bad("top_entropy_quantile", f"must be in (0, 1], got {self.top_entropy_quantile}")
        coupled = ("policy_loss: gmpo" if self.policy_loss == "gmpo" else
                   "ratio_level: sequence" if self.ratio_level == "sequence" and self.policy_loss != "cispo" else "")
        if self.top_entropy_quantile < 1 and coupled:
            bad("top_entropy_quantile", f"selects the tokens that get a policy gradient, but with {coupled} each "
                                        f"token's loss holds the whole sequence's ratio, so the unselected tokens "
                                        f"still get one through the selected ones; use ppo_clip or cispo at "
                                        f"ratio_level: token (cispo also at sequence level: its weight is a "
                                        f"constant), or top_entropy_quantile: 1")
        if self.advantage_estimator == "priority" and self.generation != "stochastic_beam":
            bad("advantage_estimator", "priority needs the sampling weights of generation: stochastic_beam")
        if self.policy_loss == "gmpo" and self.ratio_level != "token":
            bad("ratio_level", "gmpo clips token log-ratios before their geometric mean: use ratio_level: token")

    def validate_trl_options(self, bad) -> None:
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0 (1 is off), got {self.repetition_penalty}")
        if self.delta and self.policy_loss != "ppo_clip":
            bad("delta", f"two-sided clipping is for policy_loss ppo_clip, not {self.policy_loss}")
        if self.delta and self.delta <= 1 + self.epsilon_high:
            bad("delta", f"caps the ratio from above: must be > 1 + epsilon_high = {1 + self.epsilon_high:g}, above "
                         f"the clip band (0 is off), got {self.delta:g}; a cap inside the band stops the gradient "
                         f"of tokens the band lets through and miscounts the clip statistics")
        at_least(self, bad, 1, "ref_model_sync_steps", "num_generations_eval")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            bad("ref_model_mixup_alpha", f"must be in (0, 1], got {self.ref_model_mixup_alpha}")
        if self.sync_ref_model and (self.peft or self.fsdp):
            bad("sync_ref_model", "moves a reference model of its own: not with peft (the reference is the "
                                  "adapter-free base) nor with fsdp (sharded) yet")
        if self.repetition_penalty != 1.0 and self.generation == "stochastic_beam":
            bad("repetition_penalty", "stochastic_beam draws from the model's own distribution, without a penalty")
        if self.sync_ref_model and self.beta == 0 and self.ratio_anchor != "reference" and not self.reward_kl_coef:
            bad("sync_ref_model", "there is no reference model to update at beta 0; set beta > 0 "
                                  "or sync_ref_model: false")


def preset_overrides(cfg: TrainConfig) -> dict[str, tuple]:
    """The keys of cfg's preset that the user set otherwise: {key: (preset's value, the run's)}."""
    return {k: (v, getattr(cfg, k)) for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) != v}
