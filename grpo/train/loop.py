"""`grpo train`: the GRPO loop. `train` checks every input and claims the output directory; read
`run_training` top to bottom: set up, then per step rollout, update, log, checkpoint, and after
the last step the final evaluation and the save.

The maths is in `grpo.algorithm`; generation is behind `grpo.engine.backend`; the models as the
config asks for them (LoRA, FSDP2) in `runs.models`; this file only wires the stages together
(docs/DESIGN.md, "One step").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from grpo.config import IterativeSpec, TrainConfig, build, to_dict
from grpo.data import PromptSampler
from grpo.engine.backend import make_backend
from grpo.engine.vllm_backend import VLLMOptions
from grpo.observe.progress import format_numbers
from grpo.observe.tracking import RunLogger
from grpo.runs.checkpoint import load_weights, save_model
from grpo.runs.inputs import check_inputs
from grpo.runs.interrupts import Interrupted, StopRequests
from grpo.runs.model_card import write_model_card
from grpo.runs.models import load_models, save_final
from grpo.runs.run_dir import STAGING, publish, staging_dir
from grpo.runs.state import TrainingState
from grpo.runtime import host_memory
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.runtime.setup import start_run
from grpo.runtime.seeds import stream_seed
from grpo.runtime.sharding import gathered
from grpo.runtime.timing import PhaseTimer

from .agent_rollout import AgentSetup
from .best_model import BEST_DIR, BestModel
from .evaluate import AccuracyReward, evaluate
from .iterative import RewardModelRounds
from .reference_sync import ReferenceSync
from .rollout import collect_rollout, trainer_state
from .update import rollout_metrics, update, with_logged_metrics


def train(cfg: TrainConfig | dict, resume: bool = False, quiet: bool = False, overwrite: bool = False,
          allow_changes: bool = False, config_path: str | None = None) -> Path:
    """Run GRPO. `cfg`: a TrainConfig (from `build` or `load_config`), or the dict of keys to build
    one from (Python functions and datasets welcome). `resume`: continue the latest checkpoint in
    output_dir (refused when there is none, when it is at max_steps already, or when it belongs to
    a different run, unless `allow_changes`); `overwrite`: replace what a non-empty output_dir
    holds, when grpo wrote all of it (runs.run_dir says what may be deleted); `config_path`: the
    config file the run was loaded from, an input no overwrite may delete."""
    cfg = build(TrainConfig, cfg, "train()") if isinstance(cfg, dict) else cfg
    run = start_run(cfg, distributed=True)
    say = (lambda *a: None) if quiet or not run.world.main else print

    # Every input is checked before any model is loaded (data, rewards, output dir, resume, prompts);
    # then the output directory is locked for this run (and emptied, under --overwrite).
    inputs = check_inputs(cfg, run, resume=resume, overwrite=overwrite, allow_changes=allow_changes, say=say,
                          config_path=config_path)
    with inputs.lock:  # held until the run ends, however it ends
        return run_training(cfg, run, inputs, quiet)


def backend_options(cfg: TrainConfig, run) -> dict:
    """The rollout backend's own settings from the config (the local engine has none)."""
    if cfg.rollout_backend != "vllm":
        return {}
    return {"options": VLLMOptions(
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, max_model_len=cfg.vllm_max_model_len,
        enable_sleep_mode=cfg.vllm_enable_sleep_mode, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        dtype=run.dtype, max_num_seqs=cfg.prompts_per_step * cfg.group_size, lora=cfg.vllm_lora)}


def run_training(cfg: TrainConfig, run, inputs, quiet: bool) -> Path:
    """The run itself, once its inputs are checked and its directory claimed (`train`)."""
    device, world, precision, out = run.device, run.world, run.precision, run.out
    rows, eval_rows, rewards, tokenizer = inputs.rows, inputs.eval_rows, inputs.rewards, inputs.tokenizer

    policy, reference = load_models(cfg, run)
    host_memory.configure(cfg, policy, device)  # on a CPU: freed tensors go back to the OS (large models)
    backend = make_backend(cfg.rollout_backend, policy, tokenizer, **backend_options(cfg, run))
    # Agent runs: episodes of several turns make the rollout (tools, environments, their threads).
    agent = AgentSetup(*inputs.agent, rollout_func=cfg.rollout_func) if inputs.agent is not None else None
    steps_per_rollout = cfg.num_iterations * cfg.num_minibatches  # optimizer steps
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * steps_per_rollout)
    sampler = PromptSampler(len(rows), cfg.seed, shuffle=cfg.shuffle_dataset)
    generator = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, "rollout", world.rank))
    eval_generator = torch.Generator(device=device)  # num_generations_eval > 1; seeded per evaluation

    # Guards against a reward model's errors: it keeps learning (iterative RL), and the held-out
    # verifier's best is kept and watched (early stopping).
    iterative = IterativeSpec(**cfg.iterative_rl)
    rounds = RewardModelRounds(iterative, cfg, rows, rewards, device, precision) if iterative.every else None
    best = (BestModel(cfg.metric_for_best_model, cfg.greater_is_better, cfg.early_stopping_patience,
                      cfg.load_best_model_at_end, out)
            if cfg.early_stopping_patience or cfg.load_best_model_at_end else None)

    # What a checkpoint holds and a resume puts back (grpo.runs.state).
    moves = cfg.sync_ref_model or (rounds is not None and iterative.reset_reference)  # then it is saved too
    checkpoints = TrainingState(cfg, out, world, policy, optimizer, scheduler, precision, sampler, generator,
                                tokenizer, rewards, reference, reference_moves=moves, rounds=rounds, best=best,
                                run_record={"data": inputs.fingerprints, "model": inputs.model})
    start_step = 0
    if inputs.checkpoint is not None:
        start_step = checkpoints.restore(inputs.checkpoint)
        backend.sync_weights(policy)
    sync_reference = ReferenceSync(policy, reference, cfg.ref_model_sync_steps, cfg.ref_model_mixup_alpha,
                                   done=start_step * steps_per_rollout) if cfg.sync_ref_model else None

    # The run's config goes to train_config.json (RunLogger): config.json is the model's.
    logger = RunLogger(out, cfg.max_steps, enabled=world.main, quiet=quiet, resume_step=start_step,
                       config=to_dict(cfg))
    if inputs.checkpoint is not None:
        logger.info(f"resumed from {inputs.checkpoint} at step {start_step}")
        if inputs.config_changes:
            logger.log({"step": start_step,
                        "resumed_with_changes": {k: list(v) for k, v in inputs.config_changes.items()}})

    # Held-out accuracy: the named reward, else the first whose values are all 0 or 1 (said once).
    accuracy = AccuracyReward(rewards, cfg.accuracy_reward, logger.info)

    def draw(n: int) -> list[dict]:
        """n rows for this process: every process draws the same global order, each its own slice."""
        indices = sampler.next(n * world.size)
        return [rows[i] for i in indices[world.rank * n:(world.rank + 1) * n]]

    def run_eval(step: int, decide: bool = False) -> dict:
        """The held-out numbers, on rank 0; every process joins the gather of sharded weights and
        the choice of the accuracy reward."""
        with gathered(policy):
            if not world.main:
                if decide:
                    accuracy.decide(None, world, "the held-out set")
                return {}
            eval_generator.manual_seed(stream_seed(cfg.seed, "eval", step))  # the same draws after a resume
            with precision.autocast():
                result = evaluate(backend, tokenizer, eval_rows, rewards, cfg, generator=eval_generator,
                                  trainer_state=trainer_state(cfg, step * steps_per_rollout, sampler.epochs_done),
                                  agent=agent)
        if decide:
            accuracy.decide(result["values"], world, "the held-out set")
        found = accuracy.of(result["values"])
        return {"eval_reward": result["reward"], **({} if found is None else {"eval_accuracy": found}),
                **{f"eval_{k}": v for k, v in result["logged"].items()}}

    def keep_best_and_stop(step: int, record: dict) -> bool:
        """After an evaluation: keep a new best; whether to stop early (the same on every process)."""
        stop = (best is not None and world.main
                and best.observe(step, record, lambda d: save_model(d, policy, tokenizer)))
        return world.any(stop) if best is not None else False

    summary = {}
    if eval_rows and start_step == 0:
        summary["eval_before"] = run_eval(0, decide=True)
        logger.info(f"held-out before training: {format_numbers(summary['eval_before'])}")
        logger.log({"step": 0, **summary["eval_before"], "elapsed": 0.0})  # the curves' starting point
        keep_best_and_stop(0, summary["eval_before"])
    train_start = time.time()
    try:
        with StopRequests() as stop:
            for step in range(start_step + 1, cfg.max_steps + 1):
                timer = PhaseTimer(device)
                trl_state = trainer_state(cfg, (step - 1) * steps_per_rollout, sampler.epochs_done)  # before the draw
                with timer.phase("rollout"):
                    rollout = collect_rollout(policy, reference, tokenizer, draw(cfg.prompts_per_step), rewards, cfg,
                                              generator, gather=world.gather if world.size > 1 else None,
                                              precision=precision, backend=backend, more_rows=draw,
                                              trainer_state=trl_state, agent=agent)
                accuracy.decide(rollout.rewards_per_function, world, "the first rollout")
                with timer.phase("update"):
                    stats = update(policy, optimizer, scheduler, rollout, cfg, world, generator, precision,
                                   after_step=sync_reference)
                with timer.phase("sync_weights"):
                    backend.sync_weights(policy)
                round_stats = {}
                if rounds is not None and rounds.due(step):  # iterative RL: the reward model learns on
                    with timer.phase("iterative"):
                        round_stats = rounds.run(backend, tokenizer, policy)
                        if iterative.reset_reference and reference is not None:
                            reference.load_state_dict(policy.state_dict())  # Algorithm 1: pi_ref <- pi_theta

                seconds = {**rollout.timings, **{k: v for k, v in timer.seconds.items() if k != "rollout"}}
                record = {"step": step, **rollout_metrics(rollout, cfg, accuracy.name), **stats,
                          **{f"seconds_{k}": v for k, v in seconds.items()}, "seconds_step": timer.total(),
                          "tokens_per_second": rollout.completion_mask.sum().item() / timer.total(),
                          "elapsed": time.time() - train_start, **round_stats}
                record = world.average_floats(with_logged_metrics(record, rollout.reward_log.means()))
                stop_early, evaluated = False, eval_rows and cfg.eval_steps and step % cfg.eval_steps == 0
                if evaluated:
                    record.update(run_eval(step))
                    stop_early = keep_best_and_stop(step, record)
                # A step that evaluated or ran a reward-model round is always written: its numbers
                # exist at that step only.
                if step % cfg.logging_steps == 0 or step == cfg.max_steps or evaluated or round_stats:
                    logger.log(record)
                if cfg.samples_steps and (step % cfg.samples_steps == 0 or step == 1):
                    logger.samples(step, rollout)
                stopping = world.any(stop.requested) and step < cfg.max_steps
                if step < cfg.max_steps and ((cfg.save_steps and step % cfg.save_steps == 0)
                                             or (stopping and cfg.save_on_interrupt)):
                    saved = checkpoints.save(step)
                if stopping:
                    where = f"saved {saved}; continue with --resume" if cfg.save_on_interrupt else \
                        "not saved (save_on_interrupt is off)"
                    raise Interrupted(f"interrupted by {stop.name() or 'another process'} at step {step}: {where}",
                                      stop.signum or 2)
                if stop_early:
                    summary["early_stopped_at"] = step
                    if world.main:  # only the main process observes the evaluations
                        logger.info(f"early stopping at step {step}: no better {cfg.metric_for_best_model} in "
                                    f"{cfg.early_stopping_patience} evaluations (best {best.value:.4f} at step "
                                    f"{best.step})")
                    break

            # Every step is trained: from here a signal abandons the final evaluation, never the
            # trained model, which is saved before the run stops.
            with stop.deferred():
                summary["train_seconds"] = time.time() - train_start
                if best is not None and cfg.load_best_model_at_end and best.value is not None:
                    # The main process (the only one that watched the evaluations, and the one that
                    # evaluates and saves below) goes back to the best evaluation's weights.
                    load_weights(out / BEST_DIR, policy, cfg.model_init_kwargs)
                    summary["best"] = {"step": best.step, cfg.metric_for_best_model: best.value}
                # Every process agrees whether to start the evaluation (it may gather sharded weights).
                skipped = bool(eval_rows) and world.any(stop.requested)
                if eval_rows and not skipped:
                    after = stop.unless_stopped(lambda: run_eval(cfg.max_steps))
                    skipped = after is None
                    if not skipped and world.main:
                        summary["eval_after"] = after
                        logger.info(f"held-out after training: {format_numbers(summary['eval_after'])}")
                if skipped:
                    summary["eval_after_skipped"] = f"stopped by {stop.name() or 'another process'}"
                save_everything(cfg, out, policy, tokenizer, world, rounds, summary)
            if world.any(stop.requested):
                last = summary.get("early_stopped_at", cfg.max_steps)
                raise Interrupted(f"interrupted by {stop.name() or 'another process'} after the last step "
                                  f"({last}): {'the final evaluation was skipped; ' if skipped else ''}"
                                  f"the trained model is saved in {out}", stop.signum or 2)
    finally:
        logger.close()
        if agent is not None:
            agent.close()
    world.barrier()
    if hasattr(backend, "close"):
        backend.close()  # an engine in the process group goes before the group (rollout_backend: vllm)
    world.close()
    return out


def save_everything(cfg: TrainConfig, out: Path, policy, tokenizer, world, rounds, summary: dict) -> None:
    """The trained model, the reward model iterative RL left, summary.json and the model card:
    written into a temporary directory beside them, then moved into `out` (runs.run_dir.publish),
    so a run killed while saving never leaves a half-written model."""
    final = staging_dir(out) if world.main else out / STAGING
    world.barrier()  # the directory exists before any process writes into it
    save_final(cfg, final, policy, tokenizer, world)
    if not world.main:
        return
    if rounds is not None:  # the reward model as iterative RL left it
        rounds.rm.save(final / "reward_model")
    (final / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.model_card:
        write_model_card(final, to_dict(cfg), {k.removeprefix("eval_"): v for k, v in summary.items()
                                               if k.startswith("eval_") and isinstance(v, dict)}, shown_as=out)
    publish(final, out)
