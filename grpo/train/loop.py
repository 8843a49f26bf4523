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
from grpo.data import PromptSampler
from grpo.engine.backend import make_backend
from grpo.observe.tracking import RunLogger
from grpo.rewards import load_reward_states, reward_states

from .checkpoint import rng_state, train_state
from .evaluate import evaluate
from .inputs import check_inputs
from .interrupts import Interrupted, StopRequests
from .models import load_models, restore, save_final, save_train_checkpoint
from .optim import make_optimizer, make_scheduler
from .rollout import clock, collect_rollout
from .setup import start_run
from .sharding import gathered
from .update import rollout_metrics, update


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False,
          allow_changes: bool = False) -> Path:
    """Run GRPO. `resume`: continue the latest checkpoint in output_dir (refused when there is none,
    or when it belongs to a different run, unless `allow_changes`); `overwrite`: replace what a
    non-empty output_dir holds (refused otherwise)."""
    run = start_run(cfg, distributed=True)
    device, world, precision, out = run.device, run.world, run.precision, run.out
    say = (lambda *a: None) if quiet or not world.main else print

    # Every input is checked before any model is loaded (data, rewards, output dir, resume, prompts).
    inputs = check_inputs(cfg, run, resume=resume, overwrite=overwrite, allow_changes=allow_changes, say=say)
    rows, eval_rows, rewards, tokenizer = inputs.rows, inputs.eval_rows, inputs.rewards, inputs.tokenizer

    policy, reference = load_models(cfg, run)
    backend = make_backend(cfg.rollout_backend, policy, tokenizer)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * cfg.num_iterations * cfg.num_minibatches)
    sampler = PromptSampler(len(rows), cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + world.rank)

    start_step = 0
    if inputs.checkpoint is not None:
        state = restore(cfg, inputs.checkpoint, policy, optimizer, scheduler, precision, sampler, generator, world)
        load_reward_states(rewards, state.get("reward_states", {}))
        start_step = state["step"]
        backend.sync_weights(policy)

    # The run's config goes to train_config.json (RunLogger): config.json is the model's.
    logger = RunLogger(out, cfg.max_steps, enabled=world.main, quiet=quiet, resume_step=start_step,
                       config=to_dict(cfg))
    if inputs.checkpoint is not None:
        logger.info(f"resumed from {inputs.checkpoint} at step {start_step}")
        if inputs.config_changes:
            logger.log({"step": start_step, "resumed_with_changes": {k: list(v) for k, v in inputs.config_changes.items()}})

    def draw(n: int) -> list[dict]:
        """n rows for this process: every process draws the same global order, each its own slice."""
        indices = sampler.next(n * world.size)
        return [rows[i] for i in indices[world.rank * n:(world.rank + 1) * n]]

    def run_eval() -> dict:
        """Greedy held-out accuracy on rank 0 (every process joins the gather of sharded weights)."""
        with gathered(policy):
            if not world.main:
                return {}
            with precision.autocast():
                result = evaluate(backend, tokenizer, eval_rows, rewards, cfg, inputs.accuracy_name)
        return {"eval_reward": result["reward"], **({"eval_accuracy": result["accuracy"]} if "accuracy" in result else {})}

    def save(step: int) -> Path | None:
        rng = world.gather_objects(rng_state(generator))  # every process takes part
        state = train_state(step, optimizer, scheduler, precision, sampler, to_dict(cfg), rng, reward_states(rewards))
        return save_train_checkpoint(cfg, out, step, policy, optimizer, tokenizer, state, world,
                                     run={"config": to_dict(cfg), "data": inputs.fingerprints, "step": step})

    summary = {}
    if eval_rows and start_step == 0:
        summary["eval_before"] = run_eval()
        logger.info(f"held-out before training: {format_eval(summary['eval_before'])}")
        logger.log({"step": 0, **summary["eval_before"], "elapsed": 0.0})  # the curves' starting point
    train_start = time.time()
    try:
        with StopRequests() as stop:
            for step in range(start_step + 1, cfg.max_steps + 1):
                t0 = clock(device)
                rollout = collect_rollout(policy, reference, tokenizer, draw(cfg.prompts_per_step), rewards, cfg,
                                          generator, gather=world.gather if world.size > 1 else None,
                                          precision=precision, backend=backend, more_rows=draw)
                t1 = clock(device)
                stats = update(policy, optimizer, scheduler, rollout, cfg, world, generator, precision)
                backend.sync_weights(policy)
                t2 = clock(device)

                record = {"step": step, **rollout_metrics(rollout, cfg, inputs.accuracy_name), **stats,
                          "seconds_generate": rollout.timings["generate"], "seconds_score": rollout.timings["score"],
                          "seconds_logprobs": rollout.timings["logprobs"], "seconds_update": t2 - t1,
                          "seconds_step": t2 - t0,
                          "tokens_per_second": rollout.completion_mask.sum().item() / (t2 - t0),
                          "elapsed": time.time() - train_start}
                record = world.average_floats(record)
                if eval_rows and cfg.eval_steps and step % cfg.eval_steps == 0:
                    record.update(run_eval())
                if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                    logger.log(record)
                if cfg.samples_steps and (step % cfg.samples_steps == 0 or step == 1):
                    logger.samples(step, rollout)
                stopping = world.any(stop.requested) and step < cfg.max_steps
                if step < cfg.max_steps and ((cfg.save_steps and step % cfg.save_steps == 0)
                                             or (stopping and cfg.save_on_interrupt)):
                    saved = save(step)
                if stopping:
                    where = f"saved {saved}; continue with --resume" if cfg.save_on_interrupt else \
                        "not saved (save_on_interrupt is off)"
                    raise Interrupted(f"interrupted by {stop.name() or 'another process'} at step {step}: {where}",
                                      stop.signum or 2)

        summary["train_seconds"] = time.time() - train_start
        if eval_rows:
            summary["eval_after"] = run_eval()
            logger.info(f"held-out after training: {format_eval(summary['eval_after'])}")
        save_final(cfg, out, policy, tokenizer, world)
        if world.main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        logger.close()
    world.barrier()
    world.close()
    return out


def format_eval(result: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in result.items())
