"""Agent runs end to end (grpo.train.agent_rollout): tools and environments from the config,
episodes as the rollout, their loss mask in the update, metrics and samples, resume, and the
errors said before any model loads. A scripted backend writes the tool calls (a random tiny
model almost never does); the end-to-end runs use a real tiny model and only need to run."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from agent_templates import build_tokenizer
from grpo.config import TrainConfig, build
from grpo.engine.generation import Generation
from grpo.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_module")


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a * b


def answered(completions, answer, **_):
    """1 when the last assistant message says the answer."""
    return [float(c[-1]["content"].strip() == str(a)) for c, a in zip(completions, answer)]


class Counter:
    """A tool environment: its one tool counts, its reward is the count."""

    def reset(self, **row):
        self.count = 0
        return None

    def bump(self, by: int) -> int:
        """Add to the count.

        Args:
            by: How much.
        """
        self.count += by
        return self.count

    def get_reward(self) -> float:
        return float(self.count)


class ScriptedBackend:
    """A rollout backend whose every turn is scripted: the first turn of an episode calls
    multiply(12, 34), the next answers 408; log-probs are made up (the update only needs them
    finite)."""

    def __init__(self, tokenizer, first='<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}\n'
                                        '</tool_call>', then="408"):
        self.tokenizer, self.first, self.then = tokenizer, first, then
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def generate(self, prompt_ids, prompt_mask, params, generator=None) -> Generation:
        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            context = self.tokenizer.decode([t for t, m in zip(ids, mask) if m])
            text = self.then if "<tool_response>" in context else self.first
            # group_size turns of each prompt, as every backend returns them (a group's first turn).
            rows += [self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.stop_token_ids] \
                * params.group_size
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        logprobs = -0.1 * mask.float()
        return Generation(ids, mask, logprobs, torch.zeros(len(rows), dtype=torch.bool), logprobs.clone())

    def sync_weights(self, model) -> None:
        pass


class SampledThenScripted(ScriptedBackend):
    """Each turn: three tokens the real model samples (the run's generator draws them), then the
    scripted call or answer. Registered as a rollout backend, so `train` runs tool calls."""

    def __init__(self, model, tokenizer):
        from grpo.engine.backend import LocalBackend

        super().__init__(tokenizer)
        self.local = LocalBackend(model, tokenizer)

    def generate(self, prompt_ids, prompt_mask, params, generator=None) -> Generation:
        import dataclasses

        sampled = self.local.generate(prompt_ids, prompt_mask, dataclasses.replace(params, max_new_tokens=3),
                                      generator)
        scripted = super().generate(prompt_ids, prompt_mask, params, generator)
        keep = sampled.completion_mask.bool() & ~torch.isin(sampled.completion_ids,
                                                            torch.tensor(self.stop_token_ids))
        ids = torch.where(keep, sampled.completion_ids, torch.tensor(self.tokenizer.convert_tokens_to_ids(" ")))
        ones = torch.ones_like(ids)
        logprobs = torch.where(keep, sampled.logprobs, torch.zeros_like(sampled.logprobs))
        return Generation(torch.cat([ids, scripted.completion_ids], 1), torch.cat([ones, scripted.completion_mask], 1),
                          torch.cat([logprobs, scripted.logprobs], 1), scripted.truncated,
                          torch.cat([logprobs, scripted.sampling_logprobs], 1))


@pytest.fixture
def sampled_then_scripted():
    """The backend registered for one test, and removed again."""
    from grpo.engine.backend import ROLLOUT_BACKENDS, register_backend

    register_backend("sampled_then_scripted")(SampledThenScripted)
    yield "sampled_then_scripted"
    ROLLOUT_BACKENDS._table.pop("sampled_then_scripted")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> str:
    """A tiny Llama with a character tokenizer carrying Qwen2.5's tool-calling chat template."""
    from grpo.recipes.tasks import build_tiny_model

    tok = build_tokenizer("qwen2.5")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                             max_positions=2048, pad_token_id=tok.pad_token_id, eos_token_id=eos, seed=0)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("tool_model") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


ROWS = [{"prompt": [{"role": "user", "content": "12*34?"}], "answer": "408"}]


def config(tool_model, out, **over):
    values = dict(model=tool_model, dataset=ROWS * 4, rewards=[answered], tools=[multiply], prompts_per_step=2,
                  group_size=2, max_completion_length=96, max_steps=2, save_steps=0, learning_rate=1e-3,
                  output_dir=str(out), seed=0, samples_steps=1, num_samples=2, beta=0.0, model_card=False)
    values.update(over)
    return build(TrainConfig, values, "test")


def scripted_rollout(tool_model, tmp_path, **over):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.agents import check_setup
    from grpo.train.agent_rollout import AgentSetup
    from grpo.train.rollout import collect_rollout

    cfg = config(tool_model, tmp_path, **over)
    tok = AutoTokenizer.from_pretrained(tool_model)
    policy = AutoModelForCausalLM.from_pretrained(tool_model)
    setup = AgentSetup(*check_setup(tok, cfg.tools, cfg.environment_factory or None))
    try:
        rollout = collect_rollout(policy, None, tok, ROWS * 2, [r for r in build_rewards(cfg)], cfg,
                                  torch.Generator().manual_seed(0), backend=ScriptedBackend(tok), agent=setup)
    finally:
        setup.close()
    return rollout, tok, policy, cfg


def build_rewards(cfg):
    from grpo.rewards import build_rewards as build

    return build(cfg.rewards, torch.device("cpu"), torch.float32)


def test_the_rollout_of_a_tool_run_is_its_episodes_with_their_loss_mask(tool_model, tmp_path):
    rollout, tok, _, _ = scripted_rollout(tool_model, tmp_path)
    assert len(rollout) == 4 and rollout.rewards.tolist() == [1.0] * 4
    ids, mask = rollout.completion_ids[0].tolist(), rollout.completion_mask[0].tolist()
    n = int(rollout.lengths[0])
    text = tok.decode(ids[:n])
    # The whole episode is the completion: the call, the tool's result, the answer.
    assert '"name": "multiply"' in text and "<tool_response>\n408\n</tool_response>" in text and text.endswith(
        "408<|im_end|>")
    # The loss mask is 1 exactly on the model's two turns.
    model_text = tok.decode([t for t, m in zip(ids[:n], mask[:n]) if m])
    assert model_text.startswith("<tool_call>") and model_text.endswith("408<|im_end|>")
    assert "<tool_response>" not in model_text and 0 in mask[:n] and n > sum(mask)
    assert rollout.sampling_stats["agent/turns"] == 2.0 and rollout.sampling_stats["agent/tool_calls"] == 1.0
    assert rollout.messages[0][-1] == {"role": "assistant", "content": "408"}
    assert [m["role"] for m in rollout.messages[0]] == ["user", "assistant", "tool", "assistant"]


def test_tool_tokens_get_no_gradient_and_are_context(tool_model, tmp_path):
    """The policy loss's gradient w.r.t. the logits that predict tool tokens is exactly zero,
    while the tool tokens are still fed (the answer's log-prob depends on them)."""
    from grpo import algorithm
    from grpo.engine.logprobs import completion_logprobs

    rollout, tok, policy, cfg = scripted_rollout(tool_model, tmp_path)
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    handle = policy.lm_head.register_forward_hook(keep)
    lp, _ = completion_logprobs(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                rollout.completion_mask, 1.0, engine="plain")
    handle.remove()
    mask = rollout.completion_mask.float()
    loss, _ = algorithm.policy_loss(lp, None, None, rollout.advantages, mask, num_sequences=4,
                                    num_tokens=mask.sum(), group_size=2,
                                    max_completion_length=cfg.max_completion_length)
    loss.backward()
    grad = captured["logits"].grad  # [N, T_used, V]: the logits kept, position t predicting token t
    T_used = grad.shape[1]
    per_token = grad.abs().sum(-1)
    on_tools = (rollout.completion_mask[:, :T_used] == 0) & (torch.arange(T_used) < rollout.lengths[:, None])
    assert on_tools.any() and per_token[on_tools].max().item() == 0.0
    assert per_token[rollout.completion_mask[:, :T_used].bool()].sum() > 0
    # Context: changing a tool token changes the log-prob of the answer after it.
    changed = rollout.completion_ids.clone()
    row, col = on_tools.nonzero()[0].tolist()
    changed[row, col] = tok.convert_tokens_to_ids("7")
    with torch.no_grad():
        again, _ = completion_logprobs(policy, rollout.prompt_ids, rollout.prompt_mask, changed,
                                       rollout.completion_mask, 1.0)
    last = int(rollout.lengths[row]) - 1
    assert again[row, last] != lp.detach()[row, last]


def test_an_environment_reward_is_one_more_column(tool_model, tmp_path):
    rollout, *_ = scripted_rollout(tool_model, tmp_path, tools=[], environment_factory=Counter, rewards=[])
    # No bump was called (the script calls multiply, which the Counter lacks): reward 0, an error counted.
    assert set(rollout.rewards_per_function) == {"Counter"}
    assert rollout.rewards.tolist() == [0.0] * 4
    assert sum(v for k, v in rollout.sampling_stats.items() if k.startswith("agent/tool_errors/")) == 1.0


def by_kind(completions, kind, **_):
    """Rows of kind "tied" score 1 on every episode; "mixed" ones alternate 0, 1 down the batch."""
    return [1.0 if k == "tied" else float(i % 2) for i, k in enumerate(kind)]


class AnswersDirectWhenTold(ScriptedBackend):
    """Calls the tool first, except where the prompt says "direct": there it answers at once."""

    def generate(self, prompt_ids, prompt_mask, params, generator=None) -> Generation:
        direct, tool = ScriptedBackend(self.tokenizer, first="408"), ScriptedBackend(self.tokenizer)
        rows = [(direct if "direct" in self.tokenizer.decode(ids[mask.bool()]) else tool).generate(
            ids[None], mask[None], params) for ids, mask in zip(prompt_ids, prompt_mask)]
        return Generation.cat(rows, self.tokenizer.pad_token_id)


def test_dynamic_sampling_drops_tied_groups_of_episodes(tool_model, tmp_path):
    """Tied groups of episodes are dropped and more rows run; the kept groups' prompts, episodes,
    messages and lengths stay aligned, and the agent metrics count every episode run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo import algorithm
    from grpo.agents import check_setup
    from grpo.train.agent_rollout import AgentSetup
    from grpo.train.rollout import collect_rollout

    def rows(kinds, at):
        # A tied row is answered at once (one turn, no call), a mixed one through the tool.
        return [{"prompt": [{"role": "user", "content": f"12*34? #{at + i}" + (" direct" if k == "tied" else "")}],
                 "kind": k} for i, k in enumerate(kinds)]

    drawn = []

    def more_rows(n):
        drawn.append(rows(["tied", "mixed"][:n], 100))
        return drawn[-1]

    cfg = config(tool_model, tmp_path, rewards=[by_kind], dynamic_sampling=True, max_generation_rounds=3)
    tok = AutoTokenizer.from_pretrained(tool_model)
    policy = AutoModelForCausalLM.from_pretrained(tool_model)
    setup = AgentSetup(*check_setup(tok, cfg.tools, None))
    try:
        rollout = collect_rollout(policy, None, tok, rows(["tied", "mixed"], 0), build_rewards(cfg), cfg,
                                  torch.Generator().manual_seed(0), backend=AnswersDirectWhenTold(tok), agent=setup,
                                  more_rows=more_rows)
    finally:
        setup.close()
    G, P = cfg.group_size, cfg.prompts_per_step
    # Round 1 kept 1 of 2 groups; round 2 drew ceil(1 / (1/2)) = 2 rows and kept the mixed one.
    assert [len(d) for d in drawn] == [2] and len(rollout) == P * G
    s = rollout.sampling_stats
    assert s["dynamic_sampling/rounds"] == 2 and s["dynamic_sampling/groups_dropped"] == 2
    assert not algorithm.zero_variance_groups(rollout.rewards, G).any()
    assert rollout.rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
    # Every row is its own prompt's episode: #1 (round 1) twice, then #101 (round 2) twice.
    asked = [m[0]["content"] for m in rollout.messages]
    assert asked == ["12*34? #1"] * 2 + ["12*34? #101"] * 2
    for i, text in enumerate(asked):
        prompt = tok.decode(rollout.prompt_ids[i][rollout.prompt_mask[i].bool()])
        assert text in prompt and text in rollout.prompts[i]
        assert [m["role"] for m in rollout.messages[i]] == ["user", "assistant", "tool", "assistant"]
        n = int(rollout.lengths[i])
        assert tok.decode(rollout.completion_ids[i][:n]) == rollout.completions[i]
        assert "<tool_response>" in rollout.completions[i] and rollout.completion_mask[i, n:].sum() == 0
    # 8 episodes ran: 4 tied ones in one turn without a call, 4 mixed ones in two turns with one.
    assert s["agent/turns"] == 1.5 and s["agent/tool_calls"] == 0.5


class Multiplier:
    """A tool environment without a reward of its own: it records the calls made on it."""

    def reset(self, **row):
        self.calls = []

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        self.calls.append((a, b))
        return a * b


def test_reward_functions_that_take_environments_get_each_episodes_instance(tool_model, tmp_path):
    seen = []

    def calls_made(completions, environments, **_):
        seen.append(list(environments))
        return [float(len(env.calls)) for env in environments]

    def no_environments(prompts, completions, answer):  # a function that does not name it is not given it
        return [0.0] * len(completions)

    rollout, *_ = scripted_rollout(tool_model, tmp_path, tools=[], environment_factory=Multiplier,
                                   rewards=[calls_made, no_environments])
    [instances] = seen
    assert len(instances) == 4 and len({id(e) for e in instances}) == 4  # one instance per episode
    assert all(e.calls == [(12, 34)] for e in instances)  # as its episode left it
    assert rollout.rewards_per_function["calls_made"].tolist() == [1.0] * 4
    assert "Multiplier" not in rollout.rewards_per_function  # no reward of its own


def test_train_with_tools_runs_and_logs_the_agent_metrics(tool_model, tmp_path):
    from grpo.train import loop

    out = loop.train(config(tool_model, tmp_path / "run"), quiet=True)
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("step") in (1, 2) and "rollout/agent/turns" in r]
    assert len(steps) == 2
    for key in ("turns", "tool_calls", "tool_seconds", "truncated"):
        key = f"rollout/agent/{key}"
        assert math.isfinite(steps[0][key])
    samples = [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["messages"][0] == {"role": "user", "content": "12*34?"}


def test_a_tool_file_that_cannot_be_imported_is_exit_2_before_any_model_loads(tool_model, tmp_path, capsys,
                                                                              monkeypatch):
    from grpo import cli
    from grpo.train import loop

    broken = tmp_path / "tools.py"
    broken.write_text("import no_such_module_here\n\ndef calc(x: int) -> int:\n    return x\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n")
    monkeypatch.setattr(loop, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["train", "--set", f"model={tool_model}", "--set", f"dataset={data}", "--set",
                     "rewards=[exact_answer]", "--set", f"tools=[{broken}:calc]", "--set",
                     f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{broken}:calc" in err[0] and "no_such_module_here" in err[0]


def test_agent_keys_and_trl_spelling():
    cfg = build(TrainConfig, dict(model="m", dataset="d", rewards=["exact_answer"], tools=[multiply],
                                  max_tool_calling_iterations=3), "t")
    assert cfg.max_turns == 4 and cfg.agent
    with pytest.raises(ConfigError, match="generation: episodes with tools"):
        build(TrainConfig, dict(model="m", dataset="d", rewards=["exact_answer"], tools=[multiply],
                                generation="beam"), "t")
    # An environment's reward may be the only one.
    assert build(TrainConfig, dict(model="m", dataset="d", environment_factory=Counter), "t").agent


def sampled_parity(completions, **_):
    """1 or 0 by what the model sampled in its first turn: groups tie or not by chance."""
    return [float(sum(map(ord, c[0]["content"])) % 2) for c in completions]


@pytest.mark.parametrize("dynamic", [False, True], ids=["plain", "dynamic_sampling"])
def test_resume_halfway_with_tools_ends_bit_equal(tool_model, tmp_path, sampled_then_scripted, dynamic):
    import shutil

    from safetensors.torch import load_file

    from grpo.train import loop

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({**r, "prompt": [{"role": "user", "content": f"12*34? #{i}"}]}) + "\n"
                            for i, r in enumerate(ROWS * 8)))
    over = dict(dataset=str(data), rollout_backend=sampled_then_scripted, max_steps=4, save_steps=2, samples_steps=0)
    if dynamic:
        over.update(dynamic_sampling=True, rewards=[answered, sampled_parity])
    loop.train(config(tool_model, tmp_path / "full", **over), quiet=True)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", part / "checkpoint-2")
    (part / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[:2]))
    loop.train(config(tool_model, part, **over), resume=True, quiet=True)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["rollout/agent/tool_calls"] == 1.0
    if dynamic:  # groups were dropped and rows drawn again, before and after the resume
        assert sum(m["rollout/dynamic_sampling/groups_dropped"] for m in metrics[:2]) > 0
        assert sum(m["rollout/dynamic_sampling/groups_dropped"] for m in metrics[2:]) > 0


# ---------------------------------------------------------------------------------------------
# docs/agents.md: its examples run

DOCS = Path(__file__).resolve().parent.parent / "docs" / "agents.md"


def docs_blocks(language: str) -> list[str]:
    import re

    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.DOTALL)


def test_a_resume_finds_the_agents_code_unchanged(tool_model, tmp_path):
    """Tools, the environment class and rollout_func are fingerprinted like reward functions: from
    Python by their source, from YAML by their file."""
    from grpo.data import load_source
    from grpo.runs.inputs import fingerprints
    from grpo.runs.run_dir import check_resume

    tools = tmp_path / "my_tools.py"
    tools.write_text(inspect.getsource(multiply))
    data = load_source(ROWS * 4)

    def found(**over):
        return fingerprints(config(tool_model, tmp_path / "out", **over), data, None)

    python = found(tools=[multiply], environment_factory=Counter)
    assert {k for k in python if k.startswith("agent ")} == {
        f"agent function python:{__name__}.multiply", f"agent function python:{__name__}.Counter"}
    before = found(tools=[f"{tools}:multiply"])
    tools.write_text(inspect.getsource(multiply).replace("a * b", "b * a"))
    after = found(tools=[f"{tools}:multiply"])
    key = f"agent file {tools}"
    assert before[key] != after[key]
    # A checkpoint that recorded the old file refuses the new one; one that recorded no agent code
    # (made before it was fingerprinted) is not compared on it.
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for record, refused in ((before, True), ({k: v for k, v in before.items() if k != key}, False)):
        (checkpoint / "run.json").write_text(json.dumps({"config": {}, "data": record}))
        if refused:
            with pytest.raises(Exception, match="belongs to a different run.*agent file"):
                check_resume(checkpoint, {}, after, allow_changes=False, say=print)
        else:
            assert check_resume(checkpoint, {}, after, allow_changes=False, say=print) == {}


def test_the_docs_yaml_config_trains_with_its_tool_file(tool_model, tmp_path, monkeypatch):
    from grpo import cli

    python = docs_blocks("python")
    (tmp_path / "calculator.py").write_text(python[0] + "\n\n" + python[1])
    (tmp_path / "multiply.jsonl").write_text(json.dumps({**ROWS[0], "answer": "408"}) + "\n")
    (tmp_path / "config.yaml").write_text(docs_blocks("yaml")[0])
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--config", "config.yaml", "--quiet", "--set", f"model={tool_model}",
                     "--set", "max_steps=1", "--set", "prompts_per_step=1", "--set", "group_size=2",
                     "--set", "max_completion_length=32", "--set", "save_steps=0", "--set", "output_dir=out",
                     "--set", "model_card=false"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rollout/agent/turns" in record and "reward/answered/mean" in record


def test_the_docs_environment_and_rollout_func_run(tool_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.agents import check_setup
    from grpo.train.agent_rollout import AgentSetup
    from grpo.train.rollout import collect_rollout

    space: dict = {}
    for block in docs_blocks("python"):
        exec(block, space)
    tok = AutoTokenizer.from_pretrained(tool_model)
    policy = AutoModelForCausalLM.from_pretrained(tool_model)

    def rollout_with(setup, backend, **over):
        cfg = config(tool_model, tmp_path, **over)
        try:
            return collect_rollout(policy, None, tok, ROWS * 2, build_rewards(cfg), cfg,
                                   torch.Generator().manual_seed(0), backend=backend, agent=setup)
        finally:
            setup.close()

    bump = ScriptedBackend(tok, first='<tool_call>\n{"name": "bump", "arguments": {"by": 3}}\n</tool_call>',
                           then="done")
    counted = rollout_with(AgentSetup(*check_setup(tok, [], space["Counter"])), bump, tools=[],
                           environment_factory=space["Counter"], rewards=[])
    assert counted.rewards_per_function["Counter"].tolist() == [1.0] * 4
    assert "Count to 3." in counted.messages[0][0]["content"]

    mine = rollout_with(AgentSetup([], None, rollout_func=space["my_rollout"]), ScriptedBackend(tok), tools=[],
                        rollout_func=space["my_rollout"])
    assert mine.rewards_per_function["answered"].tolist() == [1.0] * 4
    assert mine.sampling_stats["agent/tool_calls"] == 1.0


# ---------------------------------------------------------------------------------------------
# grpo demo --task calculator

def test_the_calculator_warm_start_trains_on_the_tokens_the_rollout_makes():
    """A solved warm-start episode is token for token, mask and all, what the episode loop makes
    when the model writes the same turns."""
    from grpo.agents import Sampled, run_episodes
    from grpo.recipes.calculator import build_tokenizer, episode, final_answer, multiply, problems

    tok = build_tokenizer()
    row = problems(0)[1][0]
    ids, mask = episode(tok, row)
    a, b = (int(x) for x in row["prompt"][0]["content"].split("*"))
    turns = [f'<tool_call>{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>', row["answer"]]

    def generate(contexts, max_new_tokens):
        text = turns.pop(0)
        out = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return [Sampled(out, [-0.1] * len(out), True)]

    [ep] = run_episodes(tok, [row["prompt"]], generate, tools=[multiply], max_turns=3, max_completion_length=200)
    assert ep.prompt_ids + ep.completion_ids == ids
    assert [0] * len(ep.prompt_ids) + ep.loss_mask == mask
    assert final_answer([ep.completion], [row["answer"]]) == [1.0]


def test_grpo_demo_task_calculator_runs(tmp_path, monkeypatch):
    from grpo import cli
    from grpo.recipes import calculator

    monkeypatch.setattr(calculator, "WARM", dict(steps=2, batch_size=4, learning_rate=1e-3))
    monkeypatch.setattr(calculator, "HELDOUT", 4)
    code = cli.main(["demo", "--task", "calculator", "--output-dir", str(tmp_path / "demo"), "--quiet",
                     "--set", "max_steps=1", "--set", "prompts_per_step=2", "--set", "group_size=2",
                     "--set", "max_completion_length=24"])
    assert code == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["heldout_prompts"] == 4 and 0 <= summary["success_after"] <= 1
    record = json.loads((tmp_path / "demo" / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rollout/agent/tool_calls" in record
