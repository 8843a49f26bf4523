"""The episode loop: B episodes run in lockstep, turn by turn.

    reset every environment with its row                     (concurrently)
    render each prompt (tools in the template's system text)
    repeat, over the episodes still running:
        generate one turn for each                           (one batched `generate` call)
        read its tool calls (grpo.agents.parsing)
        make every call of every episode, or step its text environment
                                                             (concurrently: grpo.agents.calls)
        append the results as tool messages (observations as user messages), and their tokens
    read each environment's own reward                       (concurrently)

An episode ends at a turn with no tool call (for a text environment: when `step` says done), at
`max_turns` model turns, or when its tokens reach `max_completion_length` (counting the
model's and the environment's: the sequence the update runs over), truncated then. A turn that
reaches the limit is cut there; results whose tokens would reach it are not appended, and the
episode ends after the model's turn. The calls of the last turn are still made (a "submit"
tool changes the environment's reward) but their results are not shown: no turn follows.

Token-exact: what the model sampled is what is trained. Its tokens are kept as sampled, never
decoded and re-tokenized; the tokens of the messages it reads are the chat template's rendering
of them (grpo.agents.rendering). A finished episode's prompt + completion tokens are the chat
template's rendering of its conversation wherever the model wrote what the template would
(tests/test_agents.py checks it token for token). The loss mask is 1 on the model's tokens only.

`generate(contexts, max_new_tokens)` makes one completion per context (a list of token ids)
and returns, for each, its token ids (the stop token included when it stopped), the log-probs
they were sampled with, and whether it stopped on a stop token (`Sampled`, or a tuple of those
three, and optionally the sampler's log-probs). `grpo.agents.backend.backend_generate` makes one
from a rollout backend; tests script one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from grpo.errors import DataError

from .calls import Call, CallRunner
from .contract import Episode
from .environments import (Environments, as_environments, as_observation, as_reward, as_step, failure,
                           final_reward_source, is_text_environment, reset_kwargs, row_name)
from .parsing import ERROR_KINDS, RAISED, TIMEOUT, CallError, ToolCall, parse_turn
from .rendering import Renderer, Turn, assistant_message, decoder
from .tools import Tool, check_chat_template, check_distinct, describe, load_tools


@dataclass
class Sampled:
    """One generated turn."""
    token_ids: list[int]
    logprobs: list[float]
    finished: bool                                 # ended on a stop token (else cut by max_new_tokens)
    sampling_logprobs: list[float] | None = None   # under the distribution drawn from (top-k / top-p)


Generate = Callable[[list[list[int]], int], Sequence[Any]]


def as_sampled(x: Any) -> Sampled:
    """A `Sampled` from what `generate` returned for one context (a Sampled or a tuple)."""
    if isinstance(x, Sampled):
        return x
    ids, logprobs, finished, *rest = x
    sampling = list(rest[0]) if rest and rest[0] is not None else None
    return Sampled(list(ids), [float(v) for v in logprobs], bool(finished), sampling)


@dataclass
class _Run:
    """One episode in progress."""
    row: dict
    row_label: str
    env: Any
    tools: dict[str, Tool]
    prompt: list[dict]
    prompt_ids: list[int] = field(default_factory=list)
    turn_prompt: Turn | None = None                # the rendering the next turn is generated after
    completion: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[float] | None = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    seconds: float = 0.0
    truncated: bool = False
    done: bool = False
    last: bool = False                         # the turn just taken is the last (max_turns)
    actions: list = field(default_factory=list)  # this turn's calls (ToolCall | CallError), or ["step"]
    jobs: list[Call] = field(default_factory=list)

    @property
    def schemas(self) -> list[dict] | None:
        return [t.schema for t in self.tools.values()] or None

    def extend(self, ids: list[int], mask: int, logprobs: list[float] | None = None,
               sampling: list[float] | None = None) -> None:
        self.ids += ids
        self.mask += [mask] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        if self.sampling_logprobs is not None:
            if mask and sampling is None:  # a generate without the sampler's log-probs: none for the episode
                self.sampling_logprobs = None
            else:
                self.sampling_logprobs += sampling if sampling is not None else [0.0] * len(ids)


def run_episodes(tokenizer, prompts: list, generate: Generate, *, rows: list[dict] | None = None,
                 tools: list = (), environments: Environments | Callable | str | None = None,
                 max_turns: int = 10, max_completion_length: int = 1024, tool_timeout: float | None = 60.0,
                 stop_token_ids: list[int] | None = None, template_kwargs: dict | None = None,
                 reward_reduce: Callable[[list[float]], float] = sum, parallel_calls: bool = False,
                 runner: CallRunner | None = None, source: str = "dataset") -> list[Episode]:
    """Run one episode per prompt, all in lockstep, and return them in order.

    `prompts`: each a list of chat messages (or a string: one user message). `rows`: each
    episode's dataset row, given to its environment's reset(**row) and named in errors (`source`
    is the dataset's label there). `tools`: standalone tools (specs, functions or Tools).
    `environments`: an environment class or factory (or a spec, or an `Environments` kept across
    calls), one instance per episode. `stop_token_ids`: the ids that end a turn (the backend's;
    default the tokenizer's EOS). `reward_reduce` turns the per-turn rewards and the final one
    into the episode's. `parallel_calls`: the calls of one turn overlap (independent tools) instead
    of running in the order written. `runner` runs the calls (default: one made and closed here).
    """
    if max_turns < 1 or max_completion_length < 1:
        raise ValueError(f"max_turns and max_completion_length must be >= 1, got {max_turns}, {max_completion_length}")
    standalone = load_tools(list(tools))
    envs = as_environments(environments)
    rows = [dict(r) for r in rows] if rows is not None else [{} for _ in prompts]
    if len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} rows")
    renderer = Renderer(tokenizer, stop_token_ids or [tokenizer.eos_token_id], template_kwargs)
    instances = envs.take(len(prompts)) if envs is not None else [None] * len(prompts)
    runs = []
    for prompt, row, env in zip(prompts, rows, instances):
        own = envs.tools_of(env) if envs is not None and not envs.text else []
        check_distinct(standalone + own)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        runs.append(_Run(row, row_name(source, row), env, {t.name: t for t in standalone + own}, messages))

    own_runner = runner is None
    runner = runner or CallRunner()
    try:
        _reset(runs, runner, tool_timeout)
        rendered = {}  # a group's episodes mostly share their prompt: rendered once
        for run in runs:
            key = json.dumps([run.prompt, run.schemas], default=repr)
            if key not in rendered:
                rendered[key] = _render_prompt(renderer, run)
            ids, run.turn_prompt = rendered[key]
            run.prompt_ids = list(ids)
        loop = _Loop(tokenizer, renderer, runner, max_turns, max_completion_length, tool_timeout, parallel_calls)
        while active := [r for r in runs if not r.done]:
            loop.turn(active, generate)
        rewards = _final_rewards(runs, runner, tool_timeout)
    finally:
        if own_runner:
            runner.close()
    return [_episode(run, final, reward_reduce) for run, final in zip(runs, rewards)]


def _reset(runs: list[_Run], runner: CallRunner, timeout: float | None) -> None:
    """reset(**row) on every environment at once; an observation joins the prompt (TRL's rule:
    appended to the last user message; a new user message when the prompt does not end with one)."""
    resets = [[Call(r.env.reset, reset_kwargs(r.row))] if r.env is not None else [] for r in runs]
    outcomes = runner.run(resets, timeout)
    for run, outs in zip(runs, outcomes):
        if not outs:
            continue
        if not outs[0].ok:
            raise failure(run.env, "reset", run.row_label, outs[0])
        observation = as_observation(run.env, "reset", run.row_label, outs[0].value)
        if isinstance(observation, list):
            run.prompt += [dict(m) for m in observation]
        elif observation:
            last = run.prompt[-1] if run.prompt else None
            if last is not None and last.get("role") == "user" and isinstance(last.get("content"), str):
                run.prompt[-1] = {**last, "content": last["content"] + observation}
            else:
                run.prompt.append({"role": _observation_role(run.env), "content": observation})


def _render_prompt(renderer: Renderer, run: _Run) -> tuple[list[int], Turn]:
    if not run.prompt:
        raise DataError(f"{run.row_label}: the episode has no prompt (an empty prompt and no observation from reset)")
    try:
        return renderer.prompt(run.prompt, run.schemas)
    except Exception as e:  # the template's own error (a role it refuses, a missing variable)
        raise DataError(f"{run.row_label}: the chat template of {renderer.tokenizer.name_or_path!r} cannot render "
                        f"the prompt: {describe(e)}") from None


def _observation_role(env: Any) -> str:
    return getattr(env, "observation_role", "user")


class _Loop:
    """One turn of every running episode: generate, act, append."""

    def __init__(self, tokenizer, renderer: Renderer, runner: CallRunner, max_turns: int,
                 max_completion_length: int, tool_timeout: float | None, parallel_calls: bool):
        self.tokenizer, self.renderer, self.runner = tokenizer, renderer, runner
        self.decode = decoder(tokenizer)
        self.max_turns, self.limit, self.timeout = max_turns, max_completion_length, tool_timeout
        self.ordered = not parallel_calls

    def turn(self, runs: list[_Run], generate: Generate) -> None:
        budgets = [self.limit - len(r.ids) for r in runs]
        out = list(generate([r.prompt_ids + r.ids for r in runs], max(budgets)))
        if len(out) != len(runs):
            raise ValueError(f"generate returned {len(out)} completions for {len(runs)} contexts")
        turns = [self.cut(as_sampled(sampled), budget) for sampled, budget in zip(out, budgets)]
        texts = self.decode([body for _, _, _, body in turns])  # the turn's texts in one call
        for run, (sampled, ids, finished, _), text in zip(runs, turns, texts):
            self.take(run, sampled, ids, finished, text)
        outcomes = self.runner.run([r.jobs for r in runs], self.timeout, self.ordered)
        for run, outs in zip(runs, outcomes):
            self.absorb(run, outs)

    def cut(self, sampled: Sampled, budget: int) -> tuple[Sampled, list[int], bool, list[int]]:
        """A turn within its episode's token budget: (sampled, its ids kept, whether it ended on a
        stop token, the ids of what the model said: without the stop token)."""
        ids = sampled.token_ids[:budget]
        finished = sampled.finished and len(sampled.token_ids) <= budget
        # The stop token ends the turn; it is not part of what the model said.
        body = ids[:-1] if finished and ids and ids[-1] in self.renderer.stop else ids
        return sampled, ids, finished, body

    def take(self, run: _Run, sampled: Sampled, ids: list[int], finished: bool, text: str) -> None:
        """The model's turn (`cut`, its text decoded): its tokens, its message, and what it asks for."""
        context = run.prompt_ids + run.ids
        run.extend(ids, 1, sampled.logprobs[:len(ids)],
                   None if sampled.sampling_logprobs is None else sampled.sampling_logprobs[:len(ids)])
        run.turns += 1
        run.last = run.turns >= self.max_turns
        run.actions, run.jobs = [], []
        if not finished:  # cut by the length limit: an unfinished turn asks for nothing
            run.completion.append(assistant_message(text, []))
            run.truncated = run.done = True
            return
        calls = []
        if run.tools:
            parsed = parse_turn(text, run.tools, tokenizer=self.tokenizer, ids=ids, prefix_ids=context)
            run.completion.append(parsed.message)
            calls = parsed.calls
        else:
            run.completion.append(assistant_message(text, []))
        if calls:
            run.actions = calls
            run.jobs = [Call(run.tools[c.name].fn, c.arguments) for c in calls if isinstance(c, ToolCall)]
            run.tool_calls += len(calls)
        elif run.env is not None and is_text_environment(run.env):
            run.actions = ["step"]
            run.jobs = [Call(run.env.step, args=(text,))]
        else:  # an answer: no call, nothing to step
            run.done = True

    def absorb(self, run: _Run, outcomes: list) -> None:
        """What the calls gave, as messages; appended with their tokens while the episode goes on."""
        if not run.actions:
            return
        new = []
        if run.actions == ["step"]:
            outcome = outcomes[0]
            run.seconds += outcome.seconds
            if not outcome.ok:
                raise failure(run.env, "step", run.row_label, outcome)
            observation, reward, done = as_step(run.env, run.row_label, outcome.value)
            run.turn_rewards.append(reward)
            run.done = run.done or done
            if isinstance(observation, list):
                new = [dict(m) for m in observation]
            elif observation is not None:
                new = [{"role": _observation_role(run.env), "content": observation}]
        else:
            results = iter(outcomes)
            for call in run.actions:
                new.append(self.tool_message(run, call, None if isinstance(call, CallError) else next(results)))
        if run.done or run.last:
            run.done = True
            return
        appended, rendered = self.renderer.appended_ids(run.prompt + run.completion, new, run.schemas, run.turn_prompt)
        if len(run.ids) + len(appended) >= self.limit:  # no token left for the model to answer with
            run.truncated = run.done = True
            return
        run.extend(appended, 0)
        run.completion += new
        run.turn_prompt = rendered

    def tool_message(self, run: _Run, call, outcome) -> dict:
        """The tool message answering one call: its result, or what went wrong (counted)."""
        if isinstance(call, CallError):
            run.errors[call.kind] += 1
            return {"role": "tool", "name": call.name or "tool_call", "content": f"Error: {call.message}"}
        run.seconds += outcome.seconds
        if outcome.timed_out:
            run.errors[TIMEOUT] += 1
            content = f"Error: {call.name} did not return within {self.timeout:g} seconds"
        elif outcome.error is not None:
            run.errors[RAISED] += 1
            # The whole text, newlines kept: the model reads it (a failed command's output).
            content = f"Error: {type(outcome.error).__name__}: {outcome.error}"
        else:
            content = result_text(outcome.value)
        return {"role": "tool", "name": call.name, "content": content}


def result_text(value: Any) -> str:
    """A tool's return value as the text of its message: a string as it is, JSON for a dict or a
    list (what models read best), str() for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _final_rewards(runs: list[_Run], runner: CallRunner, timeout: float | None) -> list[float | None]:
    """Each environment's own reward at the end of its episode (get_reward, or a reward attribute)."""
    sources = [final_reward_source(r.env) if r.env is not None else None for r in runs]
    outcomes = runner.run([[Call(s)] if s is not None else [] for s in sources], timeout)
    rewards = []
    for run, source, outs in zip(runs, sources, outcomes):
        if not outs:
            rewards.append(None)
            continue
        method = getattr(source, "__name__", "reward")
        method = "reward" if method == "<lambda>" else method
        if not outs[0].ok:
            raise failure(run.env, method, run.row_label, outs[0])
        run.seconds += outs[0].seconds
        rewards.append(None if outs[0].value is None else as_reward(run.env, method, run.row_label, outs[0].value))
    return rewards


def _episode(run: _Run, final: float | None, reduce: Callable[[list[float]], float]) -> Episode:
    parts = run.turn_rewards + ([final] if final is not None else [])
    return Episode(prompt_ids=run.prompt_ids, completion_ids=run.ids, loss_mask=run.mask, logprobs=run.logprobs,
                   reward=float(reduce(parts)) if parts else None, turn_rewards=run.turn_rewards, final_reward=final,
                   prompt=run.prompt, completion=run.completion, turns=run.turns, tool_calls=run.tool_calls,
                   tool_errors=run.errors, tool_seconds=run.seconds, truncated=run.truncated,
                   sampling_logprobs=run.sampling_logprobs, environment=run.env)


# ---------------------------------------------------------------------------------------------
# Before any model loads

def check_setup(tokenizer, tools: list = (), environments: Environments | Callable | str | None = None,
                stop_token_ids: list[int] | None = None,
                template_kwargs: dict | None = None) -> tuple[list[Tool], Environments | None]:
    """Load and check the tools and the environment class on the tokenizer alone, and return
    them: a tool that cannot be loaded or has no schema, one the chat template cannot render, two
    of one name, an environment class that cannot be made, and a template that cannot append a
    turn's messages to the model's tokens (not prefix-stable, or ending a turn without a stop
    token) each stop here, with one ConfigError line."""
    standalone = load_tools(list(tools))
    envs = as_environments(environments)
    every = standalone + (envs.tools_of(envs.pool[0]) if envs is not None and not envs.text else [])
    check_distinct(every)
    if every:
        check_chat_template(tokenizer, every, template_kwargs)
    renderer = Renderer(tokenizer, stop_token_ids or [tokenizer.eos_token_id], template_kwargs)
    schemas = [t.schema for t in every] or None
    prompt = [{"role": "user", "content": "hi"}]
    _, turn_prompt = renderer.prompt(prompt, schemas)
    if every:
        name = every[0].name
        said = assistant_message("", [(name, {})])
        renderer.appended_ids(prompt + [said], [{"role": "tool", "name": name, "content": "42"}], schemas, turn_prompt)
    if envs is not None and envs.text:
        role = _observation_role(envs.pool[0])
        renderer.appended_ids(prompt + [assistant_message("move", [])], [{"role": role, "content": "ok"}], schemas,
                              turn_prompt)
    return standalone, envs

