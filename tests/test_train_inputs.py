"""What `grpo train` and `grpo reward-model make-preferences` check of their inputs through the
whole command: over-long prompts said once, custom model code only when trusted, an output file
never inside an input."""

from __future__ import annotations

import json
import shutil

from grpo.cli import main


def train_sets(tiny_model_dir, data, out, **kw):
    sets = dict(model=tiny_model_dir, dataset=data, output_dir=out, rewards="[answer_distance]", prompts_per_step=2,
                group_size=2, max_completion_length=2, max_steps=1, max_prompt_length=16, report_to="[]")
    sets.update(kw)
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_train_says_once_how_many_prompts_lose_their_start(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "123456789+1=", "answer": "123456790"},
            {"prompt": "2+2=", "answer": "4"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--quiet", *train_sets(tiny_model_dir, data, tmp_path / "run", max_prompt_length=8)]) == 0
    err = capsys.readouterr().err
    assert err.count("grpo: warning:") == 1 and f"{data}:2: prompt: the prompt is 12 tokens" in err, err
    assert "1 of 3 prompts" in err


def test_train_refuses_custom_model_code_unless_trusted(tiny_model_dir, addition_files, tmp_path, capsys):
    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    # A model type transformers does not know: only its own code could load it.
    config["model_type"] = "custom-lm"
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom_code.py").write_text("raise SystemExit('custom code ran')\n")
    assert main(["train", "--quiet", *train_sets(str(model), addition_files["train"], tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "custom code ran" not in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_make_preferences_never_writes_into_its_model_or_over_its_config(tiny_model_dir, addition_files, tmp_path,
                                                                        capsys):
    model = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, model)
    config = tmp_path / "prefs.yaml"
    config.write_text(f"model: {model}\ndataset: {addition_files['train']}\nnum_prompts: 4\n")
    for target, said in ((model / "pairs.jsonl", "is inside this command's model"),
                         (config, "is this command's config")):
        assert main(["reward-model", "make-preferences", "--overwrite", "--config", str(config),
                     "--set", f"output_file={target}"]) == 2
        assert said in capsys.readouterr().err
    assert not (model / "pairs.jsonl").exists() and config.read_text().startswith("model:")
