"""`grpo train`: the GRPO loop. Read `train` top to bottom: rollout, update, log, checkpoint.

The maths is in `grpo.algorithm`; this file only wires stages together (DESIGN.md "Data flow").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import algorithm
from .checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, to_dict
from .data import PromptSampler, load_rows, require_columns
from .distributed import World
from .evaluate import accuracy_reward_name, evaluate
from .logprobs import completion_logprobs
from .modeling import (Precision, load_causal_lm, load_tokenizer, make_optimizer, make_scheduler,
                       pick_device, pick_dtype, seed_everything)
from .rewards import RewardModelScorer, build_rewards
from .rollout import Rollout, clock, collect_rollout, logprob_temperature, needs_reference
from .tracking import RunLogger


def update(policy, optimizer, scheduler, rollout: Rollout, cfg: TrainConfig, world: World,
           generator: torch.Generator, precision: Precision | None = None) -> dict[str, float]:
    """num_iterations passes over the rollout, each split into num_minibatches optimizer steps.

    Every optimizer step normalises its loss by counts over its whole minibatch (on every process),
    so the gradient does not depend on micro_batch_size or on the number of processes.
    """
    precision = precision or Precision(next(policy.parameters()).device, torch.float32)
    n, G = len(rollout), cfg.group_size
    groups = n // G
    per_minibatch = groups // cfg.num_minibatches
    temperature = logprob_temperature(cfg)
    sums = dict(loss=0.0, policy_loss=0.0, kl_sum=0.0, clip_low_sum=0.0, clip_high_sum=0.0,
                entropy_sum=0.0, token_count=0.0, grad_norm=0.0, nonfinite_grad_steps=0)
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
            for i in range(0, len(rows), cfg.micro_batch_size):
                idx = rows[i:i + cfg.micro_batch_size]
                with precision.autocast():  # the forward only: backward follows the ops it recorded
                    logprobs, entropy = completion_logprobs(
                        policy, rollout.prompt_ids[idx], rollout.prompt_mask[idx], rollout.completion_ids[idx],
                        rollout.completion_mask[idx], temperature, compute_entropy=True, entropy_grad=False)
                # old is None with one update per rollout: policy_loss then uses logprobs.detach().
                old = None if rollout.old_logprobs is None else rollout.old_logprobs[idx]
                ref = None if rollout.ref_logprobs is None else rollout.ref_logprobs[idx]
                loss, stats = algorithm.policy_loss(
                    logprobs.float(), old, ref, rollout.advantages[idx], rollout.completion_mask[idx],
                    ratio_level=cfg.ratio_level, eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high,
                    beta=cfg.beta, kl_estimator=cfg.kl_estimator, aggregation=cfg.loss_aggregation,
                    # The seed notes' "Loss" section: the ratio against pi_ref instead of pi_old.
                    anchor_logprobs=ref if cfg.ratio_anchor == "reference" else None, **norm)
                if loss.requires_grad:  # False only when every token of the micro-batch is masked out
                    precision.backward(loss)
                m = rollout.completion_mask[idx]
                sums["loss"] += loss.item()
                sums["entropy_sum"] += (entropy.float() * m).sum().item()
                for key in ("policy_loss", "kl_sum", "clip_low_sum", "clip_high_sum", "token_count"):
                    sums[key] += float(stats[key])
            world.sum_gradients(policy)
            grad_norm = precision.step(optimizer, policy.parameters(), cfg.max_grad_norm)
            scheduler.step()
            if torch.isfinite(grad_norm):
                sums["grad_norm"] += float(grad_norm)
            else:  # skipped (Precision.step); float16 also lowers its loss scale
                sums["nonfinite_grad_steps"] += 1
            steps += 1
    tokens = max(sums["token_count"], 1.0)
    return {"loss": sums["loss"] / steps, "policy_loss": sums["policy_loss"] / steps,
            "kl": sums["kl_sum"] / tokens, "entropy": sums["entropy_sum"] / tokens,
            "clip_frac_low": sums["clip_low_sum"] / tokens, "clip_frac_high": sums["clip_high_sum"] / tokens,
            "grad_norm": sums["grad_norm"] / max(steps - sums["nonfinite_grad_steps"], 1),
            "nonfinite_grad_steps": sums["nonfinite_grad_steps"], "lr": scheduler.get_last_lr()[0],
            "optimizer_steps": steps}


def rollout_metrics(rollout: Rollout, cfg: TrainConfig, accuracy_name: str | None) -> dict[str, float]:
    lengths = rollout.lengths.float()
    m = {"reward_mean": rollout.rewards.mean().item(), "reward_std": rollout.rewards.std().item(),
         "completion_length_mean": lengths.mean().item(), "completion_length_max": lengths.max().item(),
         "truncated_frac": rollout.truncated.float().mean().item(),
         "zero_variance_frac": algorithm.zero_variance_groups(rollout.rewards, cfg.group_size).float().mean().item(),
         "advantage_abs_mean": rollout.advantages.abs().mean().item()}
    for name, values in rollout.rewards_per_function.items():
        m[f"rewards/{name}/mean"] = values.mean().item()
        m[f"rewards/{name}/std"] = values.std().item()
        # Per function too: a continuous reward-model score is almost never tied, while the
        # verifier beside it may be all-0 or all-1 in most groups.
        m[f"rewards/{name}/zero_variance_frac"] = \
            algorithm.zero_variance_groups(values, cfg.group_size).float().mean().item()
    if accuracy_name:
        m["accuracy"] = (rollout.rewards_per_function[accuracy_name] == 1).float().mean().item()
    return m


def load_models(cfg: TrainConfig, device: torch.device):
    """pi_theta, and pi_ref (None when the run never uses it: beta = 0 with the ratio anchored at
    pi_old). Both hold float32 weights whatever the forwards compute in (see modeling.Precision):
    the reference like the policy so that the two agree bit for bit at step 0 (KL exactly 0, a
    reference-anchored ratio exactly 1), under bf16 as under fp32."""
    policy = load_causal_lm(cfg.model, device, torch.float32)
    reference = load_causal_lm(cfg.model, device, torch.float32, trainable=False) if needs_reference(cfg) else None
    return policy, reference


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    device = pick_device(cfg.device)
    world = World(device)
    seed_everything(cfg.seed + world.rank)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dtype = pick_dtype(cfg.dtype, device)
    precision = Precision(device, dtype)
    out = Path(cfg.output_dir)

    # Everything that can fail on bad input is checked before the models are loaded.
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column], cfg.dataset)
    eval_rows = load_rows(cfg.eval_dataset)[: cfg.eval_max_prompts] if cfg.eval_dataset else []
    if eval_rows:
        require_columns(eval_rows, [cfg.prompt_column], cfg.eval_dataset)
    rewards = build_rewards(cfg.rewards, device, dtype)
    accuracy_name = accuracy_reward_name(rewards, cfg.accuracy_reward)
    if accuracy_name == "exact_answer":
        require_columns(rows, ["answer"], cfg.dataset)

    tokenizer = load_tokenizer(cfg.model)
    policy, reference = load_models(cfg, device)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * cfg.num_iterations * cfg.num_minibatches)
    sampler = PromptSampler(len(rows), cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + world.rank)

    start_step = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        state = load_state(checkpoint)
        policy.load_state_dict(load_causal_lm(str(checkpoint), torch.device("cpu"), dtype).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when the checkpoint was not float16
            precision.scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"][world.rank], generator)
        for r in rewards:
            if isinstance(r.fn, RewardModelScorer) and r.fn.moments and r.name in state.get("reward_moments", {}):
                r.fn.moments.load_state_dict(state["reward_moments"][r.name])
        start_step = state["step"]

    logger = RunLogger(out, cfg.max_steps, enabled=world.main, quiet=quiet, resume_step=start_step,
                       config=to_dict(cfg))
    # The run's config goes to train_config.json (RunLogger): config.json is the model's.
    if world.main and checkpoint is not None:
        logger.info(f"resumed from {checkpoint} at step {start_step}")

    def run_eval() -> dict:
        with precision.autocast():
            result = evaluate(policy, tokenizer, eval_rows, rewards, prompt_column=cfg.prompt_column,
                              chat_template=cfg.apply_chat_template, max_prompt_length=cfg.max_prompt_length,
                              max_new_tokens=cfg.max_completion_length, accuracy_reward=accuracy_name)
        return {"eval_reward": result["reward"], **({"eval_accuracy": result["accuracy"]} if "accuracy" in result else {})}

    summary = {}
    if eval_rows and start_step == 0 and world.main:
        summary["eval_before"] = run_eval()
        logger.info(f"held-out before training: {summary['eval_before']}")
        logger.log({"step": 0, **summary["eval_before"], "elapsed": 0.0})  # the curves' starting point
    train_start = time.time()
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = clock(device)
        # Every process draws the same global order and takes its own slice of it.
        indices = sampler.next(cfg.prompts_per_step * world.size)
        mine = indices[world.rank * cfg.prompts_per_step:(world.rank + 1) * cfg.prompts_per_step]
        rollout = collect_rollout(policy, reference, tokenizer, [rows[i] for i in mine], rewards, cfg,
                                  generator, gather=world.gather if world.size > 1 else None, precision=precision)
        t1 = clock(device)
        stats = update(policy, optimizer, scheduler, rollout, cfg, world, generator, precision)
        t2 = clock(device)

        record = {"step": step, **rollout_metrics(rollout, cfg, accuracy_name), **stats,
                  "seconds_generate": rollout.timings["generate"], "seconds_score": rollout.timings["score"],
                  "seconds_logprobs": rollout.timings["logprobs"], "seconds_update": t2 - t1,
                  "seconds_step": t2 - t0,
                  "tokens_per_second": rollout.completion_mask.sum().item() / (t2 - t0),
                  "elapsed": time.time() - train_start}
        if world.size > 1:
            keys = sorted(k for k, v in record.items() if isinstance(v, float))
            averaged = world.sum(torch.tensor([record[k] for k in keys], dtype=torch.float64)) / world.size
            record.update(zip(keys, averaged.tolist()))
        if eval_rows and cfg.eval_steps and step % cfg.eval_steps == 0 and world.main:
            record.update(run_eval())
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            logger.log(record)
        if cfg.samples_steps and (step % cfg.samples_steps == 0 or step == 1):
            logger.samples(step, rollout)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps and world.main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": precision.scaler.state_dict(), "sampler": sampler.state_dict(), "config": to_dict(cfg),
                     "rng": world_rng(world, generator),
                     "reward_moments": {r.name: r.fn.moments.state_dict() for r in rewards
                                        if isinstance(r.fn, RewardModelScorer) and r.fn.moments}}
            save_checkpoint(out, step, policy, tokenizer, state, cfg.save_total_limit)
        elif cfg.save_steps and step % cfg.save_steps == 0 and world.size > 1:
            world_rng(world, generator)  # every process takes part in the collective

    if world.main:
        policy.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        summary["train_seconds"] = time.time() - train_start
        if eval_rows:
            summary["eval_after"] = run_eval()
            logger.info(f"held-out after training: {summary['eval_after']}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    world.barrier()
    world.close()
    return out


def world_rng(world: World, generator: torch.Generator) -> list:
    """Every process's RNG state, so a resumed multi-process run continues each stream exactly."""
    mine = rng_state(generator)
    if world.size == 1:
        return [mine]
    import torch.distributed as dist
    everyone = [None] * world.size
    dist.all_gather_object(everyone, mine)
    return everyone
