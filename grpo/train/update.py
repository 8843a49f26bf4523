"""The update of one step, and the numbers a step is judged by.

`update` runs num_iterations passes over a rollout, each split into num_minibatches optimizer
steps over whole groups; the loss is `grpo.algorithm.policy_loss` with every choice from the
config. `rollout_metrics` is what the rollout itself says (rewards, lengths, zero-variance groups).
"""

from __future__ import annotations

import math

import torch

from grpo import algorithm
from grpo.config import TrainConfig
from grpo.engine.logprobs import completion_logprobs
from grpo.observe.metrics import logged_name
from grpo.runtime.distributed import World
from grpo.runtime.optim import before_first_step
from grpo.runtime.precision import Precision
from grpo.runtime.sharding import is_sharded

from .rollout import Rollout, logprob_chunk_size, logprob_temperature, recompute_mlp


def gather_varlen(world: World, x: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every process, in rank order."""
    if world.size == 1:
        return x
    sizes = world.gather(torch.tensor([x.numel()], device=x.device))
    longest = int(sizes.max())
    padded = torch.cat([x, x.new_zeros(longest - x.numel())])
    every = world.gather(padded).view(world.size, longest)
    return torch.cat([every[r, :int(n)] for r, n in enumerate(sizes.tolist())])


def forward_mask(policy, rollout: Rollout, idx: torch.Tensor) -> torch.Tensor:
    """The columns a micro-batch's forward scores: its loss mask. Sharded, each forward and
    backward is a collective per layer that every process joins, so a micro-batch with nothing to
    score still runs (every column scored); its loss, 0 under the real mask, backpropagates zeros."""
    mask = rollout.completion_mask[idx]
    if is_sharded(policy) and not bool(mask.any()):
        return torch.ones_like(mask)
    return mask


@torch.no_grad()
def minibatch_entropy_threshold(policy, rollout: Rollout, rows: torch.Tensor, cfg: TrainConfig, world: World,
                                temperature: float, precision: Precision) -> torch.Tensor:
    """tau of `top_entropy_quantile` over the valid tokens of the whole minibatch on every process
    (a pass without grad when the minibatch spans several micro-batches)."""
    entropies = []
    for i in range(0, len(rows), cfg.micro_batch_size):
        idx = rows[i:i + cfg.micro_batch_size]
        with precision.autocast():
            _, entropy = completion_logprobs(policy, rollout.prompt_ids[idx], rollout.prompt_mask[idx],
                                             rollout.completion_ids[idx], forward_mask(policy, rollout, idx),
                                             temperature,
                                             compute_entropy=True, entropy_grad=False,
                                             logprob_chunk_size=logprob_chunk_size(cfg, policy),
                                             recompute_mlp=recompute_mlp(cfg, policy))
        entropies.append(entropy.float()[rollout.completion_mask[idx].bool()])
    return algorithm.entropy_threshold(gather_varlen(world, torch.cat(entropies)), cfg.top_entropy_quantile)


def update(policy, optimizer, scheduler, rollout: Rollout, cfg: TrainConfig, world: World,
           generator: torch.Generator, precision: Precision | None = None, after_step=None) -> dict[str, float]:
    """num_iterations passes over the rollout, each split into num_minibatches optimizer steps;
    `after_step()` is called after each of them (the TR-DPO reference update).

    Every optimizer step normalises its loss by counts over its whole minibatch (on every process),
    so the gradient does not depend on micro_batch_size or on the number of processes; so does the
    entropy threshold of `top_entropy_quantile`. With `off_policy_correction` each micro-batch's
    surrogate is weighted by min(pi_old / pi_sampler, C), pi_old = the rollout's old log-probs, or
    at one update per rollout the current policy's own (detached): the same weights, no extra pass.
    On a sharded policy (`grpo.runtime.sharding`) FSDP's reduce-scatter sums the gradients in the
    backward, in place of `World.sum_gradients`.
    """
    precision = precision or Precision(next(policy.parameters()).device, torch.float32)
    n, G = len(rollout), cfg.group_size
    groups = n // G
    per_minibatch = groups // cfg.num_minibatches
    temperature = logprob_temperature(cfg)
    sums = dict(loss=0.0, policy_loss=0.0, kl_sum=0.0, clip_low_sum=0.0, clip_high_sum=0.0,
                entropy_sum=0.0, token_count=0.0, grad_norm=0.0, nonfinite_grad_steps=0,
                pg_token_count=0.0, is_weight_sum=0.0, router_aux_loss=0.0, sampler_diff_sum=0.0,
                capped_count=0.0)
    select = cfg.top_entropy_quantile < 1
    correct = cfg.off_policy_correction != "none"
    sharded = is_sharded(policy)
    chunk, recompute = logprob_chunk_size(cfg, policy), recompute_mlp(cfg, policy)
    aux_loss = cfg.router_aux_loss_coef > 0
    if correct and rollout.sampling_logprobs is None:
        raise ValueError(f"off_policy_correction={cfg.off_policy_correction!r} needs the sampler's log-probs; "
                         f"generation: {cfg.generation} records none")
    steps = 0
    for _ in range(cfg.num_iterations):
        # Shuffle whole groups between minibatches so each minibatch still holds complete groups.
        order = torch.randperm(groups, generator=generator, device=generator.device).cpu() \
            if cfg.num_minibatches > 1 else torch.arange(groups)
        for mb in range(cfg.num_minibatches):
            rows = (order[mb * per_minibatch:(mb + 1) * per_minibatch, None] * G + torch.arange(G)).flatten()
            mask = rollout.completion_mask[rows]
            norm = dict(num_sequences=int(world.sum(torch.tensor(len(rows))).item()),
                        num_tokens=max(world.sum(mask.sum()).item(), 1.0),
                        group_size=G, max_completion_length=cfg.max_completion_length)
            optimizer.zero_grad(set_to_none=True)
            # One micro-batch: its own forward gives the entropies (the threshold is taken below).
            one_pass = len(rows) <= cfg.micro_batch_size
            tau = minibatch_entropy_threshold(policy, rollout, rows, cfg, world, temperature, precision) \
                if select and not one_pass else None
            for i in range(0, len(rows), cfg.micro_batch_size):
                idx = rows[i:i + cfg.micro_batch_size]
                with precision.autocast():  # the forward only: backward follows the ops it recorded
                    forward = completion_logprobs(
                        policy, rollout.prompt_ids[idx], rollout.prompt_mask[idx], rollout.completion_ids[idx],
                        forward_mask(policy, rollout, idx), temperature, compute_entropy=True, entropy_grad=False,
                        logprob_chunk_size=chunk, router_aux_loss=aux_loss, recompute_mlp=recompute)
                logprobs, entropy = forward
                mask = rollout.completion_mask[idx]
                # old is None with one update per rollout: policy_loss then uses logprobs.detach().
                old = None if rollout.old_logprobs is None else rollout.old_logprobs[idx]
                ref = None if rollout.ref_logprobs is None else rollout.ref_logprobs[idx]
                pg_mask = is_weights = None
                if select:
                    if tau is None:
                        tau = algorithm.entropy_threshold(gather_varlen(world, entropy.float()[mask.bool()]),
                                                          cfg.top_entropy_quantile)
                    pg_mask = algorithm.high_entropy_mask(entropy.float(), mask, cfg.top_entropy_quantile, tau)
                if correct:
                    behaviour = logprobs.detach().float() if old is None else old
                    is_weights = algorithm.truncated_is_weights(behaviour, rollout.sampling_logprobs[idx], mask,
                                                                cfg.off_policy_correction, cfg.off_policy_cap)
                    diff, capped = algorithm.sampler_mismatch(behaviour, rollout.sampling_logprobs[idx], is_weights,
                                                              mask, cfg.off_policy_cap)
                    sums["sampler_diff_sum"] += diff
                    sums["capped_count"] += capped
                loss, stats = algorithm.policy_loss(
                    logprobs.float(), old, ref, rollout.advantages[idx], mask,
                    loss_mode=cfg.policy_loss, ratio_level=cfg.ratio_level, ratio_anchor=cfg.ratio_anchor,
                    eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high, beta=cfg.beta,
                    kl_estimator=cfg.kl_estimator, aggregation=cfg.loss_aggregation, pg_mask=pg_mask,
                    is_weights=is_weights, delta=cfg.delta or None, **norm)
                if aux_loss:
                    # The router's load-balancing loss (Switch Transformer eq. 4; TRL's and the Hugging
                    # Face forward's `router_aux_loss_coef * aux_loss`), averaged over micro-batches
                    # by their share of the minibatch's sequences. It is not linear in the tokens
                    # (f_e * P_e), so per micro-batch it is not the whole minibatch's value.
                    aux = forward.aux_loss.float()
                    sums["router_aux_loss"] += aux.item() * len(idx) / len(rows)  # this process's mean
                    loss = loss + cfg.router_aux_loss_coef * aux * len(idx) / norm["num_sequences"]
                if loss.requires_grad:  # False only when every token of the micro-batch is masked out
                    precision.backward(loss)
                m = rollout.completion_mask[idx]
                sums["loss"] += loss.item()
                sums["entropy_sum"] += (entropy.float() * m).sum().item()
                for key in ("policy_loss", "kl_sum", "clip_low_sum", "clip_high_sum", "token_count",
                            "pg_token_count", "is_weight_sum"):
                    sums[key] += float(stats.get(key, 0.0))
            if not sharded:
                world.sum_gradients(policy)
            before_first_step(optimizer, precision.device)
            grad_norm = precision.step(optimizer, policy.parameters(), cfg.max_grad_norm)
            scheduler.step()
            if after_step is not None:
                after_step()
            if torch.isfinite(grad_norm):
                sums["grad_norm"] += float(grad_norm)
            else:  # skipped (Precision.step); float16 also lowers its loss scale
                sums["nonfinite_grad_steps"] += 1
            steps += 1
    tokens = max(sums["token_count"], 1.0)
    out = {"loss": sums["loss"] / steps, "policy_loss": sums["policy_loss"] / steps,
           "kl": sums["kl_sum"] / tokens, "entropy": sums["entropy_sum"] / tokens,
           "clip_frac_low": sums["clip_low_sum"] / tokens, "clip_frac_high": sums["clip_high_sum"] / tokens,
           "grad_norm": sums["grad_norm"] / max(steps - sums["nonfinite_grad_steps"], 1),
           "nonfinite_grad_steps": sums["nonfinite_grad_steps"], "lr": scheduler.get_last_lr()[0],
           "optimizer_steps": steps}
    if select:
        out["pg_token_frac"] = sums["pg_token_count"] / tokens
    if aux_loss:
        out["router_aux_loss"] = sums["router_aux_loss"] / steps
    if correct:
        out["is_weight_mean"] = sums["is_weight_sum"] / tokens
        # Mean log pi_sampler - log pi_old over completion tokens, and the share the cap truncated,
        # named after the engine that sampled (rollout/vllm_..., rollout/local_...).
        out[f"rollout/{cfg.rollout_backend}_logprob_diff_mean"] = sums["sampler_diff_sum"] / tokens
        out[f"rollout/{cfg.rollout_backend}_capped_frac"] = sums["capped_count"] / tokens
    return out


def advantage_abs_mean(rollout: Rollout) -> float:
    """Mean |A| over completions, or, for per-token advantages [N, T], over the loss's tokens."""
    a = rollout.advantages
    if a.dim() == 1:
        return a.abs().mean().item()
    valid = rollout.completion_mask.bool()
    return (a.abs()[valid].mean().item() if bool(valid.any()) else 0.0)


def rollout_metrics(rollout: Rollout, cfg: TrainConfig, accuracy_name: str | None) -> dict[str, float]:
    lengths = rollout.lengths.float()
    # Groups the reward functions cannot rank: ties of the rewards before reward_kl_coef's KL
    # shift, which differs between completions and would untie almost every group (as the
    # advantage estimators' docstrings say, and as dynamic sampling filters).
    scored = rollout.rewards if rollout.rewards_before_kl is None else rollout.rewards_before_kl
    m = {"reward_mean": rollout.rewards.mean().item(), "reward_std": rollout.rewards.std().item(),
         "completion_length_mean": lengths.mean().item(), "completion_length_max": lengths.max().item(),
         "truncated_frac": rollout.truncated.float().mean().item(),
         "zero_variance_frac": algorithm.zero_variance_groups(scored, cfg.group_size).float().mean().item(),
         "advantage_abs_mean": advantage_abs_mean(rollout)}
    for name, values in rollout.rewards_per_function.items():
        # NaN is a function's "no opinion" on a sample (TRL's None): counted out, as in the total.
        given = values[~values.isnan()]
        m[f"rewards/{name}/mean"] = given.mean().item() if len(given) else math.nan
        m[f"rewards/{name}/std"] = given.std().item() if len(given) > 1 else math.nan
        # Per function too: a continuous reward-model score is almost never tied, while the
        # verifier beside it may be all-0 or all-1 in most groups.
        m[f"rewards/{name}/zero_variance_frac"] = \
            algorithm.zero_variance_groups(values, cfg.group_size).float().mean().item()
    if accuracy_name:
        m["accuracy"] = (rollout.rewards_per_function[accuracy_name] == 1).float().mean().item()
    m.update(rollout.sampling_stats)  # dynamic sampling: rounds, prompts generated, groups dropped
    return m


def with_logged_metrics(record: dict, logged: dict[str, float]) -> dict:
    """The step's record with what reward functions logged through `log_metric` (TRL's hook),
    each as `reward/<name>`; a name the trainer already logs becomes `reward/logged/<name>`."""
    out = dict(record)
    taken = {logged_name(k) for k in record}
    for name, value in logged.items():
        out[f"reward/logged/{name}" if f"reward/{name}" in taken else f"reward/{name}"] = value
    return out
