"""What a checkpoint of `grpo train` holds and a resume puts back, in one object.

    policy weights (or a LoRA policy's adapter), optimizer, learning-rate schedule, loss scale,
    data position, every process's RNG streams and reward states, the reference when it moves
    (sync_ref_model, iterative RL's reset), iterative RL's reward model, the best evaluation

The object decides once whether the run is sharded (FSDP2: every process writes and reads its
own shards through torch.distributed.checkpoint) or plain (the main process writes one
directory), so the training loop only says `save(step)` and `restore(checkpoint)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grpo.config import TrainConfig, to_dict
from grpo.errors import RunError
from grpo.rewards import load_reward_states, reward_states

from .checkpoint import restore_train_state, restoring, rng_state, save_checkpoint, train_state
from .sharded_checkpoint import is_sharded_checkpoint, restore_sharded_train_state, save_sharded_checkpoint


@dataclass
class TrainingState:
    cfg: TrainConfig
    out: Path
    world: object                  # runtime.distributed.World
    policy: object
    optimizer: object
    scheduler: object
    precision: object              # runtime.precision.Precision (its loss scale)
    sampler: object                # data.PromptSampler (the data position)
    generator: object              # this process's sampling stream
    tokenizer: object
    rewards: list
    reference: object | None = None
    reference_moves: bool = False  # sync_ref_model or iterative RL's reset: the reference is saved too
    rounds: object | None = None   # train.iterative.RewardModelRounds
    best: object | None = None     # train.best_model.BestModel
    run_record: dict = field(default_factory=dict)  # run.json's data and model fingerprints

    def save(self, step: int) -> Path | None:
        """Every process calls this: each gives its RNG streams and reward states (and, sharded,
        writes its own shards); returns the checkpoint's directory on the main process."""
        world, cfg = self.world, self.cfg
        rng = world.gather_objects(rng_state(self.generator))
        states = world.gather_objects(reward_states(self.rewards))  # one per process, in rank order
        state = train_state(step, self.optimizer, self.scheduler, self.precision, self.sampler, to_dict(cfg), rng,
                            states)
        moved = self.reference_moves and self.reference is not None
        state["reference"] = self.reference.state_dict() if moved else None
        state["iterative"] = self.rounds.state_dict() if self.rounds is not None else None
        state["best"] = self.best.state_dict() if self.best is not None else None
        run = {"config": to_dict(cfg), **self.run_record, "step": step}
        if cfg.fsdp:
            return save_sharded_checkpoint(self.out, step, self.policy, self.optimizer, self.tokenizer, state, world,
                                           cfg.save_total_limit, run)
        if world.main:
            return save_checkpoint(self.out, step, self.policy, self.tokenizer, state, cfg.save_total_limit, run=run)
        return None

    def restore(self, checkpoint: Path) -> int:
        """Put everything `save` wrote back; returns the step the checkpoint was saved at."""
        cfg, world = self.cfg, self.world
        args = (checkpoint, self.policy, self.optimizer, self.scheduler, self.precision, self.sampler, self.generator,
                world.rank)
        if cfg.fsdp:
            state = restore_sharded_train_state(*args)
        elif is_sharded_checkpoint(checkpoint):
            raise RunError(f"--resume: {checkpoint} was saved sharded (fsdp: true); resume it with fsdp: true")
        else:
            state = restore_train_state(*args, cfg.model_init_kwargs)
        # Each process's own (its reward model's running moments saw its own samples); a run
        # resumed on more processes than it was saved from starts the extra ones from rank 0's.
        states = state.get("reward_states", {})
        with restoring(checkpoint, "reward states"):
            load_reward_states(self.rewards, states[world.rank if world.rank < len(states) else 0]
                               if isinstance(states, list) else states)
        for key, target, what in (("reference", self.reference, "reference model"),
                                  ("iterative", self.rounds, "iterative RL state"),
                                  ("best", self.best, "best-model record")):
            if target is not None and state.get(key):
                with restoring(checkpoint, what):
                    target.load_state_dict(state[key])
        return state["step"]
