"""TRL's reward-function contract: the documented examples of TRL's GRPOTrainer page, unchanged,
called the way our trainer calls them; conversational completions; completion_ids;
trainer_state; log_metric / log_extra reaching metrics.jsonl, TensorBoard and samples.jsonl;
None; async functions awaited concurrently; Python callables through the Python API."""

import asyncio
import json
import re

import pytest
import torch

from grpo.config import TrainConfig, build
from grpo.errors import RewardError
from grpo.rewards import build_rewards, score
from grpo.rewards.scoring import RewardLog
from grpo.train.loop import train

CPU = torch.device("cpu")


def rewards_of(*fns):
    return build_rewards(list(fns), CPU, torch.float32)


# ---------------------------------------------------------------------------------------------
# TRL's documented examples ("Using a custom reward function"), verbatim.

def reward_len_tokens(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]


def reward_len_chars(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def math_reward_func(prompts, completions, task, **kwargs):
    rewards = []
    for prompt, completion, t in zip(prompts, completions, task):
        if t == "math":
            rewards.append(1.0 if completion.strip() == "4" else -1.0)
        else:
            rewards.append(None)
    return rewards


async def async_reward_func(prompts, completions, **kwargs):
    # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
    await asyncio.sleep(0.01)
    # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
    return [1.0 if completion else 0.0 for completion in completions]


def logging_reward_func(completions, ground_truth, log_extra=None, log_metric=None, **kwargs):
    extracted = [re.search(r"\\boxed\{(.*?)\}", c) for c in completions]
    extracted = [m.group(1) if m else None for m in extracted]
    rewards = [1.0 if e == gt else 0.0 for e, gt in zip(extracted, ground_truth)]

    if log_extra:
        log_extra("golden_answer", list(ground_truth))
        log_extra("extracted_answer", [e or "[none]" for e in extracted])

    if log_metric:
        log_metric("accuracy", sum(rewards) / len(rewards))

    return rewards


def test_trl_examples_1_and_1_1_completion_ids_and_characters():
    prompts, completions = ["The sky is", "The sun is"], [" blue.", " in the sky."]
    completion_ids = [[6303, 13], [304, 279, 12884, 13]]
    _, parts = score(rewards_of(reward_len_tokens, reward_len_chars), prompts, completions, {},
                     completion_ids=completion_ids)
    assert parts["reward_len_tokens"].tolist() == [2.0, 4.0]   # TRL's documented outputs
    assert parts["reward_len_chars"].tolist() == [6.0, 12.0]


def test_trl_example_2_conversational_format():
    prompts = [[{"role": "assistant", "content": "What is the result of (1 + 2) * 4?"}],
               [{"role": "assistant", "content": "What is the result of (3 + 1) * 2?"}]]
    completions = [
        [{"role": "assistant", "content": "<think>The sum of 1 and 2 is 3, which we multiply by 4 to get 12.</think>"
                                          "<answer>(1 + 2) * 4 = 12</answer>"}],
        [{"role": "assistant", "content": "The sum of 3 and 1 is 4, which we multiply by 2 to get 8. "
                                          "So (3 + 1) * 2 = 8."}]]
    _, parts = score(rewards_of(format_reward_func, "think_format"), prompts, completions, {})
    assert parts["format_reward_func"].tolist() == [1.0, 0.0]
    assert parts["think_format"].tolist() == [1.0, 0.0]  # the built-ins read messages too


def test_trl_example_3_a_column_as_keyword():
    prompts = ["Problem: Solve the equation $2x + 3 = 7$. Solution:", "Problem: Solve the equation $3x - 5 = 10$."]
    completions = [r" The solution is \boxed{2}.", r" The solution is \boxed{6}."]
    total, parts = score(rewards_of(reward_func), prompts, completions, {"ground_truth": ["2", "5"]})
    assert parts["reward_func"].tolist() == [1.0, 0.0] and total.tolist() == [1.0, 0.0]


def test_trl_example_4_none_means_not_applicable():
    prompts = ["What is 2+2?", "Write a function", "What is 3*4?"]
    _, parts = score(rewards_of(math_reward_func), prompts, ["4", "def f(): pass", "11"],
                     {"task": ["math", "code", "math"]})
    values = parts["math_reward_func"]
    assert values[0] == 1.0 and torch.isnan(values[1]) and values[2] == -1.0


def test_trl_example_5_async_reward():
    total, parts = score(rewards_of(async_reward_func, reward_len_chars), ["a", "b"], ["x", ""], {})
    assert parts["async_reward_func"].tolist() == [1.0, 0.0]
    assert total.tolist() == [2.0, 0.0]


def test_trl_example_6_log_extra_and_log_metric():
    log = RewardLog()
    _, parts = score(rewards_of(logging_reward_func), ["p", "q"], [r"\boxed{3}", "no"], {"ground_truth": ["3", "1"]},
                     log_metric=log.log_metric, log_extra=log.log_extra)
    assert parts["logging_reward_func"].tolist() == [1.0, 0.0]
    assert log.means() == {"accuracy": 0.5}
    assert log.extra == {"golden_answer": ["3", "1"], "extracted_answer": ["3", "[none]"]}


def test_async_rewards_are_awaited_concurrently():
    # `waits` can only finish once `signals` has run: awaited one after the other (waits first),
    # it would wait forever and hit the timeout; awaited together, both return.
    event = {}

    async def waits(completions, **kwargs):
        event.setdefault("e", asyncio.Event())
        await event["e"].wait()
        return [1.0] * len(completions)

    async def signals(completions, **kwargs):
        await asyncio.sleep(0)
        event.setdefault("e", asyncio.Event()).set()
        return [2.0] * len(completions)

    total, _ = score(rewards_of(waits, signals), ["a"], ["b"], {}, timeout=20)
    assert total.tolist() == [3.0]


def test_async_reward_timeout_and_error_name_the_function():
    async def never(completions, **kwargs):
        await asyncio.sleep(3600)

    async def broken(completions, **kwargs):
        raise KeyError("nope")

    with pytest.raises(RewardError, match=r"reward 'never' did not return within reward_timeout=0.2"):
        score(rewards_of(never), ["a"], ["b"], {}, timeout=0.2)
    with pytest.raises(RewardError, match=r"reward 'broken' failed: KeyError"):
        score(rewards_of(broken), ["a"], ["b"], {}, timeout=5)


def test_a_sync_function_returning_a_coroutine_is_awaited():
    import functools

    wrapped = functools.partial(async_reward_func)  # iscoroutinefunction is False for some wrappers
    _, parts = score(rewards_of(lambda **kw: async_reward_func(**kw)), ["a"], ["x"], {})
    assert parts["<lambda>"].tolist() == [1.0]
    _, parts = score(rewards_of(wrapped), ["a"], ["x"], {})
    assert parts["async_reward_func"].tolist() == [1.0]


def test_trl_keywords_go_only_to_functions_that_take_them():
    def plain(prompts, completions, answer):  # no **kwargs: must not get completion_ids & co
        return [1.0] * len(completions)

    seen = {}

    def named(completions, trainer_state, **kw):
        seen["state"], seen["keys"] = trainer_state, set(kw)
        return [0.0] * len(completions)

    total, _ = score(rewards_of(plain, named), ["p"], ["c"], {"answer": ["a"]}, completion_ids=[[1]],
                     trainer_state="STATE", log_metric=print, log_extra=print)
    assert total.tolist() == [1.0]
    assert seen["state"] == "STATE"
    assert seen["keys"] == {"prompts", "answer", "completion_ids", "log_metric", "log_extra"}


# ---------------------------------------------------------------------------------------------
# In training: what the trainer actually passes.

@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a chat template over its characters: a user turn "1+2" becomes "1+2="."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    tok.save_pretrained(d)
    return str(d)


def test_training_calls_rewards_with_trls_contract(chat_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoTokenizer

    calls = []

    def spy(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, answer, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, ids=completion_ids,
                          step=trainer_state.global_step, max_steps=trainer_state.max_steps, epoch=trainer_state.epoch,
                          answer=answer, extra=set(kwargs)))
        log_metric("my_metric", 0.25 * (1 + trainer_state.global_step))
        log_extra("golden", list(answer))
        return [float(len(c[0]["content"])) for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}"}], "answer": str(a + b), "level": a % 3}
            for a in range(4) for b in range(3)]
    out = tmp_path / "run"
    train(dict(model=chat_model_dir, dataset=rows, output_dir=str(out), rewards=[spy], prompts_per_step=2,
               group_size=3, max_completion_length=4, max_steps=2, learning_rate=1e-3, samples_steps=1,
               num_samples=6, logging_steps=1), quiet=True)

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    first = calls[0]
    assert [c["step"] for c in calls] == [0, 1] and first["max_steps"] == 2 and first["epoch"] == 0.0
    assert calls[1]["epoch"] == pytest.approx(2 / 12)  # two of the twelve rows drawn before step 2
    assert first["extra"] == {"level"}  # every column but the prompt, and nothing of ours (_row)
    assert len(first["prompts"]) == 6 and first["prompts"][0] == first["prompts"][2]  # a group shares its prompt
    assert all(p[0]["role"] == "user" for p in first["prompts"])  # the row's messages, not the templated text
    for completion, ids in zip(first["completions"], first["ids"]):
        assert [m["role"] for m in completion] == ["assistant"]
        body = ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids
        assert completion[0]["content"] == tok.decode(body) and 1 <= len(ids) <= 4

    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/my_metric"] for m in metrics] == [0.25, 0.5]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("reward/my_metric")] == [0.25, 0.5]
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["extra"]["golden"] == calls[s["step"] - 1]["answer"][s["index"]] for s in samples)
    # Recorded under their qualified names, so train_config.json is still JSON.
    config = json.loads((out / "train_config.json").read_text())
    assert config["rewards"] == [f"python:{__name__}.test_training_calls_rewards_with_trls_contract.<locals>.spy"]
    assert config["dataset"] == "<12 rows given in Python>"


def test_a_list_of_python_functions_with_trl_weights(tiny_model_dir, addition_files, tmp_path):
    def first_digit_right(completions, answer, **kw):
        return [float(c[:1] == a[:1]) for c, a in zip(completions, answer)]

    cfg = build(TrainConfig, dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(tmp_path / "r"),
                                  reward_funcs=[first_digit_right, "answer_distance"], reward_weights=[2.0, 0.5],
                                  prompts_per_step=2, group_size=2, max_completion_length=3, max_steps=1))
    assert [r["weight"] for r in cfg.rewards] == [2.0, 0.5] and cfg.rewards[0]["function"] is first_digit_right
    train(cfg, quiet=True)
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["reward/mean"] == pytest.approx(2.0 * line["reward/first_digit_right/mean"]
                                                + 0.5 * line["reward/answer_distance/mean"], abs=1e-6)
