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
from grpo.data import decode_completions, format_prompt, tokenize_prompts
from grpo.engine.adapters import reference_policy
from grpo.engine.backend import LocalBackend, RolloutBackend, SamplingParams
from grpo.engine.logprobs import completion_logprobs
from grpo.rewards import score

from .precision import Precision
from .sharding import gathered


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

    def __len__(self) -> int:
        return self.completion_ids.size(0)


def sampling_params(cfg) -> SamplingParams:
    return SamplingParams(group_size=cfg.group_size, max_new_tokens=cfg.max_completion_length,
                          strategy=cfg.generation, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)


def logprob_temperature(cfg) -> float:
    # Training log-probs use the distribution completions were drawn from: tempered for sampling,
    # the plain model for beam search (which scores beams at temperature 1).
    return cfg.temperature if cfg.generation == "sample" else 1.0


def needs_old_logprobs(cfg) -> bool:
    # With one optimizer step per rollout pi_old == pi_theta at update time, so the ratio is
    # exp(l - l.detach()) and no second forward pass is needed (algorithm.policy_loss does that).
    return cfg.ratio_anchor == "old" and (cfg.num_iterations > 1 or cfg.num_minibatches > 1)


def logprob_chunk_size(cfg, model) -> int:
    """Scored tokens per LM-head pass (config key logprob_chunk_size; -1: 1024 for vocabularies of
    65,536 tokens or more, else all at once)."""
    size = getattr(cfg, "logprob_chunk_size", 0)
    if size >= 0:
        return size
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    return 1024 if vocab >= 65536 else 0


def needs_reference(cfg) -> bool:
    return cfg.beta > 0 or cfg.ratio_anchor == "reference"


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int,
                     logprob_chunk_size: int = 0) -> torch.Tensor:
    out = []
    for i in range(0, len(rollout), micro_batch_size):
        s = slice(i, i + micro_batch_size)
        lp, _ = completion_logprobs(model, rollout.prompt_ids[s], rollout.prompt_mask[s],
                                    rollout.completion_ids[s], rollout.completion_mask[s], temperature,
                                    logprob_chunk_size=logprob_chunk_size)
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
                    backend: RolloutBackend | None = None) -> Rollout:
    """Generate, score and normalise one step's groups.

    `backend` generates (default: the local engine on `policy`); `policy` and `reference` give the
    trainer-side log-probs (`reference` may be `policy` itself when it carries a LoRA adapter:
    pi_ref is then the policy with its adapter off). `gather` all-gathers a tensor across processes (None on one
    process), so batch-wide advantage statistics are counted over the global batch. `precision`
    says what the forward passes compute in (float32 when None). Sharded models (`fsdp`) are
    gathered whole for their own passes only (`sharding.gathered`: the policy for generation and
    for pi_old, the reference for pi_ref, never both at once); every process must call this.
    """
    device = next(policy.parameters()).device
    precision = precision or Precision(device, torch.float32)
    backend = backend or LocalBackend(policy, tokenizer)
    G = cfg.group_size
    t0 = clock(device)
    texts = [format_prompt(tokenizer, row[cfg.prompt_column], cfg.apply_chat_template) for row in rows]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, texts, cfg.max_prompt_length, device)
    with precision.autocast(), gathered(policy):
        out = backend.generate(prompt_ids, prompt_mask, sampling_params(cfg), generator)
    t1 = clock(device)

    # Score: every dataset column except the prompt goes to the reward functions, repeated per completion.
    completions = decode_completions(tokenizer, out.completion_ids)
    prompts = [t for t in texts for _ in range(G)]
    columns = {k: [row.get(k) for row in rows for _ in range(G)]
               for k in rows[0] if k not in (cfg.prompt_column, "_line")}
    total, per_function = score(rewards, prompts, completions, columns, timeout=cfg.reward_timeout)
    advantages = algorithm.compute_advantages(cfg.advantage_estimator, total, G, eps=cfg.advantage_eps,
                                              batch_rewards=gather(total) if gather is not None else None)
    t2 = clock(device)

    rollout = Rollout(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        completion_ids=out.completion_ids,
        completion_mask=algorithm.loss_mask(out.completion_mask, out.truncated, cfg.mask_truncated_completions),
        truncated=out.truncated, lengths=out.completion_mask.sum(1),
        rewards=total, advantages=advantages.to(device), rewards_per_function=per_function,
        prompts=prompts, completions=completions)

    temperature = logprob_temperature(cfg)
    chunk = logprob_chunk_size(cfg, policy)
    if needs_old_logprobs(cfg):
        with precision.autocast(), gathered(policy):
            rollout.old_logprobs = batched_logprobs(policy, rollout, temperature, cfg.micro_batch_size, chunk)
    if reference is not None:
        # `reference is policy`: a LoRA policy, whose reference is its base model (the adapter off).
        with precision.autocast(), gathered(reference), \
                (reference_policy(policy) if reference is policy else contextlib.nullcontext()):
            rollout.ref_logprobs = batched_logprobs(reference, rollout, temperature, cfg.micro_batch_size, chunk)
    t3 = clock(device)
    rollout.timings = {"generate": t1 - t0, "score": t2 - t1, "logprobs": t3 - t2}
    return rollout
