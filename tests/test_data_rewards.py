"""Datasets and rewards: formats, prompt formatting, built-in and user rewards, and their errors."""

import json

import pytest
import torch

from grpo.cli import main
from grpo.data import DataError, PromptSampler, format_prompt, load_rows, require_columns, tokenize_prompts
from grpo.rewards import (RewardError, RunningMoments, answer_distance, build_rewards, exact_answer,
                          load_function, score, think_format)
from grpo.recipes.tasks import build_char_tokenizer


def test_jsonl_csv_rows_remember_their_line(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4"}\n')
    rows = load_rows(j)
    assert [r["_line"] for r in rows] == [1, 3] and rows[1]["answer"] == "4"
    c = tmp_path / "d.csv"
    c.write_text("prompt,answer\n1+1=,2\n2+2=,4\n")
    assert [(r["prompt"], r["_line"]) for r in load_rows(c)] == [("1+1=", 2), ("2+2=", 3)]


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")  # optional extra: grpo[parquet]
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), path)
    assert load_rows(path)[0]["answer"] == "2"


@pytest.mark.parametrize("content, suffix, message", [
    ('{"prompt": "a"}\n{"prompt": \n', ".jsonl", "d.jsonl:2: not valid JSON"),
    ('[1, 2]\n', ".jsonl", "d.jsonl:1: expected a JSON object"),
    ("", ".jsonl", "has no rows"),
    ("x", ".txt", "unknown dataset format '.txt'"),
])
def test_bad_files_name_file_and_line(tmp_path, content, suffix, message):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert message in str(e.value)


def test_missing_column_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: missing column 'answer' \(the row has \['prompt'\]\)"):
        require_columns(load_rows(path), ["prompt", "answer"], path)


def test_format_prompt_plain_and_chat():
    tok = build_char_tokenizer()
    assert format_prompt(tok, "1+2=") == "1+2="
    with pytest.raises(DataError, match="no chat template"):
        format_prompt(tok, [{"role": "user", "content": "1+2="}])
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}={% endfor %}"
                         "{% if add_generation_prompt %}?{% endif %}")
    assert format_prompt(tok, [{"role": "user", "content": "1+2"}]) == "1+2=?"
    assert format_prompt(tok, "1+2") == "1+2"            # auto (TRL's rule): plain text is left as is
    assert format_prompt(tok, "1+2", "always") == "1+2=?"  # always: plain text becomes one user turn
    assert format_prompt(tok, "1+2", "never") == "1+2"


def test_tokenize_prompts_left_pads_and_keeps_the_end():
    tok = build_char_tokenizer()
    ids, mask = tokenize_prompts(tok, ["1+2=", "10+20="], max_length=5)
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert tok.decode(ids[1]) == "0+20="  # cut from the left
    assert ids[0, 0].item() == tok.pad_token_id


def test_prompt_sampler_epochs_and_state():
    s = PromptSampler(5, seed=3)
    first = s.next(7)
    assert sorted(first[:5]) == list(range(5))
    state = s.state_dict()
    rest = s.next(6)
    s2 = PromptSampler(5, seed=3)
    s2.load_state_dict(state)
    assert s2.next(6) == rest


def test_builtin_rewards_by_hand():
    assert exact_answer(None, [" 46", "45", "46 "], answer=["46", "46", 46]) == [1.0, 0.0, 1.0]
    assert answer_distance(None, ["44", "x", "46"], answer=["46", "46", "46"]) == [1 / 3, 0.0, 1.0]
    assert think_format(None, ["<think>a</think> <answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]


def test_weighted_sum_and_per_function_values():
    rewards = build_rewards([{"function": "exact_answer", "weight": 2.0}, "answer_distance"], torch.device("cpu"),
                            torch.float32)
    total, parts = score(rewards, ["p"] * 2, ["46", "44"], {"answer": ["46", "46"]})
    assert parts["exact_answer"].tolist() == [1.0, 0.0]
    assert torch.allclose(total, torch.tensor([2.0 + 1.0, 0.0 + 1 / 3]))


def test_user_reward_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "my_rewards.py"
    f.write_text("def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n")
    assert load_function(f"{f}:short")(["p"], ["abc"]) == [-3]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_function("my_rewards:short")(["p"], ["ab"]) == [-2]


@pytest.mark.parametrize("spec, message", [
    ("nope", "not a built-in"),
    ("missing_file.py:f", "file missing_file.py does not exist"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("grpo.rewards:no_such_fn", "has no function 'no_such_fn'"),
])
def test_unloadable_reward_functions(spec, message):
    with pytest.raises(RewardError) as e:
        load_function(spec)
    assert message in str(e.value) and spec in str(e.value)


@pytest.mark.parametrize("body, message", [
    ("return [1.0]", "returned 1 values; expected a list of 2 floats"),
    ("return None", "returned None"),
    ("return ['a', 'b']", "returned 'a' (str) for completion 0"),
    ("return [float('nan'), 0.0]", "NaN"),
    ("return [x for x in wrong_column]", "failed"),
])
def test_bad_reward_outputs_name_the_function(tmp_path, body, message):
    f = tmp_path / "r.py"
    f.write_text("def bad(prompts, completions, **kw):\n"
                 "    wrong_column = kw['nope'] if 'nope' in kw else None\n"
                 f"    {body}\n")
    rewards = build_rewards([f"{f}:bad"], torch.device("cpu"), torch.float32)
    with pytest.raises(RewardError) as e:
        score(rewards, ["a", "b"], ["x", "y"], {})
    assert "'bad'" in str(e.value) and message in str(e.value)


def test_running_moments_match_batch_statistics():
    m, xs = RunningMoments(), torch.randn(100) * 3 + 2
    for chunk in xs.split(7):
        m.update(chunk)
    assert abs(m.mean - xs.mean().item()) < 1e-5 and abs(m.std - xs.std(unbiased=False).item()) < 1e-5


def test_cli_reports_unimportable_reward_before_loading_any_model(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    rc = main(["train", "--set", "model=/does/not/exist", "--set", f"dataset={data}",
               "--set", "rewards=[{function: my_missing_mod:reward}]"])
    assert rc == 2
    assert "cannot import module 'my_missing_mod'" in capsys.readouterr().err


def test_cli_reports_missing_dataset_column(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    rc = main(["train", "--set", "model=/does/not/exist", "--set", f"dataset={data}",
               "--set", "rewards=[exact_answer]"])
    assert rc == 2
    assert "d.jsonl:1: missing column 'prompt'" in capsys.readouterr().err
