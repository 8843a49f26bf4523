"""Config loading and validation: each class of bad input stops with a message naming the key."""

import pytest
import yaml

from grpo.cli import main
from grpo.config import PRESETS, ConfigError, SFTConfig, TrainConfig, build, load_config, parse_overrides

BASE = {"model": "m", "dataset": "d.jsonl", "rewards": [{"function": "exact_answer"}]}


def make(**kw):
    return build(TrainConfig, {**BASE, **kw}, "test.yaml")


def test_defaults_follow_the_grpo_preset():
    cfg = make()
    assert (cfg.scale_rewards, cfg.loss_aggregation, cfg.beta, cfg.kl_estimator) == \
        ("group", "sequence_mean", 0.04, "k3")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_set_their_bundle(preset):
    cfg = make(preset=preset)
    for key, value in PRESETS[preset].items():
        assert getattr(cfg, key) == value


def test_explicit_key_beats_preset():
    cfg = make(preset="dapo", beta=0.01, epsilon_high=0.3)
    assert cfg.beta == 0.01 and cfg.epsilon_high == 0.3 and cfg.loss_aggregation == "token_mean"


def test_int_is_accepted_for_float():
    assert make(learning_rate=1).learning_rate == 1.0
    assert make(learning_rate="1e-3").learning_rate == 1e-3  # PyYAML reads 1e-3 as a string


@pytest.mark.parametrize("values, message", [
    ({"learnig_rate": 1e-5}, "unknown key 'learnig_rate' (did you mean 'learning_rate'?)"),
    ({"group_size": "eight"}, "group_size: expected int, got str 'eight'"),
    ({"beta": True}, "beta: expected float"),
    ({"loss_aggregation": "mean"}, "loss_aggregation: 'mean' is not one of sequence_mean, token_mean"),
    ({"preset": "ppo"}, "preset: 'ppo' is not one of grpo, dapo, dr_grpo, gspo"),
    ({"group_size": 1}, "group_size: must be >= 2"),
    ({"prompts_per_step": 3, "group_size": 4, "num_minibatches": 5}, "num_minibatches: must divide"),
    ({"prompts_per_step": 3, "group_size": 4, "num_minibatches": 4}, "whole groups of 4"),
    ({"temperature": 0}, "temperature: must be > 0"),
    ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
    ({"beta": -0.1}, "beta: must be >= 0"),
    ({"rewards": []}, "rewards: at least one reward is required"),
    ({"rewards": [{"function": "f", "model": "m"}]}, "rewards[0]: give exactly one of"),
    ({"rewards": [{"function": "f", "wieght": 2}]}, "rewards[0]: unknown field(s) ['wieght']"),
    ({"rewards": [{"function": "f", "weight": "high"}]}, "rewards[0].weight: expected a number"),
    ({"model": ""}, "model: required"),
    ({"rewards": [{"function": "f", "normalize": True}]}, "['normalize'] apply to reward models"),
    ({"fsdp": True, "dynamic_sampling": True}, "dynamic_sampling with fsdp is not supported"),
    ({"model_init_kwargs": {"torch_dtype": "bfloat16"}}, "remove dtype / torch_dtype from model_init_kwargs"),
    ({"peft": {"r": 8, "quantization": "int8"}}, "peft.quantization: expected nf4 or fp4"),
    ({"peft": {"r": 8, "quantization": "nf4"}, "fsdp": True}, "fsdp: a 4-bit base (peft.quantization) is not sharded"),
    ({"peft": {"r": 8, "double_quant": True}}, "peft.double_quant: quantizes the scales of a 4-bit base"),
    ({"peft": {"r": 8, "quantisation": "nf4"}}, "allowed: alpha, dropout, double_quant, quantization, r"),
    ({"model_init_kwargs": {"quantization_config": {"load_in_4bit": True}}}, "set peft.quantization (nf4 or fp4)"),
    ({"load_best_model_at_end": True}, "load_best_model_at_end: needs an eval_dataset"),
    ({"early_stopping_patience": 2, "eval_dataset": "e.jsonl", "eval_steps": 0}, "0 < eval_steps <= max_steps"),
    ({"load_best_model_at_end": True, "eval_dataset": "e.jsonl", "eval_steps": 5, "metric_for_best_model": "reward"},
     "metric_for_best_model: a held-out number"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as e:
        make(**values)
    assert message in str(e.value)
    assert "test.yaml" in str(e.value)


def test_sft_config_rejects_train_keys():
    with pytest.raises(ConfigError, match="unknown key 'group_size'"):
        build(SFTConfig, {"model": "m", "dataset": "d", "group_size": 4})


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "beta": 0.1, "preset": "gspo"}))
    cfg = load_config(TrainConfig, path, ["beta=0", "group_size=4", "rewards=[{function: exact_answer, weight: 2}]"])
    assert cfg.beta == 0.0 and cfg.group_size == 4 and cfg.ratio_level == "sequence"
    assert cfg.rewards == [{"function": "exact_answer", "weight": 2}]
    assert parse_overrides(["generation=beam"]) == {"generation": "beam"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["beta"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, bad)


def test_cli_prints_one_clear_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "group_size": 1}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "grpo train: error:" in err and "group_size: must be >= 2" in err and str(path) in err


def test_mlp_activations_auto_recomputes_for_real_vocabularies_only():
    from types import SimpleNamespace

    from grpo.train.rollout import recompute_mlp

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
    cfg = TrainConfig(model="m", rewards=[{"function": "exact_answer"}])
    assert cfg.mlp_activations == "auto"
    assert recompute_mlp(cfg, model(151_936)) and not recompute_mlp(cfg, model(64))
    for value, big, small in (("recompute", True, True), ("keep", False, False)):
        cfg.mlp_activations = value
        assert (recompute_mlp(cfg, model(151_936)), recompute_mlp(cfg, model(64))) == (big, small)
    with pytest.raises(ConfigError, match="mlp_activations: 'yes' is not one of auto, recompute, keep"):
        build(TrainConfig, {"model": "m", "rewards": [{"function": "exact_answer"}], "mlp_activations": "yes"})
