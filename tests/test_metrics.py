"""Metric names: every number a run logs sits under one of five namespaces, and files written with
the flat names that came before still load in `grpo report`."""

import json

import pytest

from grpo.observe.metrics import NAMESPACES, SUPERVISED, logged_name, namespaced, plain_name, upgrade
from grpo.observe.report import load_run
from grpo.train.update import with_logged_metrics

# A step's record with the plain names the trainer builds it from, and the names it is logged under.
PLAIN_TO_LOGGED = {
    "step": "step", "loss": "loss/total", "policy_loss": "loss/policy", "kl": "loss/kl", "entropy": "loss/entropy",
    "clip_frac_low": "loss/clip_frac_low", "grad_norm": "loss/grad_norm", "lr": "loss/lr",
    "reward_mean": "reward/mean", "reward_std": "reward/std", "accuracy": "reward/accuracy",
    "reward_kl": "reward/kl", "rewards/exact_answer/mean": "reward/exact_answer/mean",
    "iterative/rm_loss": "reward/iterative/rm_loss",
    "completion_length_mean": "rollout/completion_length_mean", "truncated_frac": "rollout/truncated_frac",
    "zero_variance_frac": "rollout/zero_variance_frac", "dynamic_sampling/rounds": "rollout/dynamic_sampling/rounds",
    "agent/turns": "rollout/agent/turns",
    "eval_accuracy": "eval/accuracy", "eval_reward": "eval/reward",
    "seconds_generate": "time/generate", "seconds_update": "time/update", "seconds_step": "time/step",
    "tokens_per_second": "time/tokens_per_second", "elapsed": "time/elapsed",
}


def test_each_plain_name_has_its_logged_name():
    for plain, logged in PLAIN_TO_LOGGED.items():
        assert logged_name(plain) == logged, plain
    assert list(namespaced(dict.fromkeys(PLAIN_TO_LOGGED, 1.0))) == list(PLAIN_TO_LOGGED.values())


def test_every_logged_name_is_in_a_namespace():
    for logged in PLAIN_TO_LOGGED.values():
        assert logged == "step" or logged.split("/")[0] in NAMESPACES, logged


def test_a_name_already_namespaced_is_kept():
    for name in ("rollout/vllm_logprob_diff_mean", "reward/judge_unparsed_frac", "time/tools", "eval/kendall_tau"):
        assert logged_name(name) == name


def test_supervised_commands_log_their_batch_accuracy_as_a_loss_term():
    assert namespaced({"step": 3, "loss": 0.5, "accuracy": 0.75, "margin": 1.0, "eval_accuracy": 0.7, "lr": 1e-4},
                      SUPERVISED) == {"step": 3, "loss/total": 0.5, "loss/accuracy": 0.75, "loss/margin": 1.0,
                                      "eval/accuracy": 0.7, "loss/lr": 1e-4}


def test_upgrade_reads_an_old_row_and_leaves_a_new_one():
    old = {"step": 2, "reward_mean": 0.5, "eval_accuracy": 0.25, "seconds_step": 1.5, "rewards/f/mean": 0.5}
    assert upgrade(old) == {"step": 2, "reward/mean": 0.5, "eval/accuracy": 0.25, "time/step": 1.5,
                            "reward/f/mean": 0.5}
    new = {"step": 2, "reward/mean": 0.5, "my_column": 1.0}
    assert upgrade(new) is new


def test_metric_for_best_model_takes_either_spelling():
    assert plain_name("eval/accuracy") == "eval_accuracy"
    assert plain_name("eval_reward") == "eval_reward"


def test_what_reward_functions_log_lands_under_reward():
    record = {"step": 1, "reward_mean": 0.5}
    out = with_logged_metrics(record, {"format_ok": 0.9, "mean": 0.1})
    # `mean` would collide with the trainer's own reward/mean.
    assert out["reward/format_ok"] == 0.9 and out["reward/logged/mean"] == 0.1
    assert set(namespaced(out)) == {"step", "reward/mean", "reward/format_ok", "reward/logged/mean"}


@pytest.mark.parametrize("style", ["flat", "namespaced"])
def test_report_loads_old_and_new_metrics_files_alike(tmp_path, style):
    plain = [{"step": 0, "eval_accuracy": 0.2, "eval_reward": 0.2, "elapsed": 0.0},
             {"step": 1, "reward_mean": 0.3, "accuracy": 0.3, "kl": 0.01, "rewards/exact_answer/mean": 0.3,
              "seconds_step": 2.0, "seconds_generate": 1.0, "elapsed": 2.0},
             {"step": 2, "reward_mean": 0.5, "accuracy": 0.5, "kl": 0.02, "rewards/exact_answer/mean": 0.5,
              "seconds_step": 2.0, "seconds_generate": 1.0, "eval_accuracy": 0.4, "elapsed": 4.0}]
    rows = plain if style == "flat" else [namespaced(r) for r in plain]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(tmp_path, "run")
    assert [r["reward/mean"] for r in run.metrics[1:]] == [0.3, 0.5]
    assert [r.get("eval/accuracy") for r in run.metrics] == [0.2, None, 0.4]
    assert [r["wall_clock"] for r in run.metrics] == [0.0, 2.0, 4.0]
    assert run.metrics[2]["reward/exact_answer/mean"] == 0.5 and run.metrics[2]["time/generate"] == 1.0
