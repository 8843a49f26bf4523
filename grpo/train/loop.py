"""`grpo train`: the GRPO loop. Read `train` top to bottom: set up, then per step rollout,
update, log, checkpoint.

The maths is in `grpo.algorithm`; generation is behind `grpo.engine.backend`; this file only
wires the stages together (docs/DESIGN.md, "One step").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from grpo.config import TrainConfig, to_dict
from grpo.data import PromptSampler, load_rows, require_columns
from grpo.engine.backend import make_backend
from grpo.engine.models import load_causal_lm, load_tokenizer
from grpo.observe.tracking import RunLogger
from grpo.rewards import build_rewards, load_reward_states, reward_states

from .checkpoint import latest_checkpoint, restore_train_state, rng_state, save_checkpoint, train_state
from .evaluate import accuracy_reward_name, evaluate
from .optim import make_optimizer, make_scheduler
from .rollout import clock, collect_rollout, needs_reference
from .setup import start_run
from .update import rollout_metrics, update


def load_models(cfg: TrainConfig, device: torch.device):
    """pi_theta, and pi_ref (None when the run never uses it: beta = 0 with the ratio anchored at
    pi_old). Both hold float32 weights whatever the forwards compute in (train.precision): the
    reference like the policy so that the two agree bit for bit at step 0 (KL exactly 0, a
    reference-anchored ratio exactly 1), under bf16 as under fp32."""
    policy = load_causal_lm(cfg.model, device, torch.float32)
    reference = load_causal_lm(cfg.model, device, torch.float32, trainable=False) if needs_reference(cfg) else None
    return policy, reference


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    run = start_run(cfg, distributed=True)
    device, world, precision, out = run.device, run.world, run.precision, run.out

    # Everything that can fail on bad input is checked before the models are loaded.
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column], cfg.dataset)
    eval_rows = load_rows(cfg.eval_dataset)[: cfg.eval_max_prompts] if cfg.eval_dataset else []
    if eval_rows:
        require_columns(eval_rows, [cfg.prompt_column], cfg.eval_dataset)
    rewards = build_rewards(cfg.rewards, device, run.dtype)
    accuracy_name = accuracy_reward_name(rewards, cfg.accuracy_reward)
    if accuracy_name == "exact_answer":
        require_columns(rows, ["answer"], cfg.dataset)

    tokenizer = load_tokenizer(cfg.model)
    policy, reference = load_models(cfg, device)
    backend = make_backend(cfg.rollout_backend, policy, tokenizer)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * cfg.num_iterations * cfg.num_minibatches)
    sampler = PromptSampler(len(rows), cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + world.rank)

    start_step = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        state = restore_train_state(checkpoint, policy, optimizer, scheduler, precision, sampler, generator,
                                    world.rank)
        load_reward_states(rewards, state.get("reward_states", {}))
        start_step = state["step"]
        backend.sync_weights(policy)

    # The run's config goes to train_config.json (RunLogger): config.json is the model's.
    logger = RunLogger(out, cfg.max_steps, enabled=world.main, quiet=quiet, resume_step=start_step,
                       config=to_dict(cfg))
    if world.main and checkpoint is not None:
        logger.info(f"resumed from {checkpoint} at step {start_step}")

    def run_eval() -> dict:
        with precision.autocast():
            result = evaluate(backend, tokenizer, eval_rows, rewards, cfg, accuracy_name)
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
        rollout = collect_rollout(policy, reference, tokenizer, [rows[i] for i in mine], rewards, cfg, generator,
                                  gather=world.gather if world.size > 1 else None, precision=precision,
                                  backend=backend)
        t1 = clock(device)
        stats = update(policy, optimizer, scheduler, rollout, cfg, world, generator, precision)
        backend.sync_weights(policy)
        t2 = clock(device)

        record = {"step": step, **rollout_metrics(rollout, cfg, accuracy_name), **stats,
                  "seconds_generate": rollout.timings["generate"], "seconds_score": rollout.timings["score"],
                  "seconds_logprobs": rollout.timings["logprobs"], "seconds_update": t2 - t1,
                  "seconds_step": t2 - t0,
                  "tokens_per_second": rollout.completion_mask.sum().item() / (t2 - t0),
                  "elapsed": time.time() - train_start}
        record = world.average_floats(record)
        if eval_rows and cfg.eval_steps and step % cfg.eval_steps == 0 and world.main:
            record.update(run_eval())
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            logger.log(record)
        if cfg.samples_steps and (step % cfg.samples_steps == 0 or step == 1):
            logger.samples(step, rollout)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
            rng = world.gather_objects(rng_state(generator))  # every process takes part
            if world.main:
                save_checkpoint(out, step, policy, tokenizer, train_state(
                    step, optimizer, scheduler, precision, sampler, to_dict(cfg), rng, reward_states(rewards)),
                    cfg.save_total_limit)

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
