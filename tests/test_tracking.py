"""RunLogger and the console progress display: plain lines without a terminal, a live status line on
one, quiet mode, samples.jsonl rows, resume truncation, TensorBoard events and W&B offline."""

import io
import json
import sys
import types

import torch

from grpo.observe.metrics import namespaced
from grpo.observe.progress import Progress, safe_text, samples_table
from grpo.train.rollout import Rollout
from grpo.observe.tracking import SAMPLE_FIELDS, RunLogger, pick_rows

RECORD = {"reward_mean": 0.5, "reward_std": 0.1, "rewards/exact_answer/mean": 0.25, "accuracy": 0.25,
          "kl": 0.01, "entropy": 2.0, "completion_length_mean": 3.5, "completion_length_max": 4.0,
          "zero_variance_frac": 0.5, "tokens_per_second": 120.0, "seconds_step": 0.5}


class Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self):
        return True


def record(step, **kw):
    return {"step": step, **RECORD, "elapsed": 2.0 * step, **kw}


def fake_rollout(P=2, G=4):
    N = P * G
    rewards = torch.arange(N, dtype=torch.float32) / N
    return Rollout(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1),
                   completion_ids=torch.zeros(N, 2, dtype=torch.long), completion_mask=torch.ones(N, 2),
                   truncated=torch.tensor([i % 2 == 0 for i in range(N)]), lengths=torch.full((N,), 2),
                   rewards=rewards, advantages=rewards - 0.5,
                   rewards_per_function={"exact_answer": (rewards > 0.5).float(), "answer_distance": rewards},
                   prompts=[f"{p}+{p}=" for p in range(P) for _ in range(G)],
                   completions=[f"{i}\nnext line" for i in range(N)])


def test_plain_lines_without_a_terminal(tmp_path):
    out = io.StringIO()  # what CI or nohup gives: not a tty
    logger = RunLogger(tmp_path, 3, config={"report_to": []}, stream=out)
    assert not logger.progress.live
    for step in (1, 2, 3):
        logger.log(record(step))
    logger.info("held-out after training: 0.5")
    logger.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("step 1/3") and "eta 0:00:04" in lines[0]
    for part in ("reward 0.500", "acc 0.250", "kl 0.0100", "len 3.5", "zero_var 0.50", "120 tok/s"):
        assert part in lines[1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_live_status_line_on_a_terminal(tmp_path):
    out = Terminal()
    logger = RunLogger(tmp_path, 4, config={"report_to": []}, stream=out)
    assert logger.progress.live
    logger.log(record(1))
    logger.info("a message")
    logger.log(record(2, eval_accuracy=0.75, eval_reward=0.8))
    logger.close()
    text = out.getvalue()
    assert "\r\x1b[2K" in text and "[#####---------------]" in text  # the bar at 1/4
    # Messages and eval results are printed on lines of their own, the status line redrawn below.
    assert "\r\x1b[2Ka message\nstep 1/4" in text
    assert "step 2: eval/reward 0.800  eval/accuracy 0.750\n" in text
    assert text.endswith("\n")


def test_quiet_prints_nothing_but_writes_files(tmp_path):
    out = io.StringIO()
    logger = RunLogger(tmp_path, 2, quiet=True, config={"report_to": [], "group_size": 4}, stream=out)
    logger.log(record(1))
    logger.samples(1, fake_rollout())
    logger.info("hello")
    logger.close()
    assert out.getvalue() == ""
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "samples.jsonl").exists()


def test_samples_rows_have_the_documented_fields_and_a_table_is_printed(tmp_path):
    out = io.StringIO()
    logger = RunLogger(tmp_path, 2, config={"report_to": [], "group_size": 4, "num_samples": 4}, stream=out)
    logger.samples(1, fake_rollout())
    logger.close()
    rows = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    # Spread over both groups: the first two completions of each.
    assert [r["index"] for r in rows] == [0, 1, 4, 5] and [r["group"] for r in rows] == [0, 0, 1, 1]
    for r in rows:
        assert set(r) == set(SAMPLE_FIELDS)
        assert set(r["rewards"]) == {"exact_answer", "answer_distance"}
        assert r["prompt"] == f"{r['group']}+{r['group']}=" and r["completion"].endswith("\nnext line")
        assert r["reward"] == r["index"] / 8 and r["advantage"] == r["index"] / 8 - 0.5
    table = out.getvalue()
    assert "samples at step 1" in table and "| completion" in table and "exact_answer" in table
    assert "0\\nnext line" in table  # newlines made visible, one table line per completion
    assert '| "' in table  # the repeated prompt of a group is not printed again
    assert all(len(line) <= 120 for line in table.splitlines())


def test_resume_keeps_rows_up_to_the_checkpoint_and_a_fresh_run_starts_anew(tmp_path):
    config = {"report_to": [], "group_size": 4, "num_samples": 2}
    logger = RunLogger(tmp_path, 4, quiet=True, config=config)
    for step in (1, 2, 3):
        logger.log(record(step))
        logger.samples(step, fake_rollout())
    logger.close()
    logger = RunLogger(tmp_path, 4, quiet=True, config=config, resume_step=2)
    logger.close()
    steps = lambda name: [json.loads(l)["step"] for l in (tmp_path / name).read_text().splitlines()]
    assert steps("metrics.jsonl") == [1, 2] and steps("samples.jsonl") == [1, 1, 2, 2]
    assert json.loads((tmp_path / "train_config.json").read_text()) == config
    RunLogger(tmp_path, 4, quiet=True, config=config).close()
    assert steps("metrics.jsonl") == [] and not (tmp_path / "samples.jsonl").exists()


def test_resume_after_a_last_line_cut_short_drops_only_that_line(tmp_path):
    # The disk filled while the last rows were written: both files end in the middle of a line.
    rows = [json.dumps(record(step)) for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "reward_me')
    (tmp_path / "samples.jsonl").write_bytes(b'{"step": 1, "prompt": "a"}\n{"step": 2, "prompt": "caf\xc3')
    logger = RunLogger(tmp_path, 5, quiet=True, config={"report_to": [], "group_size": 4, "num_samples": 2},
                       resume_step=3)
    logger.log(record(4))
    logger.samples(4, fake_rollout())
    logger.close()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(l)["step"] for l in metrics.splitlines()] == [1, 2, 3, 4] and metrics.endswith("\n")
    assert [json.loads(l)["step"] for l in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 4, 4]
    assert not list(tmp_path.glob("*.partial"))


def test_resume_keeps_every_line_it_cannot_read_but_the_cut_last_one(tmp_path):
    lines = [json.dumps(record(1)).encode(), b"null", b"garbage {", b"\xff not utf-8", b'{"no step": 1}',
             json.dumps(record(2)).encode(), b"[1, 2]", json.dumps(record(3)).encode(), b'{"step": "x"}',
             json.dumps(record(4)).encode()]
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n" + b'{"step": 5, "kl')
    RunLogger(tmp_path, 6, quiet=True, config={"report_to": []}, resume_step=2).close()
    # Rows after step 2 go (the resumed run writes them again), as does the cut last line; the
    # lines that are not rows with a step stay as they were, for the user to see.
    assert (tmp_path / "metrics.jsonl").read_bytes().split(b"\n") == lines[:7] + [lines[8], b""]


def test_resume_ends_a_whole_last_line_that_lacks_its_newline(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record(1)) + "\n" + json.dumps(record(2)))
    logger = RunLogger(tmp_path, 3, quiet=True, config={"report_to": []}, resume_step=2)
    logger.log(record(3))
    logger.close()
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_pick_rows_spreads_over_groups():
    assert pick_rows(8, 4, 3) == [0, 1, 4]
    assert pick_rows(8, 4, 100) == list(range(8))
    assert pick_rows(3, 1, 2) == [0, 1]


def test_tensorboard_events_hold_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, 2, quiet=True, config={"report_to": ["tensorboard"], "group_size": 4})
    logger.log(record(1))
    logger.log(record(2, eval_accuracy=0.5))
    logger.samples(2, fake_rollout())
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    expected = set(namespaced(record(1))) - {"step"} | {"eval/accuracy"}
    assert set(events.Tags()["scalars"]) == expected
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2]
    assert events.Scalars("eval/accuracy")[0].value == 0.5


def test_no_tensorboard_when_not_asked(tmp_path):
    RunLogger(tmp_path, 1, quiet=True, config={"report_to": []}).close()
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_offline_without_an_api_key(tmp_path, monkeypatch):
    calls = {"log": []}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, sorted(data)))

        def finish(self):
            calls["finished"] = True

    class FakeTable:
        def __init__(self, columns):
            self.columns, self.rows = columns, []

        def add_data(self, *row):
            self.rows.append(row)

    def init(**kw):
        calls["init"] = kw
        calls["mode"] = __import__("os").environ.get("WANDB_MODE")
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Table=FakeTable))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    logger = RunLogger(tmp_path / "run", 2, quiet=True,
                       config={"report_to": ["wandb"], "wandb_project": "proj", "group_size": 4})
    logger.log(record(1))
    logger.samples(1, fake_rollout())
    logger.close()
    assert calls["mode"] == "offline"
    assert calls["init"]["project"] == "proj" and calls["init"]["dir"] == str(tmp_path / "run")
    assert calls["log"][0] == (1, sorted(k for k in namespaced(record(1)) if k != "step"))
    assert calls["log"][1] == (1, ["samples"]) and calls["finished"]


def test_console_text_is_one_line_and_ascii_safe():
    ascii_stream = types.SimpleNamespace(encoding="ascii")
    assert safe_text("a\nb\tc\x07", ascii_stream) == "a\\nb c\\x07"
    assert safe_text("caf\u00e9", ascii_stream) == "caf\\xe9"
    assert safe_text("caf\u00e9", types.SimpleNamespace(encoding="utf-8")) == "caf\u00e9"
    rows = [{"index": 0, "prompt": "x" * 300, "completion": "y" * 300, "reward": 1.0, "advantage": 0.5,
             "rewards": {"r": 1.0}}]
    table = samples_table(3, rows, ascii_stream, width=100)
    assert all(len(line) <= 100 for line in table.splitlines()) and "..." in table


def test_eta_counts_only_this_process_steps_after_a_resume():
    p = Progress(10, start_step=5, stream=io.StringIO(), live=False)
    # 2 steps in 4 s since the resume: 2 s per step, 3 steps left.
    assert "eta 0:00:06" in p.step_line({"step": 7, "time/elapsed": 4.0})
