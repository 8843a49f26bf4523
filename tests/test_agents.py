"""Multi-turn agent episodes (grpo.agents): tools, their calls parsed from what the model wrote,
environments, the lockstep loop, token-exactness and the loss mask, on CPU.

Most tests script the model: `Script` answers each context with predetermined assistant text,
tokenized, plus the stop token, so parsing and episodes are deterministic. One test generates
with a real tiny model through the rollout backend, and scores the episodes as the update would.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from agent_templates import FAMILIES, QWEN_RESPONSE_TEMPLATE, build_tokenizer
from grpo.agents import (AgentError, CallError, Episode, Environments, Sampled, ToolCall, backend_generate,
                         check_setup, episodes_from_trl, load_tools, parse_turn, run_episodes)
from grpo.agents.tools import make_tool
from grpo.errors import ConfigError, RewardError


# ---------------------------------------------------------------------------------------------
# Tools the tests give the model

def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a * b


def slow(x: int) -> int:
    """Wait 0.3 seconds, then return x.

    Args:
        x: Any number.
    """
    time.sleep(0.3)
    return x


LOOPS: list = []


async def slow_async(x: int) -> int:
    """Wait 0.3 seconds without blocking, then return x.

    Args:
        x: Any number.
    """
    LOOPS.append(id(asyncio.get_running_loop()))
    await asyncio.sleep(0.3)
    return x


def hang(x: int) -> int:
    """Take far too long.

    Args:
        x: Any number.
    """
    time.sleep(1.0)
    return x


async def hang_async(x: int) -> int:
    """Take far too long, without blocking.

    Args:
        x: Any number.
    """
    await asyncio.sleep(5.0)
    return x


def boom(x: int) -> int:
    """Fail.

    Args:
        x: Any number.
    """
    raise ValueError("no way")


# ---------------------------------------------------------------------------------------------
# A scripted model

class Script:
    """generate(contexts, max_new_tokens) answering each episode with its next scripted turn.

    An episode is known by a marker in its prompt (`Q0`, `Q1`, ...); each turn is the text's
    tokens and the stop token, with log-probs -0.01, -0.02, ... so that they can be traced."""

    def __init__(self, tokenizer, turns: dict[str, list[str]], stop: str | None = None):
        self.tokenizer, self.turns = tokenizer, {k: list(v) for k, v in turns.items()}
        self.stop = tokenizer.convert_tokens_to_ids(stop or tokenizer.eos_token)
        self.calls = 0

    def __call__(self, contexts, max_new_tokens):
        self.calls += 1
        out = []
        for context in contexts:
            text = self.tokenizer.decode(context)
            marker = next(m for m in self.turns if m in text)
            ids = self.tokenizer(self.turns[marker].pop(0), add_special_tokens=False)["input_ids"] + [self.stop]
            out.append(Sampled(ids, [-0.01 * (i + 1) for i in range(len(ids))], True))
        return out


def call_text(family: str, name: str, arguments: str) -> str:
    """A tool call as the family's model writes it (and its chat template renders it)."""
    if family == "qwen2.5":
        return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
    return f'{{"name": "{name}", "parameters": {arguments}}}'


def rendered(tokenizer, episode: Episode, tools) -> list[int]:
    return tokenizer.apply_chat_template(episode.messages, tools=[t.schema for t in load_tools(tools)] or None,
                                         tokenize=True, return_dict=False)


def assistant_mask(tokenizer, ids: list[int], family: str) -> list[int]:
    """1 on every token of an assistant turn's body, from just after its header up to and
    including its end-of-turn token: found in the rendering alone, independently of the loop."""
    spec = FAMILIES[family]
    opener = tokenizer(spec["turn_open"], add_special_tokens=False)["input_ids"]
    close = tokenizer.convert_tokens_to_ids(spec["turn_close"])
    mask, inside, i = [0] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i:i + len(opener)] == opener:
            inside, i = True, i + len(opener)
            continue
        if inside:
            mask[i] = 1
            inside = ids[i] != close
        i += 1
    return mask


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer("qwen2.5")


# ---------------------------------------------------------------------------------------------
# The key property: tokens are the template's rendering; the mask covers the model's tokens

def test_episode_tokens_are_the_chat_templates_rendering_and_the_mask_is_the_assistants(family):
    tok = build_tokenizer(family)
    first = [call_text(family, "add", '{"a": 2, "b": 3}')]
    if family == "qwen2.5":  # several calls in one turn: Hermes style allows it, Llama 3.1's one call per turn
        first = [first[0] + "\n" + call_text(family, "multiply", '{"a": 4, "b": 5}')]
    script = Script(tok, {"Q0": first + [call_text(family, "multiply", '{"a": 5, "b": 6}'), "It is 30."]})
    [ep] = run_episodes(tok, [[{"role": "user", "content": "Q0: what is (2+3)*6?"}]], script,
                        tools=[add, multiply], max_turns=5, max_completion_length=4000)

    assert ep.turns == 3 and not ep.truncated and ep.reward is None
    assert ep.tool_calls == (3 if family == "qwen2.5" else 2) and not any(ep.tool_errors.values())
    assert [m["content"] for m in ep.completion if m["role"] == "tool"] == (["5", "20", "30"] if family == "qwen2.5"
                                                                             else ["5", "30"])
    full = rendered(tok, ep, [add, multiply])
    ours = ep.prompt_ids + ep.completion_ids
    # Equal token for token, up to the final end-of-turn; after it the template writes only what
    # the model never sampled (Qwen's newline).
    assert full[:len(ours)] == ours
    assert tok.decode(full[len(ours):]) in ("", "\n")
    expected = assistant_mask(tok, ours, family)[len(ep.prompt_ids):]
    assert ep.loss_mask == expected and sum(expected) > 0
    # The sampled log-probs are on the model's tokens, and only there.
    assert all((lp < 0) == bool(m) for lp, m in zip(ep.logprobs, ep.loss_mask))
    # Tool tokens sit between the turns, masked out.
    assert 0 in ep.loss_mask[ep.loss_mask.index(1):len(ep.loss_mask) - ep.loss_mask[::-1].index(1)]


def test_appending_by_text_gives_the_ids_appending_by_ids_gives(family, monkeypatch):
    """The renderer tokenizes only what a turn appends when its stop tokens are special tokens
    matched in the raw text; the same episode through the whole renderings' ids is the same."""
    import grpo.agents.rendering as rendering
    tok = build_tokenizer(family)
    stop = tok.convert_tokens_to_ids("<|eot_id|>" if family.startswith("llama") else "<|im_end|>")
    assert rendering.split_texts(tok, {stop}) == {tok.convert_ids_to_tokens(stop): stop}
    script = {"Q0": [call_text(family, "add", '{"a": 2, "b": 3}'), call_text(family, "multiply", '{"a": 5, "b": 6}'),
                     "It is 30."]}

    def episode():
        [ep] = run_episodes(tok, [[{"role": "user", "content": "Q0: what is (2+3)*6?"}]], Script(tok, dict(script)),
                            tools=[add, multiply], max_turns=5, max_completion_length=4000)
        return ep

    by_text = episode()
    encoded = []
    monkeypatch.setattr(rendering, "split_texts", lambda *_: {})
    monkeypatch.setattr(rendering, "encoder", lambda t: lambda text: encoded.append(text) or t(
        text, add_special_tokens=False)["input_ids"])
    by_ids = episode()
    assert len(encoded) > 3  # the whole renderings were tokenized
    assert (by_text.prompt_ids, by_text.completion_ids, by_text.loss_mask) == \
        (by_ids.prompt_ids, by_ids.completion_ids, by_ids.loss_mask)
    # A stop token that is not a special token split out of the raw text: the ids decide.
    assert rendering.split_texts(tok, {stop, tok.convert_tokens_to_ids("a")}) == {}


def test_text_environment_episode_is_token_exact(family):
    tok = build_tokenizer(family)

    class Guess:
        """Guess the number: higher / lower, reward 1 when found."""

        def reset(self, target, **_):
            self.target = target
            return " Guess a number from 1 to 9."

        def step(self, text):
            guess = int(text.strip())
            if guess == self.target:
                return "found", 1.0, True
            return ("higher" if guess < self.target else "lower"), -0.1, False

    script = Script(tok, {"Q0": ["3", "7", "5"]})
    [ep] = run_episodes(tok, [[{"role": "user", "content": "Q0."}]], script, rows=[{"target": 5}],
                        environments=Guess, max_turns=10, max_completion_length=500)
    assert ep.turns == 3 and ep.turn_rewards == [-0.1, -0.1, 1.0] and ep.reward == pytest.approx(0.8)
    assert ep.prompt[-1]["content"] == "Q0. Guess a number from 1 to 9."  # reset's observation joins the user message
    assert [m["content"] for m in ep.completion if m["role"] == "user"] == ["higher", "lower"]
    assert ep.completion[-1] == {"role": "assistant", "content": "5"}  # the final observation is not shown
    ours = ep.prompt_ids + ep.completion_ids
    full = rendered(tok, ep, [])
    assert full[:len(ours)] == ours and tok.decode(full[len(ours):]) in ("", "\n")
    assert ep.loss_mask == assistant_mask(tok, ours, family)[len(ep.prompt_ids):]


# ---------------------------------------------------------------------------------------------
# Parsing

TOOLS = {t.name: t for t in load_tools([add, multiply])}


def test_hermes_calls_several_per_turn_with_content():
    text = ('Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>')
    parsed = parse_turn(text, TOOLS)
    assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("multiply", {"a": 3, "b": 4})]
    assert parsed.message["content"] == "Let me compute."
    assert [c["function"]["name"] for c in parsed.message["tool_calls"]] == ["add", "multiply"]


def test_llama_json_calls_with_and_without_python_tag():
    for text in ['{"name": "add", "parameters": {"a": 1, "b": 2}}',
                 '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',
                 ' {"name": "add", "arguments": {"a": 1, "b": 2}} ']:
        parsed = parse_turn(text, TOOLS)
        assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2})] and parsed.message["content"] == ""
    plain = parse_turn("The answer is {5}.", TOOLS)
    assert plain.calls == [] and plain.message == {"role": "assistant", "content": "The answer is {5}."}


@pytest.mark.parametrize("text,kind,says", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}</tool_call>', "parse", "not valid JSON"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "parse", "never closed"),
    ('<tool_call>["add", 1, 2]</tool_call>', "parse", 'string "name"'),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1,', "parse", "not valid JSON"),
    ('<tool_call>{"name": "subtract", "arguments": {"a": 1}}</tool_call>', "unknown_tool", "add, multiply"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "bad_arguments", "'b'"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}</tool_call>', "bad_arguments", "'c'"),
    ('<tool_call>{"name": "add", "arguments": {"a": "1", "b": 2}}</tool_call>', "bad_arguments", "integer"),
    ('<tool_call>{"name": "add", "arguments": {"a": true, "b": 2}}</tool_call>', "bad_arguments", "integer"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "bad_arguments", "JSON object"),
])
def test_calls_that_cannot_be_made_are_errors_of_one_kind(text, kind, says):
    [error] = parse_turn(text, TOOLS).calls
    assert isinstance(error, CallError) and error.kind == kind and says in error.message


def test_the_tokenizers_response_template_parses_when_defined(qwen):
    tok = build_tokenizer("qwen2.5")
    tok.response_template = QWEN_RESPONSE_TEMPLATE
    prefix = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def parse(text):
        ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return parse_turn(text, TOOLS, tokenizer=tok, ids=ids, prefix_ids=prefix)

    good = parse('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert good.calls == [ToolCall("add", {"a": 1, "b": 2})] and good.message["content"] == "Sure."
    [bad] = parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>').calls
    assert bad.kind == "parse"
    [unknown] = parse('<tool_call>{"name": "nope", "arguments": {}}</tool_call>').calls
    assert unknown.kind == "unknown_tool"


def test_parse_errors_become_tool_messages_and_are_counted(qwen):
    turn = ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>\n'
            '<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    script = Script(qwen, {"Q0": [turn, "I give up."]})
    [ep] = run_episodes(qwen, ["Q0"], script, tools=[add, multiply], max_completion_length=4000)
    results = [m for m in ep.completion if m["role"] == "tool"]
    assert [m["content"].split(":")[0] for m in results] == ["Error"] * 3
    assert "not valid JSON" in results[0]["content"] and "no tool 'divide'" in results[1]["content"]
    assert "bad arguments for add" in results[2]["content"]
    assert ep.tool_calls == 3 and ep.turns == 2
    assert ep.tool_errors == {"parse": 1, "unknown_tool": 1, "bad_arguments": 1, "raised": 0, "timeout": 0}


# ---------------------------------------------------------------------------------------------
# Running the calls: concurrently, bounded, failures reported to the model

def tool_turns(tok, name, n):
    return Script(tok, {f"Q{i}": [call_text("qwen2.5", name, '{"x": %d}' % i), "done"] for i in range(n)})


def test_sync_tools_of_all_episodes_run_concurrently(qwen):
    n = 8
    start = time.perf_counter()
    episodes = run_episodes(qwen, [f"Q{i}" for i in range(n)], tool_turns(qwen, "slow", n), tools=[slow],
                            max_completion_length=4000)
    elapsed = time.perf_counter() - start
    assert [ep.completion[1]["content"] for ep in episodes] == [str(i) for i in range(n)]
    assert all(ep.tool_seconds >= 0.29 for ep in episodes)
    assert elapsed < n * 0.3 / 2, f"{n} calls of 0.3 s took {elapsed:.2f} s: not concurrent"


def test_async_tools_are_awaited_together_on_one_loop(qwen):
    n = 8
    LOOPS.clear()
    start = time.perf_counter()
    episodes = run_episodes(qwen, [f"Q{i}" for i in range(n)], tool_turns(qwen, "slow_async", n),
                            tools=[slow_async], max_completion_length=4000)
    elapsed = time.perf_counter() - start
    assert [ep.completion[1]["content"] for ep in episodes] == [str(i) for i in range(n)]
    assert len(set(LOOPS)) == 1 and len(LOOPS) == n
    assert elapsed < n * 0.3 / 2, f"{n} async calls of 0.3 s took {elapsed:.2f} s: not awaited together"


def test_calls_of_one_episode_run_in_the_order_written(qwen):
    class Log:
        def reset(self, **_):
            self.seen = []

        def write(self, word: str) -> str:
            """Append a word.

            Args:
                word: The word.
            """
            time.sleep(0.05 if word == "first" else 0.0)
            self.seen.append(word)
            return " ".join(self.seen)

    turn = "\n".join(call_text("qwen2.5", "write", '{"word": "%s"}' % w) for w in ("first", "second"))
    [ep] = run_episodes(qwen, ["Q0"], Script(qwen, {"Q0": [turn, "ok"]}), environments=Log,
                        max_completion_length=4000)
    assert ep.environment.seen == ["first", "second"]
    assert [m["content"] for m in ep.completion if m["role"] == "tool"] == ["first", "first second"]


def test_parallel_calls_overlap_the_calls_of_one_turn(qwen):
    turn = "\n".join(call_text("qwen2.5", "slow", '{"x": %d}' % k) for k in range(4))
    start = time.perf_counter()
    [ep] = run_episodes(qwen, ["Q0"], Script(qwen, {"Q0": [turn, "ok"]}), tools=[slow], parallel_calls=True,
                        max_completion_length=4000)
    elapsed = time.perf_counter() - start
    assert [m["content"] for m in ep.completion if m["role"] == "tool"] == ["0", "1", "2", "3"]
    assert elapsed < 4 * 0.3 / 2, f"4 calls of 0.3 s in one turn took {elapsed:.2f} s: not overlapped"


@pytest.mark.parametrize("tool", [hang, hang_async])
def test_a_tool_that_overruns_the_timeout_is_reported_and_counted(qwen, tool):
    start = time.perf_counter()
    [ep] = run_episodes(qwen, ["Q0"], tool_turns(qwen, tool.__name__, 1), tools=[tool], tool_timeout=0.2,
                        max_completion_length=4000)
    assert time.perf_counter() - start < 0.9
    assert ep.completion[1]["content"] == f"Error: {tool.__name__} did not return within 0.2 seconds"
    assert ep.tool_errors["timeout"] == 1 and ep.turns == 2


def test_a_tool_that_raises_returns_its_error_text(qwen):
    [ep] = run_episodes(qwen, ["Q0"], tool_turns(qwen, "boom", 1), tools=[boom], max_completion_length=4000)
    assert ep.completion[1] == {"role": "tool", "name": "boom", "content": "Error: ValueError: no way"}
    assert ep.tool_errors["raised"] == 1 and ep.completion[-1]["content"] == "done"


# ---------------------------------------------------------------------------------------------
# Refusing bad tools and templates before a model loads

def no_docstring(a: int) -> int:
    return a


def no_hints(a):
    """Return a.

    Args:
        a: Anything.
    """
    return a


def test_bad_tools_are_refused_with_one_line_naming_the_function(tmp_path, qwen):
    module = tmp_path / "mytools.py"
    module.write_text("def ok(a: int) -> int:\n    '''Return a.\n\n    Args:\n        a: A number.\n    '''\n"
                      "    return a\nraise_later = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    cases = [(no_docstring, "no_docstring"), (no_hints, "no_hints"),
             (f"{tmp_path}/missing.py:ok", "missing.py"), (f"{broken}:ok", "broken.py"),
             (f"{module}:absent", "absent"), ("no_such_package_x.tools:ok", "no_such_package_x"),
             (f"{module}:raise_later", "raise_later"), ("no_colon_here", "no_colon_here")]
    for spec, name in cases:
        with pytest.raises(ConfigError) as e:
            load_tools([spec])
        assert name in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert load_tools([f"{module}:ok"])[0].name == "ok"
    with pytest.raises(ConfigError, match="also the name of"):
        load_tools([add, make_tool(add, label="again")])


def test_a_template_that_cannot_render_a_tool_is_refused_naming_it(qwen):
    plain = build_tokenizer("qwen2.5")
    plain.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"  # shows no tools
    with pytest.raises(ConfigError, match=r"tool .*add: the chat template of 'tiny-qwen2.5' does not show tools"):
        check_setup(plain, [add])
    strict = build_tokenizer("qwen2.5")
    strict.chat_template = "{% for t in tools %}{{ t.function.name }}{{ t.function.nope.x }}{% endfor %}"
    with pytest.raises(ConfigError, match="add: the chat template .* cannot render its schema"):
        check_setup(strict, [add])
    tools, envs = check_setup(qwen, [add, multiply])
    assert [t.name for t in tools] == ["add", "multiply"] and envs is None


def test_a_template_that_ends_no_turn_with_a_stop_token_is_refused(monkeypatch):
    import grpo.agents.rendering as rendering
    unended = build_tokenizer("qwen2.5")
    unended.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                             "{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}{% endif %}"
                             "{% if m.role != 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
                             "{% for t in tools %}{{ t.function.name }}{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ConfigError, match="ends an assistant turn with none of the stop tokens"):
        check_setup(unended, [add], stop_token_ids=[unended.convert_tokens_to_ids("<|im_end|>")])
    monkeypatch.setattr(rendering, "split_texts", lambda *_: {})  # the same through the ids
    with pytest.raises(ConfigError, match="ends an assistant turn with none of the stop tokens"):
        check_setup(unended, [add], stop_token_ids=[unended.convert_tokens_to_ids("<|im_end|>")])


def test_a_template_that_is_not_prefix_stable_is_refused_naming_it(qwen):
    unstable = build_tokenizer("qwen2.5")
    # Writes the number of messages first: every new message changes what comes before it.
    unstable.chat_template = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                              "{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}{% endif %}<|im_end|>\n"
                              "{% endfor %}{% for t in tools %}{{ t.function.name }}{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ConfigError, match="'tiny-qwen2.5' is not prefix-stable"):
        check_setup(unstable, [add])
    import grpo.agents.rendering as rendering
    with pytest.MonkeyPatch.context() as patch:  # the same through the whole renderings' ids
        patch.setattr(rendering, "split_texts", lambda *_: {})
        with pytest.raises(ConfigError, match="'tiny-qwen2.5' is not prefix-stable"):
            check_setup(unstable, [add])


# ---------------------------------------------------------------------------------------------
# Environments

class Counter:
    """TRL's environment_factory: reset per episode, public methods are tools, get_reward."""

    def reset(self, start=0, **_):
        self.value = start
        return f" (the counter starts at {start})"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return self.value

    def get_reward(self) -> float:
        return float(self.value)

    def _helper(self):  # private: not a tool
        return None

    @property
    def doubled(self):  # a property: never touched while the tools are found
        raise AssertionError("read")


def test_environment_factory_methods_are_tools_and_its_reward_is_read(qwen):
    envs = Environments(Counter)
    assert envs.tool_names == ["increment"] and not envs.text
    inc = [call_text("qwen2.5", "increment", '{"by": %d}' % k) for k in (2, 3)]
    script = Script(qwen, {"Q0": inc + ["five"], "Q1": [inc[0], "two"]})
    episodes = run_episodes(qwen, ["Q0", "Q1"], script, rows=[{"start": 0}, {"start": 10}], environments=envs,
                            max_completion_length=4000)
    assert [ep.reward for ep in episodes] == [5.0, 12.0] and episodes[0].environment is not episodes[1].environment
    assert episodes[1].prompt[0]["content"] == "Q1 (the counter starts at 10)"
    assert [m["content"] for m in episodes[0].completion if m["role"] == "tool"] == ["2", "5"]
    assert len(envs.pool) == 2  # made once, reset per episode: a second batch reuses them
    again = run_episodes(qwen, ["Q0"], Script(qwen, {"Q0": ["none"]}), rows=[{"start": 7}], environments=envs)
    assert again[0].reward == 7.0 and len(envs.pool) == 2


def test_a_reward_attribute_is_read_when_there_is_no_get_reward(qwen):
    class Flag:
        def reset(self, **_):
            self.reward = 0.0

        def solve(self) -> str:
            """Solve the task."""
            self.reward = 1.0
            return "solved"

    [ep] = run_episodes(qwen, ["Q0"], Script(qwen, {"Q0": [call_text("qwen2.5", "solve", "{}"), "ok"]}),
                        environments=Flag, max_completion_length=4000)
    assert ep.reward == 1.0


class Failing:
    def __init__(self, where="reset", returns=None):
        self.where, self.returns = where, returns

    def reset(self, **row):
        if self.where == "reset":
            raise RuntimeError("no board")

    def step(self, text):
        if self.where == "step":
            raise KeyError("move")
        return self.returns


@pytest.mark.parametrize("factory,method,says", [
    (lambda: Failing("reset"), "reset", "raised RuntimeError: no board"),
    (lambda: Failing("step"), "step", "raised KeyError"),
    (lambda: Failing("none", returns="not a tuple"), "step", "returned str"),
    (lambda: Failing("none", returns=("obs", float("nan"), False)), "step", "reward nan"),
])
def test_environment_failures_name_the_class_the_method_and_the_row(qwen, factory, method, says):
    row = {"prompt": "Q0", "_line": 3}
    with pytest.raises(AgentError) as e:
        run_episodes(qwen, ["Q0"], Script(qwen, {"Q0": ["move"]}), rows=[row], environments=factory,
                     source="train.jsonl")
    message = str(e.value)
    assert f"Failing.{method}" in message and "train.jsonl:3" in message and says in message
    assert "\n" not in message and isinstance(e.value, RewardError)


def test_an_environment_without_reset_or_with_bad_tool_methods_is_refused():
    class NoReset:
        def play(self, x: int) -> int:
            """Play.

            Args:
                x: A move.
            """

    class BadTool:
        def reset(self, **_):
            return None

        def play(self, x):
            return x

    with pytest.raises(ConfigError, match="NoReset: an environment needs a reset"):
        Environments(NoReset)
    with pytest.raises(ConfigError, match=r"tool BadTool\.play: no JSON schema"):
        Environments(BadTool)


# ---------------------------------------------------------------------------------------------
# How episodes end

def test_a_turn_reaching_max_completion_length_is_cut_and_marked_truncated(qwen):
    script = Script(qwen, {"Q0": ["x" * 50]})
    [ep] = run_episodes(qwen, ["Q0"], script, max_completion_length=20)
    assert ep.truncated and len(ep.completion_ids) == 20 and ep.loss_mask == [1] * 20
    assert ep.completion[-1]["content"] == "x" * 20


def test_tool_results_that_would_reach_the_limit_are_not_appended(qwen):
    turn = call_text("qwen2.5", "add", '{"a": 1, "b": 2}')
    limit = len(qwen(turn, add_special_tokens=False)["input_ids"]) + 1 + 10  # the call, its stop token, 10 more
    [ep] = run_episodes(qwen, ["Q0"], Script(qwen, {"Q0": [turn, "3"]}), tools=[add], max_completion_length=limit)
    assert ep.truncated and ep.turns == 1 and ep.tool_calls == 1
    assert ep.completion[-1]["role"] == "assistant" and all(ep.loss_mask)  # nothing after the model's turn
    assert len(ep.completion_ids) < limit


def test_max_turns_ends_the_episode_after_the_models_turn(qwen):
    script = Script(qwen, {"Q0": [call_text("qwen2.5", "add", '{"a": 1, "b": %d}' % k) for k in range(5)]})
    [ep] = run_episodes(qwen, ["Q0"], script, tools=[add], max_turns=2, max_completion_length=4000)
    assert ep.turns == 2 and not ep.truncated and ep.tool_calls == 2
    assert [m["role"] for m in ep.completion] == ["assistant", "tool", "assistant"]
    assert script.calls == 2


def test_episodes_run_in_lockstep_and_end_independently(qwen):
    script = Script(qwen, {"Q0": ["at once"], "Q1": [call_text("qwen2.5", "add", '{"a": 1, "b": 1}'), "2"]})
    episodes = run_episodes(qwen, ["Q0", "Q1"], script, tools=[add], max_completion_length=4000)
    assert [ep.turns for ep in episodes] == [1, 2] and script.calls == 2


# ---------------------------------------------------------------------------------------------
# The contract a user's rollout function meets

def test_trl_rollout_output_converts_to_checked_episodes():
    out = {"prompt_ids": [[1, 2], [1, 3]], "completion_ids": [[4, 5, 6], [7]], "logprobs": [[-1.0, -2.0, -3.0], [-0.5]],
           "env_mask": [[1, 0, 1], [1]], "answer": ["a", "b"]}
    first, second = episodes_from_trl(out)
    assert first.loss_mask == [1, 0, 1] and first.logprobs == [-1.0, 0.0, -3.0] and first.extras == {"answer": "a"}
    assert second.loss_mask == [1] and second.reward is None
    with pytest.raises(RewardError, match="lacks"):
        episodes_from_trl({"prompt_ids": [[1]], "completion_ids": [[2]]})
    with pytest.raises(RewardError, match="loss_mask has 2"):
        Episode([1], [2, 3, 4], [1, 0], [0.0, 0.0, 0.0]).check()
    with pytest.raises(RewardError, match="all 0"):
        Episode([1], [2], [0], [0.0]).check()


# ---------------------------------------------------------------------------------------------
# The seam: a real tiny model through the rollout backend, scored as the update scores it

def tiny_qwen_model(eos_bias: float | None = None):
    """A tiny random Llama with the Qwen2.5 tokenizer; with `eos_bias`, a bias on its end-of-turn
    token, so that its turns end after a few tokens and episodes have several turns."""
    from grpo.recipes.tasks import build_tiny_model

    tok = build_tokenizer("qwen2.5")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                             max_positions=512, pad_token_id=tok.pad_token_id, eos_token_id=eos, seed=0).eval()
    if eos_bias is None:
        return tok, model
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = eos_bias
    model.lm_head = head
    return tok, model


def test_real_model_episodes_through_the_backend_score_as_sampled(qwen):
    from grpo.engine.backend import LocalBackend, SamplingParams
    from grpo.engine.logprobs import completion_logprobs

    tok, model = tiny_qwen_model(eos_bias=4.0)

    class TwoSteps:
        def reset(self, **_):
            self.n = 0
            return None

        def step(self, text):
            self.n += 1
            return f"step {self.n}", float(len(text)), self.n == 2

    backend = LocalBackend(model, tok)
    params = SamplingParams(group_size=4, max_new_tokens=999, strategy="sample", temperature=1.0, top_p=1.0, top_k=0)
    generate = backend_generate(backend, tok, params, torch.Generator().manual_seed(0))
    episodes = run_episodes(tok, [[{"role": "user", "content": "play"}]] * 4, generate, environments=TwoSteps,
                            max_turns=4, max_completion_length=64, stop_token_ids=backend.stop_token_ids)
    finished = [ep for ep in episodes if not ep.truncated]
    assert finished and all(ep.turns == 2 for ep in finished)
    for ep in episodes:
        assert ep.reward == sum(ep.turn_rewards) and ep.sampling_logprobs is not None
        assert len(ep.completion_ids) == len(ep.loss_mask) == len(ep.logprobs) <= 64
    # What the update does with them: right-padded completions with the loss mask, holes and all;
    # the trainer's log-probs at the model's tokens are the ones they were sampled with.
    prompt = torch.tensor([ep.prompt_ids for ep in episodes])
    T = max(len(ep.completion_ids) for ep in episodes)
    ids = torch.tensor([ep.completion_ids + [tok.pad_token_id] * (T - len(ep.completion_ids)) for ep in episodes])
    mask = torch.tensor([ep.loss_mask + [0] * (T - len(ep.loss_mask)) for ep in episodes])
    sampled = torch.tensor([ep.logprobs + [0.0] * (T - len(ep.logprobs)) for ep in episodes])
    assert any(0 in ep.loss_mask for ep in finished)  # environment tokens inside the sequence
    for engine in ("auto", "plain"):
        with torch.no_grad():
            lp, _ = completion_logprobs(model, prompt, torch.ones_like(prompt), ids, mask, 1.0, engine=engine)
        torch.testing.assert_close(lp * mask, sampled, atol=2e-4, rtol=0)


def test_a_groups_first_turn_is_one_prompt_of_the_group_engine_and_the_same_draw():
    import dataclasses

    from grpo.agents.backend import repeats
    from grpo.data.prompts import left_pad
    from grpo.engine.backend import LocalBackend, SamplingParams

    assert repeats([[1], [1], [2], [2]]) == 2 and repeats([[1], [1], [1]]) == 3
    assert repeats([[1], [2], [1], [2]]) == 1 and repeats([[1], [1], [2]]) == 1 and repeats([[1]]) == 1
    assert repeats([[1], [1], [2], [3]]) == 1

    tok, model = tiny_qwen_model()
    backend = LocalBackend(model, tok)
    params = SamplingParams(group_size=3, max_new_tokens=12, strategy="sample", temperature=1.0, top_p=1.0, top_k=0)
    contexts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                        return_dict=False) for q in ("hi", "what is 2+2?")]
    grouped = [c for c in contexts for _ in range(3)]
    calls = []
    generate = backend.generate
    backend.generate = lambda ids, mask, p, g, **kw: calls.append((ids.shape[0], p.group_size)) or generate(
        ids, mask, p, g, **kw)
    with torch.no_grad():
        shared = backend_generate(backend, tok, params, torch.Generator().manual_seed(0))(grouped, 12)
        # The same six contexts, each its own prompt (what a later turn's distinct contexts get).
        ids, mask = left_pad(tok, grouped, max(len(c) for c in grouped), None)
        alone = generate(ids, mask, dataclasses.replace(params, group_size=1), torch.Generator().manual_seed(0))
    assert calls == [(2, 3)]  # two prompts, three turns each
    for i, s in enumerate(shared):
        n = int(alone.completion_mask[i].sum())
        assert s.token_ids == alone.completion_ids[i, :n].tolist()  # the same draw, token for token
        torch.testing.assert_close(torch.tensor(s.logprobs), alone.logprobs[i, :n], atol=1e-5, rtol=0)
    assert len({tuple(s.token_ids) for s in shared}) > 2  # the group's turns differ: G draws, not one



def test_later_turns_continue_from_the_kept_cache_and_draw_what_a_whole_prefill_draws(monkeypatch):
    import grpo.engine.decoders as decoders
    from grpo.engine.backend import LocalBackend, SamplingParams

    tok, model = tiny_qwen_model(eos_bias=3.0)

    class Echo:
        def reset(self, **_):
            self.n = 0

        def step(self, text):
            self.n += 1
            return f"heard {len(text)}" + "!" * self.n, 0.0, self.n == 3

    class Whole(LocalBackend):
        keeps_cache = False

    read = []
    prefill_after = decoders.prefill_after
    monkeypatch.setattr(decoders, "prefill_after", lambda m, kw, keep, ids, mask, past: read.append(
        sum(p is not None for p in past)) or prefill_after(m, kw, keep, ids, mask, past))
    params = SamplingParams(group_size=2, max_new_tokens=999, strategy="sample", temperature=1.0, top_p=1.0, top_k=0)
    prompts = [[{"role": "user", "content": q}] for q in ("play", "play", "go on", "go on")]
    runs = {}
    for name, backend in (("kept", LocalBackend(model, tok)), ("whole", Whole(model, tok))):
        with torch.no_grad():
            runs[name] = run_episodes(tok, prompts, backend_generate(backend, tok, params,
                                                                     torch.Generator().manual_seed(0)),
                                      environments=Echo, max_turns=4, max_completion_length=96,
                                      stop_token_ids=backend.stop_token_ids)
    assert read and all(n > 0 for n in read)  # later turns went through the kept cache
    assert max(ep.turns for ep in runs["kept"]) >= 3
    for kept, whole in zip(runs["kept"], runs["whole"]):
        assert kept.completion_ids == whole.completion_ids and kept.loss_mask == whole.loss_mask
        torch.testing.assert_close(torch.tensor(kept.logprobs), torch.tensor(whole.logprobs), atol=1e-5, rtol=0)
    # Under autocast (keys and values in two dtypes) every turn prefills its whole context.
    read.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        episodes = run_episodes(tok, prompts, backend_generate(LocalBackend(model, tok), tok, params,
                                                               torch.Generator().manual_seed(0)),
                                environments=Echo, max_turns=4, max_completion_length=96)
    assert not read and max(ep.turns for ep in episodes) >= 2


# Texts of every kind a turn holds: special tokens of both families, JSON, runs of whitespace,
# and spaces before punctuation (what a tokenizer's clean-up would remove).
TEXTS = ["", "plain", "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"a\": 1}</tool_call>",
         "<|begin_of_text|><|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>",
         "  tabs\tand\n\nnewlines , ok .  "]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_renderers_encoder_gives_the_tokenizers_own_ids(family):
    from grpo.agents.rendering import encoder
    tok = build_tokenizer(family)
    own = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert [encoder(tok)(t) for t in TEXTS] == own
    # Padding or truncation set on the Rust tokenizer: transformers' call, which unsets them.
    tok.backend_tokenizer.enable_truncation(max_length=3)
    encode = encoder(tok)
    assert [encode(t) for t in TEXTS] == own


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_decoder_gives_the_tokenizers_own_texts(family):
    from grpo.agents.rendering import decoder
    tok = build_tokenizer(family)
    batch = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    own = [tok.decode(ids, skip_special_tokens=False) for ids in batch]
    assert decoder(tok)(batch) == own and decoder(tok)([]) == []
    # A tokenizer that cleans up spaces: transformers' decode, which does it.
    tok.clean_up_tokenization_spaces = True
    assert decoder(tok)(batch) == [tok.decode(ids, skip_special_tokens=False) for ids in batch]


def test_the_prefix_index_finds_the_longest_kept_prefix_a_scan_finds():
    import random

    from grpo.agents.backend import PrefixIndex
    rng = random.Random(0)
    kept = []
    for i in range(60):
        base = kept[rng.randrange(len(kept))][0] if kept and rng.random() < 0.5 else []
        kept.append((base + [rng.randrange(3) for _ in range(rng.randrange(1, 4))], f"cache {i}"))
    kept.append((list(kept[5][0]), "a second copy of 5"))
    index = PrefixIndex(kept)
    for _ in range(300):
        context = list(kept[rng.randrange(len(kept))][0]) + [rng.randrange(3) for _ in range(rng.randrange(0, 3))]
        if rng.random() < 0.2:
            context = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
        scan = [c for t, c in kept if len(t) < len(context) and context[:len(t)] == t]
        best = max((len(t) for t, c in kept if c in scan), default=None)
        expected = next((c for t, c in kept if c in scan and len(t) == best), None)
        assert index.longest(context) == expected
