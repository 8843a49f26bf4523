"""The listwise judge: parsing rankings from fixed judge answers, the template, the judge as a
reward with a tiny local causal LM (unparsed answers counted and shown), and its config errors."""

from __future__ import annotations

import json

import pytest
import torch

from grpo.config import TrainConfig, build
from grpo.errors import ConfigError, RewardError
from grpo.rewards import build_rewards, score
from grpo.rewards.judge import DEFAULT_TEMPLATE, ListwiseJudge, check_template, parse_judge_ranking
from grpo.rewards.scoring import RewardLog
from grpo.train.loop import train

CPU = torch.device("cpu")


@pytest.mark.parametrize("answer, n, expected", [
    ("2 > 1 > 3", 3, [[1], [0], [2]]),
    ("2>1=3", 3, [[1], [0, 2]]),
    ("  [3] > [1] = [2] > [4].\nbecause 3 is right", 4, [[2], [0, 1], [3]]),
    ("\n\n1 = 2", 2, [[0, 1]]),
    ("1", 1, [[0]]),
])
def test_parses_rankings(answer, n, expected):
    assert parse_judge_ranking(answer, n) == expected


@pytest.mark.parametrize("answer, n", [
    ("2 > 1", 3),            # a candidate missing
    ("2 > 2 > 1", 2),        # one twice
    ("1 > 4 > 2", 3),        # out of range
    ("0 > 1", 2),            # numbered from 1
    ("2 > > 1", 2),          # two separators
    ("2 > 1 >", 2),          # ends on a separator
    ("2 1", 2),              # no separator
    ("candidate 2 is best", 2),
    ("", 2),
])
def test_refuses_what_is_not_a_ranking(answer, n):
    assert parse_judge_ranking(answer, n) is None


def test_the_template_is_checked_and_may_be_a_file(tmp_path):
    assert check_template("", "judge x") == DEFAULT_TEMPLATE
    path = tmp_path / "t.txt"
    path.write_text("Q: {prompt}\n{candidates}\nbest first:")
    assert check_template(str(path), "judge x") == path.read_text()
    with pytest.raises(RewardError, match=r"judge x: the judge template can only use \{prompt\}, \{candidates\} "
                                          r"and \{n\}.*KeyError: 'answer'"):
        check_template("{prompt} {answer} {candidates}", "judge x")
    with pytest.raises(RewardError, match=r"judge x: the judge template must contain \{candidates\}"):
        check_template("rank: {prompt}", "judge x")


def test_judge_with_a_tiny_model_counts_and_shows_what_it_cannot_parse(tiny_model_dir):
    # A random tiny model does not answer in rankings: every group is unparsed, None, counted.
    [reward] = build_rewards([{"judge": tiny_model_dir, "max_new_tokens": 4, "template": "{prompt}|{candidates}|"}],
                             CPU, torch.float32)
    judge = reward.fn
    assert isinstance(judge, ListwiseJudge) and reward.name.startswith("judge_")
    assert judge.judge_prompt("1+1=", ["2", " 3 "]) == "1+1=|[1] 2\n[2] 3|"
    log = RewardLog()
    verifier = build_rewards([{"function": "exact_answer", "weight": 0.0}], CPU, torch.float32)
    total, parts = score([reward, *verifier], ["1+1="] * 2 + ["2+2="] * 2, ["2", "3", "4", "5"],
                         {"answer": ["2", "2", "4", "4"]}, group_size=2, log_metric=log.log_metric,
                         log_extra=log.log_extra)
    answers = log.extra["judge_output"]
    assert len(answers) == 4 and answers[0] == answers[1] and answers[2] == answers[3]
    unparsed = [parse_judge_ranking(a, 2) is None for a in answers[::2]]
    assert log.means()["judge_unparsed_frac"] == sum(unparsed) / 2
    for g, bad in enumerate(unparsed):
        values = parts[reward.name][2 * g:2 * g + 2]
        assert bool(values.isnan().all()) if bad else sorted(values.tolist()) == [0.0, 1.0]
    assert total.tolist() == [0.0] * 4 or not all(unparsed)


def test_scores_of_parsed_answers_are_the_rankings():
    # The batched path's conversion, on fixed answers (no model): ranking -> [0, 1] scores, None -> None.
    judge = ListwiseJudge.__new__(ListwiseJudge)
    judge.judge = lambda prompts, groups: ([parse_judge_ranking(a, 3) for a in ("3 > 1 = 2", "no")], ["a", "b"])
    log = RewardLog()
    values = ListwiseJudge.__call__(judge, ["p"] * 6, list("abcdef"), group_size=3, log_metric=log.log_metric)
    assert values[:3] == [0.25, 0.25, 1.0] and values[3:] == [None] * 3
    assert log.means() == {"judge_unparsed_frac": 0.5}


def test_judge_config_errors():
    def build_with(entry):
        return build(TrainConfig, {"model": "m", "dataset": "d", "rewards": [entry]})

    with pytest.raises(ConfigError, match=r"give exactly one of 'function'.*'model'.*or 'judge'"):
        build_with({"judge": "dir", "model": "rm"})
    with pytest.raises(ConfigError, match=r"\['template'\] apply to judges \(\{judge: DIR\}\) only"):
        build_with({"function": "exact_answer", "template": "{candidates}"})
    with pytest.raises(ConfigError, match=r"normalize, clip and ensemble apply to reward models"):
        build_with({"judge": "dir", "normalize": True})
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.max_new_tokens: must be >= 1"):
        build_with({"judge": "dir", "max_new_tokens": 0})


def test_training_with_a_judge_logs_unparsed_and_samples(tiny_model_dir, addition_files, tmp_path):
    cfg = build(TrainConfig, dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(tmp_path / "r"),
                                  rewards=[{"judge": tiny_model_dir, "max_new_tokens": 3},
                                           {"function": "exact_answer", "weight": 0.0}],
                                  prompts_per_step=2, group_size=2, max_completion_length=3, max_steps=1,
                                  samples_steps=1, num_samples=2))
    train(cfg, quiet=True)
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line["reward/judge_unparsed_frac"] <= 1.0
    samples = [json.loads(s) for s in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert samples and all("judge_output" in s["extra"] for s in samples)
