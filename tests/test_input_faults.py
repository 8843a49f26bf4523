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
    assert "d.parquet: not a readable Parquet file" in err
    assert len([l for l in err.splitlines() if l.startswith("grpo")]) == 1 and "Traceback" not in err


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


# ----------------------------------------------------------------------------------------------
# Models and tokenizers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from grpo.recipes.tasks import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("small") / "model", hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64)


def copy_model(small_model_dir, tmp_path, name="model"):
    return shutil.copytree(small_model_dir, tmp_path / name)


CUSTOM_CONFIG = ("from transformers import LlamaConfig\n\n"
                 "class CustomConfig(LlamaConfig):\n    model_type = 'grpo_custom_llama'\n")
CUSTOM_MODEL = ("from transformers import LlamaForCausalLM\nfrom .configuration_custom import CustomConfig\n\n"
                "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")


def with_custom_code(directory):
    """A model directory whose config.json's auto_map names classes defined in files beside it."""
    (directory / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (directory / "modeling_custom.py").write_text(CUSTOM_MODEL)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="grpo_custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_remote_code_is_refused_without_trust_and_never_asked(small_model_dir, tmp_path, monkeypatch):
    """trust_remote_code reaches the config, the tokenizer and the model, always as a bool: without
    it, one ModelError says how to allow the code, and Hugging Face's [y/N] prompt never shows."""
    from grpo.engine.models import check_model_source, load_causal_lm

    model = with_custom_code(copy_model(small_model_dir, tmp_path, "custom_refused"))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("Hugging Face asked on the terminal"))
    message = r"custom_refused: its (config|model) needs Python code shipped with the model.*trust_remote_code: true"
    with pytest.raises(ModelError, match=message):
        check_model_source(str(model))
    with pytest.raises(ModelError, match=message):
        load_causal_lm(str(model), CPU, torch.float32)
    with pytest.raises(ModelError, match=message):
        load_causal_lm(str(model), CPU, torch.float32, model_init_kwargs={"trust_remote_code": False})
    from grpo.errors import ConfigError
    with pytest.raises(ConfigError, match="trust_remote_code: expected true or false, got 'yes'"):
        load_causal_lm(str(model), CPU, torch.float32, model_init_kwargs={"trust_remote_code": "yes"})


def test_remote_code_loads_with_trust(small_model_dir, tmp_path):
    """In a process of its own, stdin closed, with Hugging Face's module cache in tmp_path (the
    trusted code is copied there and imported)."""
    model = with_custom_code(copy_model(small_model_dir, tmp_path, "custom_trusted"))
    script = f"""
import json, torch
from grpo.engine.models import check_model_source, load_causal_lm, load_tokenizer, trusts_remote_code
from grpo.errors import ModelError
path, trust = {str(model)!r}, trusts_remote_code({{"trust_remote_code": True}})
out = {{"config": type(check_model_source(path, trust_remote_code=trust)).__name__,
        "tokenizer": load_tokenizer(path, trust_remote_code=trust).eos_token,
        "model": type(load_causal_lm(path, torch.device("cpu"), torch.float32,
                                     model_init_kwargs={{"trust_remote_code": True}})).__name__}}
try:
    check_model_source(path)
except ModelError as e:
    out["untrusted"] = str(e)
print(json.dumps(out))
"""
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["config"] == "CustomConfig" and out["model"] == "CustomForCausalLM" and out["tokenizer"] == "<eos>"
    assert "needs Python code shipped with the model" in out["untrusted"]


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b"", "it is empty"),
    (lambda b: b[:5], "too short for even the header's length"),
    (lambda b: b[:40], "its header claims"),
    (lambda b: b[: len(b) // 2], "its tensors need"),
    (lambda b: b[:-1], "its tensors need"),
    (lambda b: b[:8] + b"\xff" * (len(b) - 8), "its header is not JSON"),
])
def test_broken_safetensors_is_one_model_error_naming_the_file(small_model_dir, tmp_path, damage, problem):
    from grpo.engine.models import check_model_source, load_causal_lm

    model = copy_model(small_model_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    expected = rf"model: {weights} is not a valid safetensors file: .*{problem}.*probably truncated"
    with pytest.raises(ModelError, match=expected):
        check_model_source(str(model))  # before anything heavy loads
    with pytest.raises(ModelError, match=expected):
        load_causal_lm(str(model), CPU, torch.float32)


def test_whole_safetensors_pass_the_check(small_model_dir):
    from grpo.engine.models import check_weight_files

    check_weight_files(small_model_dir)


class WritesAFile:
    """A pickle that, unpickled by plain `pickle`, would create a file."""
    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


def pickled_model(small_model_dir, tmp_path, payload=None):
    from safetensors.torch import load_file

    model = copy_model(small_model_dir, tmp_path)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state if payload is None else {**state, "extra": payload}, model / "pytorch_model.bin")
    return model


def test_pickled_weights_load_only_through_the_safe_unpickler(small_model_dir, tmp_path):
    from grpo.engine.models import load_causal_lm

    # Plain tensors: torch's weights_only unpickler rebuilds them, and the model loads.
    model = pickled_model(small_model_dir, tmp_path / "plain")
    loaded = load_causal_lm(str(model), CPU, torch.float32)
    assert isinstance(loaded, torch.nn.Module)

    # A pickle whose __reduce__ would create a file (plain pickle does create it): refused, named,
    # and its code never runs.
    import pickle
    WritesAFile.target = str(tmp_path / "plain_pickle_ran_it")
    pickle.loads(pickle.dumps(WritesAFile())).close()
    assert (tmp_path / "plain_pickle_ran_it").exists()
    target = tmp_path / "created_by_the_pickle"
    WritesAFile.target = str(target)
    evil = pickled_model(small_model_dir, tmp_path / "evil", payload=WritesAFile())
    with pytest.raises(ModelError, match=rf"model: {evil / 'pytorch_model.bin'} holds pickled weights that torch's "
                                         r"safe unpickler \(weights_only=True\) refuses.*convert it to safetensors"):
        load_causal_lm(str(evil), CPU, torch.float32)
    assert not target.exists()

    # Asking for the unsafe unpickler is refused before anything is read.
    from grpo.errors import ConfigError
    with pytest.raises(ConfigError, match="weights_only"):
        load_causal_lm(str(evil), CPU, torch.float32, model_init_kwargs={"weights_only": False})
    assert not target.exists()


def tokenizer_without(directory, *, eos: bool, pad: bool):
    """A character tokenizer saved in `directory` with or without EOS and pad tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from grpo.recipes.tasks import CHARS, SPECIAL_TOKENS

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    special = {"unk_token": "<unk>", **({"eos_token": "<eos>"} if eos else {}),
               **({"pad_token": "<pad>"} if pad else {})}
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(directory)


def drop_model_eos(directory):
    for name in ("config.json", "generation_config.json"):
        config = json.loads((directory / name).read_text())
        config.pop("eos_token_id", None)
        (directory / name).write_text(json.dumps(config))


def test_tokenizer_without_eos_or_pad(small_model_dir, tmp_path):
    from grpo.engine.models import load_tokenizer

    # Neither EOS nor pad, and no EOS in the model's configs: refused at load, naming what is missing.
    model = copy_model(small_model_dir, tmp_path)
    tokenizer_without(model, eos=False, pad=False)
    drop_model_eos(model)
    with pytest.raises(ModelError, match=rf"the tokenizer of {model} has no EOS token and no pad token, and the "
                                         r"model's generation config names none"):
        load_tokenizer(str(model))
    # A pad token alone does not end completions either.
    tokenizer_without(model, eos=False, pad=True)
    with pytest.raises(ModelError, match=rf"the tokenizer of {model} has no EOS token, and the model's"):
        load_tokenizer(str(model))
    # No EOS in the tokenizer but one in the model's generation config: that one, and pad <- EOS.
    tokenizer_without(model, eos=False, pad=False)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    tok = load_tokenizer(str(model))
    assert tok.eos_token_id == 3 and tok.pad_token_id == 3
    # EOS but no pad: pad <- EOS, as before.
    tokenizer_without(model, eos=True, pad=False)
    tok = load_tokenizer(str(model))
    assert tok.pad_token_id == tok.eos_token_id == 1 and tok.padding_side == "left"


def test_cli_reports_a_broken_model_in_one_line(small_model_dir, tmp_path, capsys):
    model = copy_model(small_model_dir, tmp_path)
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    sets = {"model": str(model), "dataset": str(data), "output_dir": str(tmp_path / "o"), "max_steps": 1,
            "rewards": "[exact_answer]"}
    assert main(["train", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors is not a valid safetensors file: it is empty" in err
    assert len([l for l in err.splitlines() if l.startswith("grpo")]) == 1 and "Traceback" not in err
