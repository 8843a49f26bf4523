"""The seed pipeline end to end at toy size, and the preference-pair maker."""

import json
import random

import pytest

from conftest import single_thread
from grpo.recipes.preferences import TASKS, pairs_for_prompt


def test_pairs_for_prompt_correct_and_closer():
    rng = random.Random(0)
    pairs = pairs_for_prompt(["46", " 46", "47", "50", "", "x"], "46", TASKS["addition"], rng,
                             correct_pairs=5, closer_pairs=5, use_reference=True)
    correct = [p for p in pairs if p["kind"] == "correct"]
    closer = [p for p in pairs if p["kind"] == "closer"]
    assert {p["chosen"] for p in correct} == {"46"} and {p["rejected"] for p in correct} == {"47", "50", "x"}
    # every closer pair's chosen is nearer to 46 than its rejected ("x" has no number: farthest)
    assert closer and all(p["chosen"] != p["rejected"] for p in closer)
    dist = TASKS["addition"].distance
    assert all(dist(p["chosen"], "46") < dist(p["rejected"], "46") for p in closer)


def test_reference_answer_stands_in_when_no_sample_is_right():
    rng = random.Random(0)
    assert {p["chosen"] for p in pairs_for_prompt(["1", "2"], "3", TASKS["addition"], rng, 2, 0, True)} == {"3"}
    assert pairs_for_prompt(["1", "2"], "3", TASKS["addition"], rng, 2, 0, False) == []


def test_seed_pipeline_end_to_end(tmp_path):
    from grpo.recipes.pipeline import run_seed_pipeline

    out = tmp_path / "seed"
    with single_thread():
        summary = run_seed_pipeline(
            str(out), quiet=True, sft_overrides=dict(max_steps=10, logging_steps=5),
            preference_overrides=dict(samples_per_prompt=4, max_completion_length=4),
            rm_overrides=dict(max_steps=5, eval_steps=5, logging_steps=5),
            grpo_overrides=dict(max_steps=2, prompts_per_step=2, group_size=4, max_completion_length=4,
                                eval_steps=0, eval_max_prompts=8, logging_steps=1, report_to=[]),
            preference_prompts=40, heldout_preference_prompts=10, zero_variance_prompts=4)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert 0 <= summary["reward_model"]["heldout_pairwise_accuracy"] <= 1
    assert set(summary["variants"]) == {"beam", "sample"}
    for name, v in summary["variants"].items():
        assert 0 <= v["accuracy_before"] <= 1 and 0 <= v["accuracy_after"] <= 1
        assert 0 <= v["zero_variance_frac_true_reward_at_start"] <= 1
        # the reward-model score and the true accuracy, side by side at every step
        assert [s["step"] for s in v["per_step"]] == [1, 2]
        assert all(s["rm_score"] is not None and s["accuracy"] is not None for s in v["per_step"])
        assert (out / name / "metrics.jsonl").exists()
    assert (out / "reward_model" / "config.json").exists()


def test_seed_pipeline_on_ranking_feedback(tmp_path):
    from grpo.recipes.pipeline import run_seed_pipeline

    out = tmp_path / "seed"
    with single_thread():
        summary = run_seed_pipeline(
            str(out), quiet=True, feedback="ranking", sft_overrides=dict(max_steps=10, logging_steps=5),
            preference_overrides=dict(samples_per_prompt=4, max_completion_length=4),
            rm_overrides=dict(max_steps=5, eval_steps=5, logging_steps=5),
            grpo_overrides=dict(max_steps=2, prompts_per_step=2, group_size=4, max_completion_length=4,
                                eval_steps=0, eval_max_prompts=8, logging_steps=1, report_to=[]),
            preference_prompts=40, heldout_preference_prompts=10, zero_variance_prompts=4, generations=("sample",))
    assert summary["feedback"] == "ranking" and summary["reward_model"]["kind"].endswith("rankings (PL)")
    rows = [json.loads(line) for line in (out / "data" / "preferences_train.jsonl").read_text().splitlines()]
    assert rows and all(r["kind"] == "ranking" for r in rows)
    assert json.loads((out / "reward_model" / "summary.json").read_text())["loss"] == "plackett_luce"
    assert -1 <= summary["reward_model"]["heldout_kendall_tau"] <= 1
    assert 0 <= summary["variants"]["sample"]["accuracy_after"] <= 1


def test_seed_pipeline_refuses_sft_overrides_for_a_warm_start_made_before(addition_warm_start, tmp_path):
    from grpo.recipes.pipeline import run_seed_pipeline

    with pytest.raises(ValueError, match="run_seed_pipeline: sft_overrides"):
        run_seed_pipeline(str(tmp_path / "seed"), quiet=True, warm=addition_warm_start,
                          sft_overrides={"max_steps": 1})
    assert not (tmp_path / "seed").exists()
