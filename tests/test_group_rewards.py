"""Group rewards (grpo.rewards.groups): called once per group with the prompt, its G completions
and the row's columns; G scores or a ranking with ties; mixed with per-completion rewards by
weight; async groups concurrent; timeouts and errors naming the function; training from YAML-like
specs and from Python."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from grpo.config import TrainConfig, build
from grpo.errors import ConfigError, RewardError
from grpo.rewards import build_rewards, score
from grpo.rewards.scoring import check_signatures
from grpo.train.loop import train

CPU = torch.device("cpu")


def rewards_of(*entries):
    return build_rewards(list(entries), CPU, torch.float32)


def longest_first(prompt, completions, answer):
    """A ranking: the longest completion best; equal lengths tie."""
    lengths = sorted({len(c) for c in completions}, reverse=True)
    return [[i for i, c in enumerate(completions) if len(c) == n] for n in lengths]


def test_called_once_per_group_with_the_rows_values():
    calls = []

    def judge(prompt, completions, answer, completion_ids):
        calls.append((prompt, list(completions), answer, completion_ids))
        return [float(c == answer) for c in completions]

    total, parts = score(rewards_of(judge), ["p", "p", "q", "q"], ["1", "2", "3", "3"],
                         {"answer": ["1", "1", "3", "3"]}, completion_ids=[[1], [2], [3], [4]], group_size=2)
    assert calls == [("p", ["1", "2"], "1", [[1], [2]]), ("q", ["3", "3"], "3", [[3], [4]])]
    assert total.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_a_ranking_with_ties_becomes_mean_rank_scores():
    # Lengths (1, 3, 2, 3): the two 3s share places 0 and 1 (score 1 - 0.5 / 3), then 2, then 1.
    _, parts = score(rewards_of(longest_first), ["p"] * 4, ["a", "ccc", "bb", "ddd"], {"answer": ["x"] * 4},
                     group_size=4)
    assert parts["longest_first"].tolist() == pytest.approx([0.0, 1 - 0.5 / 3, 1 - 2 / 3, 1 - 0.5 / 3])


def test_mixes_with_per_completion_rewards_by_weight():
    def exact(prompts, completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer)]

    total, parts = score(rewards_of({"function": longest_first, "weight": 0.5}, exact), ["p"] * 2, ["12", "3"],
                         {"answer": ["3", "3"]}, group_size=2)
    assert parts["longest_first"].tolist() == [1.0, 0.0] and parts["exact"].tolist() == [0.0, 1.0]
    assert total.tolist() == [0.5, 1.0]


def test_declared_per_group_or_recognised_by_signature():
    def ranks(p, completions, **kw):  # first parameter not named `prompt`: declared instead
        return [[1], [0]]

    total, _ = score(rewards_of({"function": ranks, "per": "group"}), ["x", "x"], ["a", "b"], {}, group_size=2)
    assert total.tolist() == [0.0, 1.0]
    assert getattr(rewards_of(longest_first)[0].fn, "per_group", False)

    def per_completion(prompts, completions, **kw):
        return [1.0] * len(completions)

    assert not getattr(rewards_of(per_completion)[0].fn, "per_group", False)


def test_from_a_file(tmp_path):
    (tmp_path / "judge.py").write_text("def rank_group(prompt, completions, **row):\n"
                                       "    return [[i] for i in sorted(range(len(completions)), "
                                       "key=lambda i: completions[i])]\n")
    r = rewards_of({"function": f"{tmp_path / 'judge.py'}:rank_group", "per": "group"})
    assert score(r, ["p"] * 3, ["b", "a", "c"], {}, group_size=3)[0].tolist() == [0.5, 1.0, 0.0]


def test_none_means_the_group_is_not_scored():
    def sometimes(prompt, completions):
        return None if prompt == "skip" else [1.0, 0.0]

    def base(prompts, completions, **_):
        return [0.25] * len(completions)

    total, parts = score(rewards_of(sometimes, base), ["skip", "skip", "p", "p"], ["a", "b", "c", "d"], {},
                         group_size=2)
    assert torch.isnan(parts["sometimes"][:2]).all() and parts["sometimes"][2:].tolist() == [1.0, 0.0]
    assert total.tolist() == [0.25, 0.25, 1.25, 0.25]


@pytest.mark.parametrize("value, match", [
    ([[0], [0]], r"reward 'bad' returned a ranking for group 0 that does not place each of its 2 completions "
                 r"exactly once \(missing \[1\], repeated \[0\]\)"),
    ([[0], [5]], r"reward 'bad' returned a ranking for group 0 holding 5; expected completion indices 0..1"),
    ([1.0, 2.0, 3.0], r"reward 'bad' returned 3 scores for group 0; expected 2"),
    ("first", r"reward 'bad' returned a str \(first\) for group 0"),
])
def test_bad_returns_name_the_function_and_the_group(value, match):
    def bad(prompt, completions):
        return value

    with pytest.raises(RewardError, match=match):
        score(rewards_of(bad), ["p", "p"], ["a", "b"], {}, group_size=2)


def test_async_groups_run_concurrently_and_time_out_by_name():
    # Group 0 waits for group 1's signal: one after the other it would never return.
    event = {}

    async def judge(prompt, completions):
        e = event.setdefault("e", asyncio.Event())
        if prompt == "first":
            await e.wait()
        else:
            e.set()
        return [1.0, 0.0]

    assert score(rewards_of(judge), ["first", "first", "second", "second"], list("abcd"), {}, timeout=20,
                 group_size=2)[0].tolist() == [1.0, 0.0, 1.0, 0.0]

    async def slow(prompt, completions):
        await asyncio.sleep(3600)

    with pytest.raises(RewardError, match=r"reward 'slow' did not return within reward_timeout=0.2"):
        score(rewards_of(slow), ["p", "p"], ["a", "b"], {}, timeout=0.2, group_size=2)


def test_errors_name_the_function_and_its_line():
    def broken(prompt, completions):
        raise ValueError("no judge today")

    with pytest.raises(RewardError, match=r"reward 'broken' failed: ValueError: no judge today \(at .*"
                                          r"test_group_rewards.py:\d+, in broken\)"):
        score(rewards_of(broken), ["p", "p"], ["a", "b"], {}, group_size=2)


def test_signature_checked_against_the_columns():
    def needs_label(prompt, completions, label):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward 'needs_label'.*cannot be called as fn\(prompt, completions, "
                                          r"\*\*row columns\) once per group"):
        check_signatures(rewards_of(needs_label), ["answer"])
    check_signatures(rewards_of(needs_label), ["label"])


def test_per_is_checked():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.per: 'row' is not one of completion, group"):
        build(TrainConfig, {"model": "m", "dataset": "d", "rewards": [{"function": "exact_answer", "per": "row"}]})


def test_training_with_a_group_reward_from_python(tiny_model_dir, addition_files, tmp_path):
    seen = []

    def closest_first(prompt, completions, answer, **row):
        seen.append(len(completions))
        distance = [abs(len(c) - len(answer)) for c in completions]
        return [[i for i, d in enumerate(distance) if d == v] for v in sorted(set(distance))]

    cfg = build(TrainConfig, dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(tmp_path / "r"),
                                  rewards=[closest_first, {"function": "exact_answer", "weight": 0.0}],
                                  advantage_estimator="rank", prompts_per_step=2, group_size=3,
                                  max_completion_length=3, max_steps=2))
    train(cfg, quiet=True)
    assert seen and set(seen) == {3}
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line["reward/closest_first/mean"] <= 1.0
