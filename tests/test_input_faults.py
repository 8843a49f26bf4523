"""Bad inputs that once ended in a traceback, a prompt, or silent damage: each is now one input
error (DataError naming file and line, ModelError naming the path) or a documented behaviour.

Data: over-long CSV fields, corrupt Parquet, JSON nested too deeply, prompts over
max_prompt_length. Models: trust_remote_code, broken safetensors, pickled weights, tokenizers
without EOS or pad. Generation: every EOS the model's generation_config lists stops a completion.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from grpo.cli import main
from grpo.data import DataError, check_prompts, load_rows, load_source, prompt_batch
from grpo.errors import ModelError
from grpo.recipes.tasks import build_char_tokenizer


def deep_json(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


# ----------------------------------------------------------------------------------------------
# Data

def test_csv_field_over_the_csv_modules_limit_is_read_whole(tmp_path):
    """The csv module refuses fields over 128 Ki characters by default; a long document is a fair
    prompt, and the file is in memory anyway, so the reader allows a field as long as the file."""
    import csv

    long = "x" * (csv.field_size_limit() + 10)
    path = tmp_path / "d.csv"
    path.write_text(f'prompt,answer\n1+1=,2\n"{long}",4\n3+3=,6\n')
    rows = load_rows(path)
    assert [(len(r["prompt"]), r["answer"], r["_line"]) for r in rows] == [(4, "2", 2), (len(long), "4", 3),
                                                                           (4, "6", 4)]
    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was


def test_csv_quote_never_closed_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,answer\n1+1=,2\n"2+2=,4\n3+3=,6\n')
    with pytest.raises(DataError, match=r"d.csv:3: not valid CSV \(a quoted field opened in this row is never "
                                        r"closed"):
        load_rows(path)
    # Quotes that are closed, doubled quotes and a quoted newline are fine.
    path.write_text('prompt,answer\n"say ""hi""",2\n"two\nlines",4\n')
    assert [(r["prompt"], r["_line"]) for r in load_rows(path)] == [('say "hi"', 2), ("two\nlines", 3)]


@pytest.mark.parametrize("content", [b"", b"PAR1", b"PAR1 not parquet at all PAR1", b"plain text\n"])
def test_corrupt_parquet_is_one_data_error_naming_the_file(tmp_path, content):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file") as e:
        load_source(path)
    assert "\n" not in str(e.value)


def test_truncated_parquet_is_one_data_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.pq"
    pq.write_table(pa.table({"prompt": [f"{i}+{i}=" for i in range(200)]}), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"d.pq: not a readable Parquet file"):
            load_rows(path)


def test_json_nested_too_deeply_names_file_and_line(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "a"}\n' + deep_json(100_000) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: the JSON is nested too deeply"):
        load_source(jsonl)
    # A .json whose first line is such an object is read as JSON lines, so it gets its line too.
    one_line = tmp_path / "d.json"
    one_line.write_text(deep_json(100_000) + "\n")
    with pytest.raises(DataError, match=r"d.json:1: the JSON is nested too deeply"):
        load_source(one_line)
    # Nesting a parser can read is data like any other.
    jsonl.write_text('{"prompt": "a", "x": ' + deep_json(50) + "}\n")
    assert load_source(jsonl).rows[0]["prompt"] == "a"


def test_json_array_nested_too_deeply_names_the_file_and_the_reason(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.json"
    path.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(DataError) as e:
        load_source(path)
    message = str(e.value)
    assert message.startswith(f"{path}: the datasets library cannot read it") and "\n" not in message
    assert "depth" in message or "Recursion" in message  # the reader's own reason, not only the wrapper's


def test_rows_from_python_nested_too_deeply_name_the_row():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(DataError, match=r"dataset \(a Python list\) row 2: the row's values are nested too deeply"):
        load_source([{"prompt": "a"}, {"prompt": "b", "x": deep}])


def test_cli_reports_a_bad_data_file_in_one_line(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 truncated")
    sets = {"model": tiny_model_dir, "dataset": str(bad), "output_dir": str(tmp_path / "o"), "max_steps": 1,
            "rewards": "[exact_answer]"}
    assert main(["train", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]) == 2
    err = capsys.readouterr().err.strip()
    assert "d.parquet: not a readable Parquet file" in err and len(err.splitlines()) == 1


def test_prompts_over_max_prompt_length_are_counted_and_reported_once(tmp_path, capsys):
    """Truncation is kept (max_prompt_length keeps a prompt's end, as TRL's does), and check_prompts
    tells the user how many prompts lose their start, naming the first."""
    tok = build_char_tokenizer()
    rows = [{"prompt": "1+1=", "_line": 1}, {"prompt": "12345+678=", "_line": 2}, {"prompt": "2+2=", "_line": 3},
            {"prompt": "99999+99999=", "_line": 4}]
    said = []
    assert check_prompts(tok, rows, "prompt", "d.jsonl", "auto", max_length=8, say=said.append) == 2
    assert len(said) == 1
    assert said[0].startswith("d.jsonl:2: prompt: the prompt is 10 tokens, over max_prompt_length=8; 2 of 4 "
                              "prompts of d.jsonl are longer")
    assert "raise max_prompt_length or filter the data" in said[0]
    # Without a `say`, one line on stderr; nothing at all when every prompt fits or no limit is given.
    check_prompts(tok, rows, "prompt", "d.jsonl", "auto", max_length=8)
    assert capsys.readouterr().err.count("grpo: warning: d.jsonl:2:") == 1
    assert check_prompts(tok, rows, "prompt", "d.jsonl", "auto", max_length=12) == 0
    assert check_prompts(tok, rows, "prompt", "d.jsonl", "auto") == 0
    assert capsys.readouterr().err == ""
    # What the run then feeds the model: the last max_prompt_length tokens, as counted above.
    texts, ids, mask = prompt_batch(tok, [r["prompt"] for r in rows], 8)
    assert tok.decode(ids[1][mask[1].bool()]) == "345+678="
    assert int(mask.sum(-1).max()) == 8


def test_templated_prompts_are_counted_with_their_template(tmp_path):
    """The count is of the tokens the policy would see, the chat template's included."""
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    rows = [{"prompt": [{"role": "system", "content": "000"}, {"role": "user", "content": "1+1="}], "_row": 1}]
    said = []
    assert check_prompts(tok, rows, "prompt", "ds", "auto", max_length=10, say=said.append) == 1  # 11 tokens
    assert said[0].startswith("ds row 1: prompt: the prompt is 11 tokens, over max_prompt_length=10")
    assert check_prompts(tok, rows, "prompt", "ds", "auto", max_length=11, say=said.append) == 0
