"""Rollout: prompts -> G completions each -> rewards -> advantages -> old / reference log-probs.

One `Rollout` (a dataclass of tensors) carries a step's data from generation to the update. Rows
p*G .. p*G+G-1 are prompt p's group throughout.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from grpo import algorithm
from grpo.data import as_completion, completion_ids_list, decode_completions, prompt_batch
from grpo.data.sources import META_COLUMNS
from grpo.engine.backend import LocalBackend, RolloutBackend, SamplingParams
from grpo.engine.generation import Generation
from grpo.engine.logprobs import completion_logprobs
from grpo.rewards import score
from grpo.rewards.scoring import RewardLog

from .precision import Precision


@dataclass
class Rollout:
    prompt_ids: torch.Tensor          # [N, Lp] left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor         # [N, Lp]
    completion_ids: torch.Tensor      # [N, T] right-padded
    completion_mask: torch.Tensor     # [N, T] float: 1 on tokens up to and incl. EOS (0 for masked truncated rows)
    truncated: torch.Tensor           # [N] bool: no EOS within max_completion_length
    lengths: torch.Tensor             # [N] generated tokens, EOS included
    rewards: torch.Tensor             # [N] weighted sum of the rewards
    advantages: torch.Tensor          # [N]
    rewards_per_function: dict[str, torch.Tensor]
    old_logprobs: torch.Tensor | None = None   # [N, T] pi_old, when the update needs it
    ref_logprobs: torch.Tensor | None = None   # [N, T] pi_ref, when beta > 0 or the ratio is anchored there
    prompts: list[str] = field(default_factory=list)      # formatted prompt text, one per row
    completions: list[str] = field(default_factory=list)  # decoded completion text, one per row
    timings: dict[str, float] = field(default_factory=dict)
    reward_log: RewardLog = field(default_factory=RewardLog)  # what reward functions logged (TRL's hooks)

    def __len__(self) -> int:
        return self.completion_ids.size(0)


def sampling_params(cfg, group_size: int | None = None) -> SamplingParams:
    return SamplingParams(group_size=group_size or cfg.group_size, max_new_tokens=cfg.max_completion_length,
                          strategy=cfg.generation, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          min_p=getattr(cfg, "min_p", 0.0), repetition_penalty=getattr(cfg, "repetition_penalty", 1.0))


def reward_columns(row: dict, prompt_column: str) -> list[str]:
    """The dataset columns reward functions get as keywords: all but the prompt (TRL's rule)."""
    return [k for k in row if k != prompt_column and k not in META_COLUMNS]


@dataclass
class Scored:
    """One batch of prompts, generated and scored (the rollout's and evaluation's common part)."""
    texts: list[str]                 # formatted prompts, one per prompt
    prompt_ids: torch.Tensor         # [P, Lp]
    prompt_mask: torch.Tensor
    generation: Generation           # [P*G, T]
    completions: list[str]           # decoded text, one per completion
    total: torch.Tensor              # [P*G] weighted sum
    per_function: dict[str, torch.Tensor]
    seconds_generate: float = 0.0
    seconds_score: float = 0.0


def score_group(backend: RolloutBackend, tokenizer, rows: list[dict], rewards, cfg, params: SamplingParams,
                generator, *, log: RewardLog | None = None, trainer_state=None, precision: Precision | None = None,
                device=None) -> Scored:
    """G = params.group_size completions for each row's prompt, and their rewards, called with
    TRL's contract (grpo.rewards.scoring): the row's prompt as given (text or messages), each
    completion as text or as one assistant message, the token ids, the columns."""
    G = params.group_size
    t0 = clock(device) if device is not None else time.perf_counter()
    raw = [row[cfg.prompt_column] for row in rows]
    texts, prompt_ids, prompt_mask = prompt_batch(tokenizer, raw, cfg.max_prompt_length, cfg.apply_chat_template,
                                                  cfg.chat_template_kwargs, device)
    with (precision.autocast() if precision is not None else contextlib.nullcontext()):
        out = backend.generate(prompt_ids, prompt_mask, params, generator)
    t1 = clock(device) if device is not None else time.perf_counter()

    # Decoded once, the same way for rewards and evaluation (data.decode_completions).
    completions = decode_completions(tokenizer, out.completion_ids, out.completion_mask)
    prompts = [p for p in raw for _ in range(G)]
    columns = {k: [row.get(k) for row in rows for _ in range(G)] for k in reward_columns(rows[0], cfg.prompt_column)}
    log = log if log is not None else RewardLog()
    total, per_function = score(
        rewards, prompts, [as_completion(p, c) for p, c in zip(prompts, completions)], columns,
        timeout=cfg.reward_timeout, completion_ids=completion_ids_list(out.completion_ids, out.completion_mask),
        trainer_state=trainer_state, log_metric=log.log_metric, log_extra=log.log_extra,
        model_texts=([t for t in texts for _ in range(G)], completions))
    t2 = clock(device) if device is not None else time.perf_counter()
    return Scored(texts, prompt_ids, prompt_mask, out, completions, total, per_function, t1 - t0, t2 - t1)


def logprob_temperature(cfg) -> float:
    # Training log-probs use the distribution completions were drawn from: tempered for sampling,
    # the plain model for beam search (which scores beams at temperature 1).
    return cfg.temperature if cfg.generation == "sample" else 1.0


def needs_old_logprobs(cfg) -> bool:
    # With one optimizer step per rollout pi_old == pi_theta at update time, so the ratio is
    # exp(l - l.detach()) and no second forward pass is needed (algorithm.policy_loss does that).
    return cfg.ratio_anchor == "old" and (cfg.num_iterations > 1 or cfg.num_minibatches > 1)


def needs_reference(cfg) -> bool:
    return cfg.beta > 0 or cfg.ratio_anchor == "reference"


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(rollout), micro_batch_size):
        s = slice(i, i + micro_batch_size)
        lp, _ = completion_logprobs(model, rollout.prompt_ids[s], rollout.prompt_mask[s],
                                    rollout.completion_ids[s], rollout.completion_mask[s], temperature)
        out.append(lp.float())
    return torch.cat(out)


def clock(device: torch.device) -> float:
    """Wall time once the device has finished its queued work, so each phase's seconds are its own
    (CUDA kernels run asynchronously; on CPU this is just the time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def collect_rollout(policy, reference, tokenizer, rows: list[dict], rewards, cfg, generator: torch.Generator,
                    gather=None, precision: Precision | None = None,
                    backend: RolloutBackend | None = None, trainer_state=None) -> Rollout:
    """Generate, score and normalise one step's groups.

    `backend` generates (default: the local engine on `policy`); `policy` and `reference` give the
    trainer-side log-probs. `gather` all-gathers a tensor across processes (None on one
    process), so batch-wide advantage statistics are counted over the global batch. `precision`
    says what the forward passes compute in (float32 when None). `trainer_state` is what reward
    functions that take it receive (TRL's TrainerState).
    """
    device = next(policy.parameters()).device
    precision = precision or Precision(device, torch.float32)
    backend = backend or LocalBackend(policy, tokenizer)
    G = cfg.group_size
    log = RewardLog()
    scored = score_group(backend, tokenizer, rows, rewards, cfg, sampling_params(cfg), generator, log=log,
                         trainer_state=trainer_state, precision=precision, device=device)
    out, total = scored.generation, scored.total
    advantages = algorithm.compute_advantages(cfg.advantage_estimator, total, G, eps=cfg.advantage_eps,
                                              batch_rewards=gather(total) if gather is not None else None)
    t2 = clock(device)

    rollout = Rollout(
        prompt_ids=scored.prompt_ids.repeat_interleave(G, 0), prompt_mask=scored.prompt_mask.repeat_interleave(G, 0),
        completion_ids=out.completion_ids,
        completion_mask=algorithm.loss_mask(out.completion_mask, out.truncated, cfg.mask_truncated_completions),
        truncated=out.truncated, lengths=out.completion_mask.sum(1),
        rewards=total, advantages=advantages.to(device), rewards_per_function=scored.per_function,
        prompts=[t for t in scored.texts for _ in range(G)], completions=scored.completions, reward_log=log)

    temperature = logprob_temperature(cfg)
    with precision.autocast():
        if needs_old_logprobs(cfg):
            rollout.old_logprobs = batched_logprobs(policy, rollout, temperature, cfg.micro_batch_size)
        if reference is not None:
            rollout.ref_logprobs = batched_logprobs(reference, rollout, temperature, cfg.micro_batch_size)
    t3 = clock(device)
    rollout.timings = {"generate": scored.seconds_generate, "score": scored.seconds_score, "logprobs": t3 - t2}
    return rollout


def trainer_state(cfg, optimizer_steps: int, epoch: float):
    """What reward functions that take `trainer_state` get: a transformers.TrainerState, as TRL
    passes, with global_step and max_steps counted in optimizer steps (TRL's units) and epoch the
    passes over the dataset so far."""
    from transformers.trainer_callback import TrainerState

    return TrainerState(global_step=optimizer_steps, max_steps=cfg.max_steps * cfg.num_iterations * cfg.num_minibatches,
                        epoch=epoch)
