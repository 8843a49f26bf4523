"""Iterative RL (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300, section 4.2, Algorithm 1):
the reward model keeps learning from the policy it trains.

A reward model trained once, on the warm policy's samples, is judged by GRPO on completions it
never saw: the policy drifts to where the reward model errs and is rewarded for its errors. So
every `every` steps a round:

1. samples the current policy on fresh training prompts (their own draw order);
2. labels the samples with a verifier or any labelling function (`labeler`) and pairs them
   (two distinct completions with different labels: the higher one chosen);
3. trains the reward model further on those pairs, `replay` of each batch drawn from the pairs
   of earlier rounds and the original preference data (DeepSeekMath: 10% of historical data; a
   file of rankings is replayed as its pairs across tie groups), its AdamW state carried over
   rounds;
4. hands the new weights to the reward used by GRPO, and (`reset_reference`) makes the current
   policy the reference for the KL term, as Algorithm 1 does at the start of each iteration.

Every process runs the same round (same prompts, same generator, identical policy), so the
reward model stays the same everywhere. The round's state is part of each checkpoint, so a
resumed run continues it exactly.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from grpo.algorithm import bradley_terry_loss
from grpo.config import IterativeSpec
from grpo.data import PromptSampler
from grpo.errors import ConfigError
from grpo.rewards import build_rewards
from grpo.rewards.models import RewardModelScorer, load_reward_model
from grpo.rewards.preferences import Pair, evaluate_pairs, load_preferences, pair_scores, pairs_from_labels
from grpo.rewards.rankings import is_ranking_file, load_rankings, ranking_pairs
from grpo.runtime.precision import Precision
from grpo.runtime.seeds import stream_seed
from grpo.runtime.sharding import gathered

from .rollout import generate_and_score, sampling_params


def replay_pairs(path: str, tokenizer) -> list[Pair]:
    """The original feedback as pairs: a preference file's, or every cross-tier pair of rankings."""
    if not path:
        return []
    if is_ranking_file(path):
        return [p for r in load_rankings(path, tokenizer, log=lambda *a: None) for p in ranking_pairs(r)]
    return load_preferences(path, tokenizer, log=lambda *a: None)


class RewardModelRounds:
    def __init__(self, spec: IterativeSpec, cfg, rows: list[dict], rewards, device: torch.device,
                 precision: Precision):
        scorers = [r.fn for r in rewards if isinstance(r.fn, RewardModelScorer)]
        if not scorers:
            raise ConfigError("iterative_rl: none of the rewards is a reward model ({model: DIR}) to train further")
        self.spec, self.cfg, self.rows, self.device, self.precision = spec, cfg, rows, device, precision
        self.scorer = scorers[0]
        # The trained copy in float32 (master weights); the scorer's copy, in the run's dtype, scores.
        self.rm = load_reward_model(self.scorer.path, device, torch.float32, self.scorer.tokenizer,
                                    max_length=self.scorer.rm.max_length)
        self.rm.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.rm.model.parameters() if p.requires_grad],
                                           lr=spec.learning_rate, betas=(0.9, 0.999))
        self.labeler = build_rewards([spec.labeler], device, precision.dtype)
        self.sampler = PromptSampler(len(rows), stream_seed(cfg.seed, "iterative_prompts"))
        # The same on every process (no rank in it): every process runs the same round.
        self.generator = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, "iterative_sampling"))
        self.history: list[Pair] = replay_pairs(spec.replay_dataset, self.scorer.tokenizer)
        self.round = 0

    def due(self, step: int) -> bool:
        return bool(self.spec.every) and step % self.spec.every == 0

    def run(self, backend, tokenizer, policy=None) -> dict:
        """One round (steps 1-4 above, but the reference reset, which the loop does); its numbers."""
        spec, cfg = self.spec, self.cfg
        self.round += 1
        rows = [self.rows[i] for i in self.sampler.next(spec.prompts)]
        # The policy's own sampling distribution (its temperature, top-p/k, min-p, penalty): the
        # reward model learns the samples it will be asked to score.
        params = dataclasses.replace(sampling_params(cfg, spec.samples_per_prompt), strategy="sample")
        with gathered(policy):  # a sharded policy generates with its full weights, on every process
            scored = generate_and_score(backend, tokenizer, rows, self.labeler, cfg, params, self.generator,
                                        precision=self.precision, device=self.device)
        labels = scored.per_function[self.labeler[0].name].tolist()
        G, rng = spec.samples_per_prompt, random.Random(stream_seed(cfg.seed, "iterative_pairs", self.round))
        new = [pair for p, text in enumerate(scored.texts)
               for pair in pairs_from_labels(text, scored.completions[p * G:(p + 1) * G], labels[p * G:(p + 1) * G],
                                             rng, spec.pairs_per_prompt, f"round {self.round}")]
        stats = {"iterative/round": float(self.round), "iterative/pairs": float(len(new)),
                 "iterative/labeled_accuracy": sum(labels) / max(len(labels), 1)}
        if not new:
            return stats
        # How well the reward model still ranks the current policy's samples, before it learns them.
        with self.precision.autocast():
            stats["iterative/rm_accuracy_before"] = evaluate_pairs(self.rm, new, spec.batch_size)["accuracy"]
        stats["iterative/rm_loss"] = self.train(new)
        self.history += new
        self.scorer.rm.model.load_state_dict(self.rm.model.state_dict())  # cast to the scorer's dtype
        return stats

    def train(self, new: list[Pair]) -> float:
        spec = self.spec
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "iterative_batches", self.round))
        n_old = int(round(spec.batch_size * spec.replay)) if self.history else 0
        losses = []
        for _ in range(spec.steps):
            batch = [new[i] for i in torch.randint(len(new), (spec.batch_size - n_old,), generator=g).tolist()]
            if n_old:
                batch += [self.history[i] for i in torch.randint(len(self.history), (n_old,), generator=g).tolist()]
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                c, r = pair_scores(self.rm, batch)
                loss = bradley_terry_loss(c, r)
                if spec.nll_coef and hasattr(self.rm, "nll"):
                    loss = loss + spec.nll_coef * self.rm.nll([p.prompt for p in batch], [p.chosen for p in batch])
            self.precision.backward(loss)
            self.precision.step(self.optimizer, self.rm.model.parameters(), 1.0)
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def state_dict(self) -> dict:
        return {"round": self.round, "sampler": self.sampler.state_dict(), "generator": self.generator.get_state(),
                "optimizer": self.optimizer.state_dict(), "model": self.rm.model.state_dict(),
                "history": [(p.prompt, p.chosen, p.rejected, p.margin, p.where) for p in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.rm.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [Pair(*p) for p in state["history"]]
        self.scorer.rm.model.load_state_dict(self.rm.model.state_dict())
