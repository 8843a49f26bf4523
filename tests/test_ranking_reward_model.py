"""Plackett-Luce reward models from rankings: ranking files (ties, bad rows by file:line),
make-preferences --rankings, training through the CLI, eval's Kendall's tau / top-1 /
correct-vs-wrong accuracy."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import single_thread
from grpo.cli import main
from grpo.data import DataError
from grpo.recipes.tasks import build_char_tokenizer
from grpo.rewards.preferences import TASKS
from grpo.rewards.rankings import (Ranking, kendall_tau_b, load_rankings, ranking_from_samples,
                                   ranking_metrics)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ranking_rows_with_ties_and_bad_rows_by_file_and_line(tmp_path):
    path = write(tmp_path / "r.jsonl", [
        {"prompt": "1+1=", "completions": ["2", ["3", "1"], "x"], "labels": [1, 0, 0, 0]},
        {"prompt": "1+2=", "completions": ["3"]},                        # line 2: one completion
        {"prompt": "1+3=", "completions": ["4", "5", "4"]},              # line 3: a duplicate
        {"prompt": "1+4=", "completions": [["5", "6"]]},                 # line 4: all tied
        {"prompt": "1+5=", "completions": ["6", 7]},                     # line 5: not a completion
        {"prompt": "1+6=", "completions": ["7", "8"], "labels": [1]},    # line 6: labels of the wrong length
    ])
    messages = []
    rankings = load_rankings(str(path), build_char_tokenizer(), log=messages.append)
    assert len(rankings) == 1
    r = rankings[0]
    assert r.completions == ["2", "3", "1", "x"] and r.tiers == [0, 1, 1, 2] and r.labels == [1.0, 0.0, 0.0, 0.0]
    assert messages[:5] == [
        f"skipping bad ranking row {path}:2: 'completions' holds 1 completion(s); a ranking needs at least 2",
        f"skipping bad ranking row {path}:3: 'completions' holds the completion '4' more than once",
        f"skipping bad ranking row {path}:4: 'completions': every completion is tied (the ranking says nothing)",
        f"skipping bad ranking row {path}:5: 'completions' entry 7 is neither a completion (text or chat messages) "
        f"nor a tie group (a list of completions)",
        f"skipping bad ranking row {path}:6: 'labels' must be a list of 2 numbers, one per completion in written "
        f"order"]


def test_a_file_with_no_usable_ranking_stops(tmp_path):
    path = write(tmp_path / "r.jsonl", [{"prompt": "1+1=", "completions": ["2"]}])
    with pytest.raises(DataError, match=rf"{path}: no usable rankings: all 1 rows are bad \(first: {path}:1: "):
        load_rankings(str(path), build_char_tokenizer(), log=lambda *a: None)


def test_kendall_tau_b_by_hand():
    assert kendall_tau_b([3, 2, 1], [3, 2, 1]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # x = (1, 2, 3, 4), y = (0, 0, 1, 1): C = 4, D = 0, ties only in y: 2 -> 4 / sqrt(6 * 4).
    assert kendall_tau_b([1, 2, 3, 4], [0, 0, 1, 1]) == pytest.approx(4 / 24 ** 0.5)
    assert kendall_tau_b([1, 1], [0, 1]) is None


def test_ranking_metrics_by_hand():
    r = Ranking("p", ["a", "b", "c"], [0, 1, 1], [1.0, 0.0, 0.0], "f:1")
    m = ranking_metrics([0.1, 0.5, 0.0], r)
    # The model puts b first (tier 1): top-1 wrong; pairs (a, b) wrong, (a, c) right.
    assert m["top1"] == 0.0 and m["pairs_right"] == 1.0 and m["pairs"] == 2 and m["cvw_right"] == 1.0
    assert m["kendall_tau"] == pytest.approx(kendall_tau_b([0.1, 0.5, 0.0], [0, -1, -1]))


def test_ranking_from_samples_by_verifier_and_distance():
    task = TASKS["addition"]
    samples = [" 5", "7", "5", "x", "3", "", "9", "6"]
    entries, labels = ranking_from_samples(samples, "5", task, 8, True, by="distance")
    # 5 right; 7 and 3 both 2 away (tied), 6 is 1 away, 9 is 4, x is no answer.
    assert entries == ["5", "6", ["7", "3"], "9", "x"] and labels == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # By the verifier alone: the wrong ones tied below the right one.
    entries, labels = ranking_from_samples(samples, "5", task, 8, True)
    assert entries == ["5", ["7", "x", "3", "9", "6"]] and labels == [1.0] + [0.0] * 5
    # Only K distinct kept; no right answer -> the reference on top.
    entries, labels = ranking_from_samples(["7", "8", "9"], "5", task, 2, True)
    assert entries == ["5", ["7", "8"]] and labels == [1.0, 0.0, 0.0]
    assert ranking_from_samples(["7", "7"], "5", task, 8, False) is None


@pytest.fixture(scope="session")
def trained_pl(tmp_path_factory, addition_files):
    """Rankings from an untrained tiny policy (make-preferences --rankings 4) and a Plackett-Luce
    reward model trained on them through the CLI."""
    from grpo.recipes.tasks import save_tiny_model

    with single_thread():
        d = tmp_path_factory.mktemp("pl")
        base = str(save_tiny_model(d / "base", hidden_size=64, num_layers=2, intermediate_size=256))
        for name, n in (("train", 300), ("heldout", 100)):
            assert main(["reward-model", "make-preferences", "--quiet", "--rankings", "4", "--set", f"model={base}",
                         "--set", f"dataset={addition_files[name]}", "--set", f"num_prompts={n}",
                         "--set", "samples_per_prompt=4", "--set", "max_completion_length=4",
                         "--set", f"output_file={d / name}.jsonl"]) == 0
        config = d / "rm.yaml"
        config.write_text(yaml.safe_dump(dict(
            model=base, dataset=str(d / "train.jsonl"), eval_dataset=str(d / "heldout.jsonl"),
            output_dir=str(d / "rm"), max_steps=100, batch_size=16, learning_rate=1e-3, eval_steps=50,
            logging_steps=25, max_length=16, seed=0)))
        assert main(["reward-model", "train", "--config", str(config), "--quiet"]) == 0
    return {"dir": d / "rm", "heldout": d / "heldout.jsonl"}


def test_make_preferences_writes_rankings(trained_pl):
    rows = [json.loads(line) for line in trained_pl["heldout"].read_text().splitlines()]
    assert rows and all(r["kind"] == "ranking" and len(r["labels"]) >= 2 for r in rows)
    first = rows[0]
    flat = [c for e in first["completions"] for c in (e if isinstance(e, list) else [e])]
    assert len(flat) == len(set(flat)) == len(first["labels"]) and first["labels"][0] == 1.0


def test_plackett_luce_reward_model_learns(trained_pl):
    summary = json.loads((trained_pl["dir"] / "summary.json").read_text())
    assert summary["loss"] == "plackett_luce"
    assert summary["eval_correct_vs_wrong_accuracy"] >= 0.9 and summary["eval_top1_accuracy"] >= 0.9, summary
    assert summary["eval_kendall_tau"] > 0.3, summary


def test_eval_reports_tau_top1_and_correct_vs_wrong(trained_pl, capsys, one_thread):
    assert main(["reward-model", "eval", "--set", f"model={trained_pl['dir']}",
                 "--set", f"dataset={trained_pl['heldout']}"]) == 0
    out = capsys.readouterr().out
    assert "Kendall's tau" in out and "top-1 accuracy" in out and "correct vs wrong" in out
