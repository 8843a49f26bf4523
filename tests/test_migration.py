"""The TRL migration example (examples/trl_migration): the grpo YAML and the Python call that
stand for trl_grpo.py both run on the tiny model and train exactly the same thing."""

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from grpo.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_migration"
TIMINGS = ("time/",)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if not k.startswith(TIMINGS)}
            for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_yaml_and_python_forms_train_the_same_thing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir is relative to the working directory, data to the config
    assert main(["train", "--config", str(EXAMPLE / "grpo.yaml"), "--set", f"model={tiny_model_dir}",
                 "--set", "output_dir=yaml", "--quiet"]) == 0
    spec = importlib.util.spec_from_file_location("grpo_python_example", EXAMPLE / "grpo_python.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run(tiny_model_dir, str(tmp_path / "python"), report_to=[])

    yaml_run, python_run = tmp_path / "yaml", tmp_path / "python"
    first = metrics(yaml_run)[0]
    assert {"reward/correct/mean", "reward/brevity/mean"} <= set(first)
    assert first["reward/mean"] == pytest.approx(first["reward/correct/mean"] + 0.5 * first["reward/brevity/mean"])
    assert metrics(yaml_run) == metrics(python_run)  # the same rewards, losses and KL at every step
    a, b = load_file(str(yaml_run / "model.safetensors")), load_file(str(python_run / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert (EXAMPLE / "trl_grpo.py").read_text().count("GRPOConfig(") == 1  # the reference script is there
