"""Every dataset form a Hugging Face user has: files of each format, save_to_disk directories,
hub ids (offline here: a clear error), Dataset / DatasetDict / lists of dicts from Python;
split selection, column renaming; and paths in a config file relative to the config file."""

import json

import pytest
import yaml

from grpo.cli import main
from grpo.config import TrainConfig, load_config
from grpo.data import DataError, load_source, require_columns

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": "6"}]


def plain(rows):
    return [{k: v for k, v in r.items() if k not in ("_line", "_row")} for r in rows]


@pytest.fixture
def ds():
    return datasets.Dataset.from_list(ROWS)


@pytest.mark.parametrize("form", ["jsonl", "json_lines_as_json", "json_array", "csv", "tsv", "parquet", "arrow",
                                  "save_to_disk", "save_to_disk_dict", "folder", "dataset", "dataset_dict", "list",
                                  "columns"])
def test_each_form_loads_the_same_rows(form, ds, tmp_path):
    path = tmp_path / "d"
    if form == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif form == "json_lines_as_json":
        path = tmp_path / "d.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif form == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif form == "csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path), index=False)
    elif form == "tsv":
        path = tmp_path / "d.tsv"
        path.write_text("prompt\tanswer\n" + "".join(f"{r['prompt']}\t{r['answer']}\n" for r in ROWS))
    elif form == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif form == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif form == "save_to_disk":
        ds.save_to_disk(str(path))
    elif form == "save_to_disk_dict":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    elif form == "folder":
        path.mkdir()
        (path / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    source = {"dataset": ds, "dataset_dict": datasets.DatasetDict({"train": ds}), "list": ROWS,
              "columns": {"prompt": [r["prompt"] for r in ROWS], "answer": [r["answer"] for r in ROWS]}}.get(form, path)
    if form in ("csv", "tsv"):  # our CSV reader keeps cells as text, datasets' infers numbers: compare as text
        assert [{k: str(v) for k, v in r.items()} for r in plain(load_source(source).rows)] == ROWS
    else:
        assert plain(load_source(source).rows) == ROWS


def test_line_based_files_keep_file_line_others_say_row(tmp_path, ds):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2="}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: missing column 'answer'"):
        require_columns(load_source(path).rows, ["answer"], str(path))
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]))
    with pytest.raises(DataError, match=r"d.json row 2: missing column 'answer'"):
        source = load_source(arr)
        require_columns(source.rows, ["answer"], source.label)


def test_split_selection_and_its_errors(ds, tmp_path):
    both = datasets.DatasetDict({"train": ds, "test": ds.select([2])})
    assert plain(load_source(both, split="test").rows) == [ROWS[2]]
    both.save_to_disk(str(tmp_path / "dd"))
    assert plain(load_source(str(tmp_path / "dd"), split="train").rows) == ROWS
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\] and dataset_test_split is 'validation'"):
        load_source(both, key="eval_dataset", split="validation")
    # A source with one split is that split, whatever the name asked for.
    assert plain(load_source(ds, split="test").rows) == ROWS


def test_rename_columns(ds):
    rows = load_source(ds, rename={"answer": "solution", "prompt": "question"}).rows
    assert plain(rows)[0] == {"question": "1+1=", "solution": "2"}
    no_column = r"rename_columns: no column 'nope' to rename \(the row has \['answer', 'prompt'\]\)"
    with pytest.raises(DataError, match=no_column):
        load_source(ds, rename={"nope": "x"})
    with pytest.raises(DataError, match="already has a column 'prompt'"):
        load_source(ds, rename={"answer": "prompt"})


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_source("someone/some-dataset-xyz")
    message = str(e.value)
    assert "dataset 'someone/some-dataset-xyz' is not a file or directory here" in message
    assert "could not be loaded from the Hugging Face Hub" in message and "save_to_disk" in message
    assert "\n" not in message


def test_missing_files_and_directories_say_where_they_looked(tmp_path):
    with pytest.raises(DataError, match=r"dataset data/x.jsonl does not exist \(looked for .*data/x.jsonl\)"):
        load_source("data/x.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory without a dataset"):
        load_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="a streaming dataset has no length"):
        load_source(datasets.Dataset.from_list(ROWS).to_iterable_dataset())
    with pytest.raises(DataError, match=r"dataset \(a Python list\) row 2: expected a dict"):
        load_source([{"prompt": "a"}, "b"])


def test_config_paths_resolve_relative_to_the_config_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (project / "reward.py").write_text("def r(completions, **kw):\n    return [0.0] * len(completions)\n")
    (project / "model").mkdir()
    config = project / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "model", "dataset": "data/train.jsonl",
                                      "eval_dataset": "data/missing.jsonl",
                                      "rewards": ["reward.py:r", {"function": "exact_answer"}],
                                      "output_dir": "runs/x"}))
    monkeypatch.chdir(tmp_path)  # somewhere else: the config's paths must not depend on it
    cfg = load_config(TrainConfig, config, ["model=Qwen/Qwen2.5-0.5B"])
    assert cfg.dataset == str(project / "data" / "train.jsonl")
    assert cfg.eval_dataset == str(project / "data" / "missing.jsonl")  # a data file: resolved even if absent
    assert cfg.rewards == [f"{project / 'reward.py'}:r", {"function": "exact_answer"}]
    assert cfg.output_dir == "runs/x"  # the working directory's, as Hugging Face's Trainer
    assert cfg.model == "Qwen/Qwen2.5-0.5B"  # --set is the shell's: not resolved
    assert load_config(TrainConfig, config).model == str(project / "model")
    config.write_text(yaml.safe_dump({"model": "model", "dataset": "data/train.jsonl", "rewards": [{"model": "model"}],
                                      "iterative_rl": {"every": 2, "labeler": "reward.py:r",
                                                       "replay_dataset": "data/pairs.jsonl"}}))
    assert load_config(TrainConfig, config).iterative_rl == {"every": 2, "labeler": f"{project / 'reward.py'}:r",
                                                            "replay_dataset": str(project / "data" / "pairs.jsonl")}
    config.write_text(yaml.safe_dump({"model": "org/hub-model", "dataset": "openai/gsm8k",
                                      "rewards": ["exact_answer"]}))
    cfg = load_config(TrainConfig, config)
    assert (cfg.model, cfg.dataset) == ("org/hub-model", "openai/gsm8k")  # hub ids stay hub ids


def test_cli_missing_reward_file_says_where_it_looked(tmp_path, capsys, monkeypatch):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "dataset": "d.jsonl", "rewards": ["reward.py:r"],
                                      "output_dir": str(tmp_path / "out")}))
    monkeypatch.chdir("/")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"grpo train: error: reward function '{tmp_path / 'reward.py'}:r': file {tmp_path / 'reward.py'} "
                   f"does not exist")


def test_training_on_a_datasets_dataset_with_a_split_and_renamed_columns(tiny_model_dir, tmp_path):
    from grpo.train.loop import train

    rows = [{"question": f"{a}+{b}=", "solution": str(a + b)} for a in range(5) for b in range(5)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                               "test": datasets.Dataset.from_list(rows[20:])})
    out = train(dict(model=tiny_model_dir, dataset=dd, eval_dataset=dd, rename_columns={"question": "prompt",
                     "solution": "answer"}, output_dir=str(tmp_path / "run"), rewards=["exact_answer"],
                     prompts_per_step=2, group_size=2, max_completion_length=3, max_steps=1), quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert "eval_accuracy" in summary["eval_before"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["dataset"].startswith("<datasets.DatasetDict")


# ---------------------------------------------------------------------------------------------
# Prompt formatting: TRL's rule

class FakeTokenizer:
    """A tokenizer whose special tokens are visible: one id per character, BOS (99) added to
    plain text as `tokenizer(text)` does for Llama-style tokenizers."""
    chat_template = "set"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([99] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, continue_final_message=False, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        if kwargs.get("enable_thinking") is False:
            text += "<no_think>"
        return text + ("<assistant>" if add_generation_prompt else "") + ("..." if continue_final_message else "")


def test_prompts_are_formatted_as_trl_does():
    from grpo.data import encode_prompt, format_prompt

    tok = FakeTokenizer()
    user = [{"role": "user", "content": "hi"}]
    assert format_prompt(tok, "plain text") == "plain text"  # TRL leaves plain text alone
    assert format_prompt(tok, user) == "<user>hi<assistant>"
    assert format_prompt(tok, user, template_kwargs={"enable_thinking": False}) == "<user>hi<no_think><assistant>"
    assert format_prompt(tok, user + [{"role": "assistant", "content": "Sure"}]) == "<user>hi<assistant>Sure..."
    assert format_prompt(tok, "hi", "always") == "<user>hi<assistant>"
    # Plain text gets the tokenizer's own special tokens (TRL: processing_class(text=prompts)); the
    # template's text is tokenized as written (apply_chat_template(tokenize=True)).
    assert encode_prompt(tok, "ab")[1] == [99, ord("a"), ord("b")]
    assert encode_prompt(tok, user)[1][0] == ord("<")


def test_chat_template_kwargs_reach_the_rollout(tiny_model_dir, tmp_path):
    from conftest import model_with_chat_template
    from grpo.train.loop import train

    model = model_with_chat_template(
        tiny_model_dir, tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}="
                                  "{% if short is defined and short %}{% else %}?{% endif %}{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"}] * 2
    for short, expected in ((True, "1+1="), (False, "1+1=?")):
        out = train(dict(model=str(model), dataset=rows, output_dir=str(tmp_path / str(short)),
                         rewards=["exact_answer"], chat_template_kwargs={"short": short}, prompts_per_step=1,
                         group_size=2, max_completion_length=2, max_steps=1, samples_steps=1, report_to=[]), quiet=True)
        samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
        assert {s["prompt"] for s in samples} == {expected}


def test_in_memory_data_is_fingerprinted_by_its_content(ds):
    # A resumed run must recognise the same rows given again (a Dataset's own _fingerprint is random).
    assert load_source(ds).fingerprint == load_source(datasets.Dataset.from_list(ROWS)).fingerprint \
        == load_source(ROWS).fingerprint
    assert load_source(ROWS[:2]).fingerprint != load_source(ROWS).fingerprint
