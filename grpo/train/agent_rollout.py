"""The rollout of an agent run: episodes of several turns (grpo.agents) in place of one completion each.

With `tools`, an `environment_factory` or a `rollout_func`, each of the step's P prompts is run G
times as an episode, and the episodes become the step's `Generation`, as generation's rows do:

- `completion_ids`: every token after the prompt, the model's and the tools', right-padded; the
  update runs its forward over all of them, so tool results are context for the turns after them;
- `completion_mask`: the episodes' loss masks, 1 on the model's own tokens only: the loss, its
  token counts, the KL and the entropy see nothing else (they use the mask only to count);
- `logprobs`, `sampling_logprobs`: what each model token was sampled with (0 on tool tokens);
- the prompt of each row is its own episode's (an environment's reset may change it), so prompts
  are per row here, not one per group.

The rewards: the run's reward functions score each episode with TRL's conversational contract
(the prompt's messages and the messages after them: assistant turns, tool calls and results),
and an environment's own reward (or a rollout_func episode's) is one more column, weight 1.

With `advantage_estimator: process` a turn is a step (DeepSeekMath 4.1.3's process supervision):
each per-turn reward a text environment's `step` gives lands on the last token of the model turn
it answers (`turn_steps`), and the outcome is the reward functions' sum plus the environment's
final reward (`get_reward`), without the per-turn ones that the steps already carry.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from grpo import algorithm
from grpo.agents import CallRunner, Episode, backend_generate, episodes_from_trl, run_episodes
from grpo.agents.rendering import decoder
from grpo.data.prompts import left_pad
from grpo.engine.backend import RolloutBackend, SamplingParams
from grpo.engine.generation import Generation
from grpo.errors import RewardError
from grpo.rewards import score
from grpo.rewards.scoring import RewardLog
from grpo.runs.inputs import reward_columns


@dataclass
class AgentSetup:
    """What runs the episodes of one run: the tools and environments checked before the model
    loaded (grpo.runs.inputs), and one pool of threads for their calls, closed at the end."""
    tools: list
    environments: object | None
    rollout_func: object | None = None
    runner: CallRunner | None = None

    def __post_init__(self):
        self.runner = self.runner or CallRunner()

    @property
    def reward_name(self) -> str:
        """The name of the episodes' own reward column."""
        return getattr(self.environments, "name", None) or "rollout_func"

    def close(self) -> None:
        self.runner.close()


def run_agent_episodes(setup: AgentSetup, backend: RolloutBackend, tokenizer, rows: list[dict], cfg,
                       params: SamplingParams, generator, stop_ids: list[int], device=None) -> list[Episode]:
    """params.group_size episodes of each row, in row order (rows p*G .. p*G+G-1 are row p's)."""
    G = params.group_size
    each = [row for row in rows for _ in range(G)]
    prompts = [row[cfg.prompt_column] for row in each]
    generate = backend_generate(backend, tokenizer, params, generator, device)
    if setup.rollout_func is not None:
        # TRL's rollout_func(prompts, trainer): what it reads of the trainer is here.
        trainer = SimpleNamespace(processing_class=tokenizer, tokenizer=tokenizer, args=cfg, rows=each,
                                  generate=generate, stop_token_ids=stop_ids)
        out = setup.rollout_func(prompts, trainer)
        episodes = episodes_from_trl(out) if isinstance(out, dict) else [
            e.check(f"rollout_func: episode {i}") for i, e in enumerate(out)]
        if len(episodes) != len(prompts) or not all(isinstance(e, Episode) for e in episodes):
            raise RewardError(f"rollout_func: returned {len(episodes)} episodes for {len(prompts)} prompts "
                              f"(one grpo.agents.Episode, or one entry of TRL's dict, per prompt)")
        return episodes
    return run_episodes(tokenizer, prompts, generate, rows=each, tools=setup.tools,
                        environments=setup.environments, max_turns=cfg.max_turns,
                        max_completion_length=cfg.max_completion_length, tool_timeout=cfg.tool_timeout,
                        stop_token_ids=stop_ids, template_kwargs=cfg.chat_template_kwargs or None,
                        parallel_calls=cfg.parallel_tool_calls, runner=setup.runner)


def episodes_generation(episodes: list[Episode], pad_token_id: int, device=None) -> Generation:
    """The episodes as generation's rows: right-padded, the loss mask as completion_mask."""
    T = max(1, max(len(e.completion_ids) for e in episodes))

    def padded(values, fill, dtype):
        return torch.tensor([list(v) + [fill] * (T - len(v)) for v in values], dtype=dtype, device=device)

    sampled = None
    if all(e.sampling_logprobs is not None for e in episodes):
        sampled = padded([e.sampling_logprobs for e in episodes], 0.0, torch.float32)
    return Generation(completion_ids=padded([e.completion_ids for e in episodes], pad_token_id, torch.long),
                      completion_mask=padded([e.loss_mask for e in episodes], 0, torch.long),
                      logprobs=padded([[lp if m else 0.0 for lp, m in zip(e.logprobs, e.loss_mask)]
                                       for e in episodes], 0.0, torch.float32),
                      truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool, device=device),
                      sampling_logprobs=sampled)


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """The step's agent numbers: means per episode."""
    n = len(episodes)
    kinds = sorted({k for e in episodes for k in e.tool_errors})
    return {"agent/turns": sum(e.turns for e in episodes) / n,
            "agent/tool_calls": sum(e.tool_calls for e in episodes) / n,
            **{f"agent/tool_errors/{k}": sum(e.tool_errors.get(k, 0) for e in episodes) / n for k in kinds},
            "agent/tool_seconds": sum(e.tool_seconds for e in episodes) / n,
            "agent/truncated": sum(e.truncated for e in episodes) / n}


def turn_ends(loss_mask: list[int]) -> list[int]:
    """The last token of each model turn: of each maximal run of 1s in an episode's loss mask."""
    return [t for t, m in enumerate(loss_mask) if m and (t + 1 == len(loss_mask) or not loss_mask[t + 1])]


def turn_steps(episodes: list[Episode], width: int, has_outcome: bool) -> algorithm.StepRewards:
    """Process supervision over turns: episode i's k-th per-turn reward on the last token of its
    k-th model turn, padded to the most turns of any episode (`grpo.algorithm.StepRewards`)."""
    ends = []
    for i, e in enumerate(episodes):
        mine = turn_ends(e.loss_mask)
        if len(e.turn_rewards) > len(mine):
            raise RewardError(f"episode {i}: {len(e.turn_rewards)} per-turn rewards for {len(mine)} model turns")
        ends.append(mine[:len(e.turn_rewards)])
    S, N = max((len(x) for x in ends), default=0), len(episodes)
    return algorithm.StepRewards(
        scores=torch.tensor([list(e.turn_rewards) + [0.0] * (S - len(e.turn_rewards)) for e in episodes],
                            dtype=torch.float32).reshape(N, S),
        ends=torch.tensor([x + [0] * (S - len(x)) for x in ends], dtype=torch.long).reshape(N, S),
        valid=torch.tensor([[j < len(x) for j in range(S)] for x in ends], dtype=torch.bool).reshape(N, S),
        lengths=torch.tensor([len(e.completion_ids) for e in episodes]), width=width, outcome=has_outcome)


def score_episodes(setup: AgentSetup, backend: RolloutBackend, tokenizer, rows: list[dict], rewards, cfg,
                   params: SamplingParams, generator, stop_ids: list[int], *, log: RewardLog, trainer_state=None,
                   precision=None, device=None, clock=time.perf_counter):
    """Episodes for `rows` and their rewards: the pieces of a `Scored` (grpo.train.rollout), its
    prompts one per row. Returns (texts, prompt_ids, prompt_mask, generation, completions, total,
    per_function, lengths, metrics, messages, seconds generating, seconds scoring, steps); steps is
    None unless advantage_estimator is process (`turn_steps`)."""
    G = params.group_size
    t0 = clock()
    with (precision.autocast() if precision is not None else contextlib.nullcontext()):
        episodes = run_agent_episodes(setup, backend, tokenizer, rows, cfg, params, generator, stop_ids, device)
    t1 = clock()
    prompt_ids, prompt_mask = left_pad(tokenizer, [e.prompt_ids for e in episodes],
                                       max(len(e.prompt_ids) for e in episodes), device)
    generation = episodes_generation(episodes, tokenizer.pad_token_id, device)
    # The whole completion, tool results included: the loss mask does not say where it ends.
    decode = decoder(tokenizer)
    completions = decode([e.completion_ids for e in episodes])
    texts = decode([e.prompt_ids for e in episodes])
    each = [row for row in rows for _ in range(G)]
    # TRL's conversational contract: the prompt's messages, and every message after them.
    prompts = [e.prompt or row[cfg.prompt_column] for e, row in zip(episodes, each)]
    conversations = [e.completion for e in episodes]
    columns = {k: [row.get(k) for row in each] for k in reward_columns(rows[0], cfg.prompt_column)}
    for k in dict.fromkeys(k for e in episodes for k in e.extras):  # a rollout_func's extra fields
        columns[k] = [e.extras.get(k) for e in episodes]
    n = len(episodes)
    total, per_function = torch.zeros(n), {}
    if rewards:
        total, per_function = score(
            rewards, prompts, conversations, columns, timeout=cfg.reward_timeout,
            completion_ids=[list(e.completion_ids) for e in episodes], trainer_state=trainer_state,
            log_metric=log.log_metric, log_extra=log.log_extra, model_texts=(texts, completions), group_size=G,
            environments=[e.environment for e in episodes] if setup.environments is not None else None)
    process = getattr(cfg, "advantage_estimator", "") == "process"
    # Under process the per-turn rewards are steps: the outcome keeps the final reward alone.
    own = [e.final_reward if process and e.turn_rewards else e.reward for e in episodes]
    if any(r is not None for r in own):
        values = torch.tensor([float("nan") if r is None else r for r in own], dtype=torch.float32)
        per_function[setup.reward_name] = values
        total = total + values.nan_to_num(0.0)
    steps = None
    if process:
        steps = turn_steps(episodes, generation.completion_ids.shape[1],
                           has_outcome=bool(rewards) or any(r is not None for r in own))
        if any(e.turn_rewards for e in episodes):  # their mean per episode, for the metrics
            per_function[f"{setup.reward_name}_turns"] = torch.tensor(
                [sum(e.turn_rewards) / len(e.turn_rewards) if e.turn_rewards else float("nan") for e in episodes])
    lengths = torch.tensor([len(e.completion_ids) for e in episodes], device=device)
    messages = [e.messages for e in episodes]
    t2 = clock()
    return (texts, prompt_ids, prompt_mask, generation, completions, total, per_function, lengths,
            episode_metrics(episodes), messages, t1 - t0, t2 - t1, steps)
