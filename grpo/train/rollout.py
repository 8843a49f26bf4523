"""Rollout: prompts -> G completions each -> rewards -> advantages -> old / reference log-probs.

One `Rollout` (a dataclass of tensors) carries a step's data from generation to the update. Rows
p*G .. p*G+G-1 are prompt p's group throughout.

With `dynamic_sampling` (DAPO, Yu et al. 2025, arXiv:2503.14476, section 3.2) groups whose
rewards all tie are dropped and more prompts are drawn (`more_rows`) until the step holds
prompts_per_step groups that teach, in at most `max_generation_rounds` generation calls.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from grpo import algorithm
from grpo.data import as_completion, completion_ids_list, decode_completions, prompt_batch
from grpo.engine.adapters import reference_policy
from grpo.engine.backend import LocalBackend, RolloutBackend, SamplingParams
from grpo.engine.generation import Generation
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import stop_token_ids
from grpo.engine.stochastic_beam import priority_weights
from grpo.rewards import score
from grpo.rewards.scoring import RewardLog
from grpo.rewards.steps import completion_steps, load_splitter, score_steps
from grpo.runs.inputs import reward_columns
from grpo.runtime.host_memory import large_vocabulary
from grpo.runtime.precision import Precision
from grpo.runtime.sharding import gathered
from grpo.runtime.timing import PhaseTimer, synced_time

from .agent_rollout import AgentSetup, score_episodes


@dataclass
class Rollout:
    prompt_ids: torch.Tensor          # [N, Lp] left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor         # [N, Lp]
    completion_ids: torch.Tensor      # [N, T] right-padded
    completion_mask: torch.Tensor     # [N, T] float: 1 on tokens up to and incl. EOS (0 for masked truncated rows)
    truncated: torch.Tensor           # [N] bool: no EOS within max_completion_length
    lengths: torch.Tensor             # [N] generated tokens, EOS included
    rewards: torch.Tensor             # [N] weighted sum of the rewards (less the KL with reward_kl_coef)
    advantages: torch.Tensor          # [N], or [N, T] per token (advantage_estimator: process)
    rewards_per_function: dict[str, torch.Tensor]
    # [N] the weighted sum before reward_kl_coef's KL shift (the same as `rewards` without one): what
    # the reward functions said, so ties between them are counted here (zero_variance_frac), not
    # on the shifted rewards, which the KL unties. None where a rollout was built without it.
    rewards_before_kl: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None   # [N, T] pi_old, when the update needs it
    ref_logprobs: torch.Tensor | None = None   # [N, T] pi_ref, when beta > 0 or the ratio is anchored there
    prompts: list[str] = field(default_factory=list)      # formatted prompt text, one per row
    completions: list[str] = field(default_factory=list)  # decoded completion text, one per row
    timings: dict[str, float] = field(default_factory=dict)
    sampling_logprobs: torch.Tensor | None = None  # [N, T] pi_sampler: what the tokens were drawn from
    sample_weights: torch.Tensor | None = None     # [N] priority weights of stochastic-beam groups
    sampling_stats: dict[str, float] = field(default_factory=dict)  # dynamic sampling's counts
    reward_log: RewardLog = field(default_factory=RewardLog)  # what reward functions logged (TRL's hooks)
    messages: list | None = None  # agent runs: each episode's conversation (tool calls and results)
    steps: algorithm.StepRewards | None = None  # process supervision: each completion's steps and their rewards

    def __len__(self) -> int:
        return self.completion_ids.size(0)


def sampling_params(cfg, group_size: int | None = None) -> SamplingParams:
    return SamplingParams(group_size=group_size or cfg.group_size, max_new_tokens=cfg.max_completion_length,
                          strategy=cfg.generation, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty)


@dataclass
class Scored:
    """One batch of prompts, generated and scored (the rollout's and evaluation's common part, and
    the unit dynamic sampling keeps or drops)."""
    rows: list[dict]                 # the dataset rows, one per prompt
    texts: list[str]                 # formatted prompts, one per prompt
    prompt_ids: torch.Tensor         # [P, Lp]
    prompt_mask: torch.Tensor
    generation: Generation           # [P*G, T]
    completions: list[str]           # decoded text, one per completion
    total: torch.Tensor              # [P*G] weighted sum
    per_function: dict[str, torch.Tensor]
    seconds_generate: float = 0.0
    seconds_score: float = 0.0
    # Agent episodes (grpo.train.agent_rollout): prompts are per row [P*G, Lp] (an environment may
    # change a row's prompt), lengths count every completion token (tool results too), and the
    # agent's metrics and each episode's messages come along.
    per_row: bool = False
    lengths: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    messages: list | None = None
    steps: algorithm.StepRewards | None = None  # process supervision (`step_rewards`)

    def expanded_prompts(self, G: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Prompt ids, mask and text of every row (a group's prompt repeated G times)."""
        if self.per_row:
            return self.prompt_ids, self.prompt_mask, list(self.texts)
        return (self.prompt_ids.repeat_interleave(G, 0), self.prompt_mask.repeat_interleave(G, 0),
                [t for t in self.texts for _ in range(G)])

    def take(self, groups: list[int], G: int) -> "Scored":
        """The groups `groups`, in that order. Timings and agent metrics stay behind: they are the
        whole batch's (`dynamic_sampling` counts them over every round)."""
        rows = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
        on = rows.to(self.total.device)
        prompts = rows.tolist() if self.per_row else groups
        return Scored([self.rows[g] for g in groups], [self.texts[i] for i in prompts],
                      self.prompt_ids[prompts], self.prompt_mask[prompts], self.generation.select(on),
                      [self.completions[i] for i in rows.tolist()], self.total[on],
                      {k: v[on] for k, v in self.per_function.items()},
                      per_row=self.per_row, lengths=None if self.lengths is None else self.lengths[on],
                      messages=None if self.messages is None else [self.messages[i] for i in rows.tolist()])


def completion_stop_ids(backend: RolloutBackend, tokenizer) -> list[int]:
    """The ids `backend` ends a completion on: the tokenizer's EOS and every EOS of the model's
    generation config (`grpo.engine.models.stop_token_ids`). A backend that does not say is
    taken to stop where its model's own `generate` would."""
    ids = getattr(backend, "stop_token_ids", None)
    return list(ids) if ids is not None else stop_token_ids(tokenizer, getattr(backend, "model", None))


def generate_and_score(backend: RolloutBackend, tokenizer, rows: list[dict], rewards, cfg, params: SamplingParams,
                generator, *, log: RewardLog | None = None, trainer_state=None, precision: Precision | None = None,
                device=None, agent: AgentSetup | None = None) -> Scored:
    """G = params.group_size completions for each row's prompt, and their rewards, called with
    TRL's contract (grpo.rewards.scoring): the row's prompt as given (text or messages), each
    completion as text or as one assistant message, the token ids, the columns. With `agent`,
    G episodes of each row instead (grpo.train.agent_rollout)."""
    G = params.group_size
    if agent is not None:
        (texts, prompt_ids, prompt_mask, out, completions, total, per_function, lengths, stats, messages,
         seconds_generate, seconds_score, steps) = score_episodes(
            agent, backend, tokenizer, rows, rewards, cfg, params, generator, completion_stop_ids(backend, tokenizer),
            log=log if log is not None else RewardLog(), trainer_state=trainer_state, precision=precision,
            device=device, clock=lambda: synced_time(device))
        return Scored(list(rows), texts, prompt_ids, prompt_mask, out, completions, total, per_function,
                      seconds_generate, seconds_score, per_row=True, lengths=lengths, stats=stats, messages=messages,
                      steps=steps)
    t0 = synced_time(device)
    raw = [row[cfg.prompt_column] for row in rows]
    texts, prompt_ids, prompt_mask = prompt_batch(tokenizer, raw, cfg.max_prompt_length, cfg.apply_chat_template,
                                                  cfg.chat_template_kwargs, device)
    with (precision.autocast() if precision is not None else contextlib.nullcontext()):
        out = backend.generate(prompt_ids, prompt_mask, params, generator)
    t1 = synced_time(device)

    # Decoded once, the same way for rewards and evaluation (data.decode_completions), cut at
    # whichever stop id ended each completion, as generation's masks and truncation flags are.
    completions = decode_completions(tokenizer, out.completion_ids, out.completion_mask,
                                     stop_ids=completion_stop_ids(backend, tokenizer))
    prompts = [p for p in raw for _ in range(G)]
    columns = {k: [row.get(k) for row in rows for _ in range(G)] for k in reward_columns(rows[0], cfg.prompt_column)}
    log = log if log is not None else RewardLog()
    ids = completion_ids_list(out.completion_ids, out.completion_mask)
    outcome = [r for r in rewards if r.per != "step"]
    total, per_function = score(
        outcome, prompts, [as_completion(p, c) for p, c in zip(prompts, completions)], columns,
        timeout=cfg.reward_timeout, completion_ids=ids,
        trainer_state=trainer_state, log_metric=log.log_metric, log_extra=log.log_extra,
        model_texts=([t for t in texts for _ in range(G)], completions), group_size=G)
    steps = None
    if getattr(cfg, "advantage_estimator", "") == "process":
        steps, per_step = step_rewards(tokenizer, backend, rewards, cfg, prompts, completions, ids, columns,
                                       out.completion_ids.shape[1], has_outcome=bool(outcome))
        per_function = {**per_function, **per_step}
    t2 = synced_time(device)
    return Scored(list(rows), texts, prompt_ids, prompt_mask, out, completions, total, per_function, t1 - t0, t2 - t1,
                  steps=steps)


def step_rewards(tokenizer, backend, rewards, cfg, prompts: list, completions: list[str], ids: list[list[int]],
                 columns: dict, width: int, has_outcome: bool) -> tuple[algorithm.StepRewards, dict]:
    """Process supervision: each completion cut into steps (`step_delimiter` or `step_splitter`,
    grpo.data.steps), its steps scored by the `per: step` rewards, as padded tensors; and each step
    reward's mean over each completion's steps, for its metrics."""
    per_step = [r for r in rewards if r.per == "step"]
    N = len(completions)
    scores: list[list[float]] = [[] for _ in range(N)]
    ends: list[list[int]] = [[] for _ in range(N)]
    means: dict = {}
    if per_step:
        texts, ends = completion_steps(tokenizer, completions, ids, completion_stop_ids(backend, tokenizer),
                                       cfg.step_delimiter, load_splitter(cfg.step_splitter))
        scores, means = score_steps(per_step, prompts, [as_completion(p, c) for p, c in zip(prompts, completions)],
                                    texts, columns, timeout=cfg.reward_timeout)
    S = max((len(s) for s in scores), default=0)
    valid = torch.tensor([[j < len(s) for j in range(S)] for s in scores], dtype=torch.bool).reshape(N, S)
    return algorithm.StepRewards(
        scores=torch.tensor([s + [0.0] * (S - len(s)) for s in scores], dtype=torch.float32).reshape(N, S),
        ends=torch.tensor([e + [0] * (S - len(e)) for e in ends], dtype=torch.long).reshape(N, S),
        valid=valid, lengths=torch.tensor([len(i) for i in ids], dtype=torch.long), width=width,
        outcome=has_outcome), means


def _cat(parts: list[Scored], pad_token_id: int) -> Scored:
    """Several rounds' groups as one batch: prompts left-padded, completions right-padded alike."""
    if len(parts) == 1:
        return parts[0]
    Lp = max(p.prompt_ids.shape[1] for p in parts)

    def left(x, value):
        return torch.nn.functional.pad(x, (Lp - x.shape[1], 0), value=value)

    agent = parts[0].per_row
    return Scored([r for p in parts for r in p.rows], [t for p in parts for t in p.texts],
                  torch.cat([left(p.prompt_ids, pad_token_id) for p in parts]),
                  torch.cat([left(p.prompt_mask, 0) for p in parts]),
                  Generation.cat([p.generation for p in parts], pad_token_id),
                  [c for p in parts for c in p.completions], torch.cat([p.total for p in parts]),
                  {k: torch.cat([p.per_function[k] for p in parts]) for k in parts[0].per_function},
                  per_row=agent, lengths=torch.cat([p.lengths for p in parts]) if agent else None,
                  messages=[m for p in parts for m in p.messages] if agent else None)


def mean_metrics(batches: list[Scored]) -> dict[str, float]:
    """The agent metrics (means per episode) of several batches as one mean over all their
    episodes; a kind of tool error one batch did not see counts 0 there."""
    n = [len(b.completions) for b in batches]
    keys = dict.fromkeys(k for b in batches for k in b.stats)
    return {k: sum(b.stats.get(k, 0.0) * m for b, m in zip(batches, n)) / sum(n) for k in keys}


def logprob_temperature(cfg) -> float:
    # Training log-probs use the distribution completions were drawn from: tempered for sampling
    # (with or without replacement), the plain model for beam search (which scores beams at
    # temperature 1).
    return cfg.temperature if cfg.generation in ("sample", "stochastic_beam") else 1.0


def needs_old_logprobs(cfg) -> bool:
    # With one optimizer step per rollout pi_old == pi_theta at update time, so the ratio is
    # exp(l - l.detach()) and no second forward pass is needed (algorithm.policy_loss does that,
    # and the off-policy weights take pi_old = l.detach() the same way: the special case of
    # tests/test_token_weights.py). Otherwise pi_old is computed here, before any update.
    uses_old = cfg.ratio_anchor == "old" or cfg.off_policy_correction != "none"
    return uses_old and (cfg.num_iterations > 1 or cfg.num_minibatches > 1)


def logprob_chunk_size(cfg, model) -> int:
    """Scored tokens per LM-head pass (config key logprob_chunk_size; -1: 128 for a large
    vocabulary, else all at once)."""
    size = cfg.logprob_chunk_size
    if size >= 0:
        return size
    return 128 if large_vocabulary(model) else 0


def recompute_mlp(cfg, model) -> bool:
    """Whether the packed Llama-style forward recomputes its MLPs' activations (config key
    mlp_activations; auto: for a large vocabulary)."""
    if cfg.mlp_activations != "auto":
        return cfg.mlp_activations == "recompute"
    return large_vocabulary(model)


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int,
                     logprob_chunk_size: int = 0, mask: torch.Tensor | None = None,
                     recompute_mlp: bool = False) -> torch.Tensor:
    """Log-probs of the rollout's completions under `model`, on the tokens of `mask` (default: the
    loss mask)."""
    mask = rollout.completion_mask if mask is None else mask
    out = []
    for i in range(0, len(rollout), micro_batch_size):
        s = slice(i, i + micro_batch_size)
        lp, _ = completion_logprobs(model, rollout.prompt_ids[s], rollout.prompt_mask[s],
                                    rollout.completion_ids[s], mask[s], temperature,
                                    logprob_chunk_size=logprob_chunk_size, recompute_mlp=recompute_mlp)
        out.append(lp.float())
    return torch.cat(out)


def dynamic_sampling(first: Scored, more_rows, generate, cfg, gather) -> tuple[list[Scored], dict, list[Scored]]:
    """DAPO's dynamic sampling (arXiv:2503.14476, section 3.2: the objective's constraint
    0 < |{o_i correct}| < G): keep the groups whose rewards do not all tie, and draw and generate
    more prompts until prompts_per_step of them are kept.

    The filter is on the VARIANCE of the rewards (all G equal or not), not on their mean: with
    a continuous or weighted reward a mean-only rule (e.g. "mean strictly between 0 and 1") keeps
    tied groups, whose advantages are all zero. Round r > 1 draws n = ceil(deficit / rate) rows
    (rate: the fraction of groups kept so far; at most prompts_per_step), with n equal on every
    process (the deficits are gathered), so that `more_rows(n)` can take each process's slice of
    one global order. At most `max_generation_rounds` generation calls; a batch still short after
    them is topped up with tied groups (zero advantage: no policy gradient, only the KL term),
    so the update keeps its shape, and that is logged. Informative groups beyond the batch are
    dropped (DAPO's, verl's choice), as are the tied ones. Returns the kept groups (one `Scored`
    per round that kept any), the counts, and every round's whole batch (what the time went on).
    """
    G, P = cfg.group_size, cfg.prompts_per_step
    kept, tied, generated = [], [], 0

    def absorb(groups: Scored) -> None:
        nonlocal generated
        zero = algorithm.zero_variance_groups(groups.total, G).tolist()
        kept.extend((groups, g) for g, z in enumerate(zero) if not z)
        tied.extend((groups, g) for g, z in enumerate(zero) if z)
        generated += len(zero)

    batches = [first]
    absorb(first)
    rounds = 1
    while True:
        mine = torch.tensor([P - min(len(kept), P), len(kept), generated], dtype=torch.float64,
                            device=first.total.device)
        every = mine.view(1, 3) if gather is None else gather(mine).view(-1, 3)
        need = int(every[:, 0].max())
        if need == 0 or rounds >= cfg.max_generation_rounds:
            break
        if more_rows is None:
            raise ValueError("dynamic_sampling needs more prompts: pass collect_rollout(more_rows=...)")
        rate = float(every[:, 1].sum() / every[:, 2].sum())
        n = P if rate == 0 else min(P, math.ceil(need / rate))
        rows = more_rows(n)
        rounds += 1
        if len(kept) < P:  # a full process still draws its rows, so every process's order advances alike
            batches.append(generate(rows))
            absorb(batches[-1])
    chosen = kept[:P]
    short = P - len(chosen)
    chosen += tied[:short]
    # One Scored per round that contributed, its groups in generation order.
    parts: dict[int, tuple[Scored, list[int]]] = {}
    for groups, g in chosen:
        parts.setdefault(id(groups), (groups, []))[1].append(g)
    selected = [groups.take(sorted(gs), G) for groups, gs in parts.values()]
    stats = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/prompts_generated": float(generated),
             "dynamic_sampling/groups_dropped": float(generated - P),
             "dynamic_sampling/tied_groups_kept": float(short),
             "dynamic_sampling/zero_variance_frac": len(tied) / max(generated, 1),
             **mean_metrics(batches)}  # an agent run's metrics count every episode run, kept or dropped
    return selected, stats, batches


def collect_rollout(policy, reference, tokenizer, rows: list[dict], rewards, cfg, generator: torch.Generator,
                    gather=None, precision: Precision | None = None, backend: RolloutBackend | None = None,
                    more_rows: Callable[[int], list[dict]] | None = None, trainer_state=None,
                    agent: AgentSetup | None = None) -> Rollout:
    """Generate, score and normalise one step's groups (with `agent`: episodes, grpo.train.agent_rollout).

    `backend` generates (default: the local engine on `policy`); `policy` and `reference` give the
    trainer-side log-probs (`reference` may be `policy` itself when it carries a LoRA adapter:
    pi_ref is then the policy with its adapter off). `gather` all-gathers a tensor across
    processes (None on one process), so batch-wide advantage statistics are counted over the
    global batch. `precision` says what the forward passes compute in (float32 when None).
    Sharded models (`fsdp`) are gathered whole for their own passes only (`sharding.gathered`:
    the policy for generation and for pi_old, the reference for pi_ref, never both at once);
    every process must call this. `trainer_state` is what reward functions that take it receive
    (TRL's TrainerState).

    `more_rows(n)` (dynamic_sampling only) returns n more dataset rows for this process; every
    process calls it with the same n in the same rounds, so it can take this process's slice of
    the next n * world_size rows of the global order, as the step's own rows are taken.
    """
    device = next(policy.parameters()).device
    precision = precision or Precision(device, torch.float32)
    backend = backend or LocalBackend(policy, tokenizer)
    G = cfg.group_size
    log = RewardLog()

    def generate(batch_rows) -> Scored:
        with gathered(policy):  # a sharded policy is whole for its rollout only
            return generate_and_score(backend, tokenizer, batch_rows, rewards, cfg, sampling_params(cfg), generator,
                                      log=log, trainer_state=trainer_state, precision=precision, device=device,
                                      agent=agent)

    scored = generate(rows)
    stats = {}
    if cfg.dynamic_sampling:
        parts, stats, batches = dynamic_sampling(scored, more_rows, generate, cfg, gather)
        scored = _cat(parts, tokenizer.pad_token_id)
        # The step's generation and scoring time is every round's, the dropped groups' too.
        scored.seconds_generate = sum(b.seconds_generate for b in batches)
        scored.seconds_score = sum(b.seconds_score for b in batches)
    out, total = scored.generation, scored.total
    prompt_ids, prompt_mask, prompts = scored.expanded_prompts(G)
    stats = {**stats, **scored.stats}
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=out.completion_ids,
        completion_mask=algorithm.loss_mask(out.completion_mask, out.truncated, cfg.mask_truncated_completions),
        truncated=out.truncated, lengths=out.completion_mask.sum(1) if scored.lengths is None else scored.lengths,
        rewards=total, advantages=torch.zeros_like(total), rewards_per_function=scored.per_function,
        rewards_before_kl=total,
        prompts=prompts, completions=scored.completions,
        sampling_logprobs=out.sampling_logprobs, sampling_stats=stats, reward_log=log, messages=scored.messages,
        steps=scored.steps)

    timer = PhaseTimer(device)
    temperature = logprob_temperature(cfg)
    chunk, recompute = logprob_chunk_size(cfg, policy), recompute_mlp(cfg, policy)
    with timer.phase("logprobs"):
        if needs_old_logprobs(cfg):
            with precision.autocast(), gathered(policy):
                rollout.old_logprobs = batched_logprobs(policy, rollout, temperature, cfg.micro_batch_size, chunk,
                                                        recompute_mlp=recompute)
        if reference is not None:
            # `reference is policy`: a LoRA policy, whose reference is its base model (the adapter
            # off). With the KL in the reward, every generated token is scored (a truncated row
            # masked out of the loss still pays its KL), so pi_ref covers the generated tokens.
            scored_mask = out.completion_mask if cfg.reward_kl_coef else None
            with precision.autocast(), gathered(reference), \
                    (reference_policy(policy) if reference is policy else contextlib.nullcontext()):
                rollout.ref_logprobs = batched_logprobs(reference, rollout, temperature, cfg.micro_batch_size,
                                                        chunk, mask=scored_mask, recompute_mlp=recompute)

    with timer.phase("advantages"):
        if cfg.reward_kl_coef:  # the KL in the reward, before the advantages (InstructGPT)
            rollout.rewards, kl = algorithm.kl_penalised_rewards(total, out.logprobs.float(), rollout.ref_logprobs,
                                                                 out.completion_mask, cfg.reward_kl_coef)
            rollout.sampling_stats = {**stats, "reward_kl": kl.mean().item()}
        weights = priority_weights(out) if out.inclusion_probs is not None else None
        rollout.sample_weights = weights
        rollout.advantages = algorithm.compute_advantages(
            cfg.advantage_estimator, rollout.rewards, G, eps=cfg.advantage_eps, weights=weights, steps=rollout.steps,
            batch_rewards=gather(rollout.rewards) if gather is not None else None).to(device)
    rollout.timings = {"generate": scored.seconds_generate, "score": scored.seconds_score, **timer.seconds}
    return rollout


def trainer_state(cfg, optimizer_steps: int, epoch: float):
    """What reward functions that take `trainer_state` get: a transformers.TrainerState, as TRL
    passes, with global_step and max_steps counted in optimizer steps (TRL's units) and epoch the
    passes over the dataset so far."""
    from transformers.trainer_callback import TrainerState

    return TrainerState(global_step=optimizer_steps, max_steps=cfg.max_steps * cfg.num_iterations * cfg.num_minibatches,
                        epoch=epoch)
