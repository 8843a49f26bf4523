"""Bad config input, through the loading functions and the command line: each ends in one
ConfigError line naming the key, where it came from and what is expected, never in a traceback,
a MemoryError or a value used silently."""

from __future__ import annotations

import dataclasses
import os
import time
import typing

import pytest
import torch

from grpo import algorithm as A
from grpo.cli import main
from grpo.config import (COMMANDS, ConfigError, PreferenceConfig, RewardModelConfig, RewardModelEvalConfig, SFTConfig,
                         TrainConfig, build, load_config, load_yaml, parse_overrides)
from grpo.config.loading import MAX_CONFIG_BYTES, MAX_CONFIG_VALUES

BASE = "model: m\ndataset: d.jsonl\nrewards: [{function: exact_answer}]\n"
REQUIRED = {TrainConfig: {"model": "m", "dataset": "d.jsonl", "rewards": [{"function": "exact_answer"}]}}


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(cls, path=None, sets=(), match: str = "") -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, path, list(sets))
    message = str(e.value)
    assert match in message, message
    assert "\n" not in message
    return message


def cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"grpo {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------
# 1. Alias bombs, huge files, recursion

LAUGHS = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def test_alias_bomb_is_refused_before_it_is_built(tmp_path):
    path = write(tmp_path, "rename_columns:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                 + "".join("  " + line + "\n" for line in LAUGHS.splitlines()) + "model: *i\n")
    start = time.time()
    message = refused(TrainConfig, path, match=f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values")
    assert "aliases" in message and time.time() - start < 5


def test_alias_bomb_in_set_is_refused(capsys):
    bomb = "{a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "}"
    with pytest.raises(ConfigError, match="--set rename_columns: expands to more than"):
        parse_overrides([f"rename_columns={bomb}"])
    err = cli_error(capsys, "train", "--set", f"rename_columns={bomb}")
    assert "--set rename_columns: expands to more than" in err


def test_aliases_within_the_bound_still_work(tmp_path):
    path = write(tmp_path, BASE + "model_init_kwargs: &k {trust_remote_code: true}\n"
                 "iterative_rl: {every: 0}\ngeneration_kwargs: {temperature: 0.5}\n")
    assert load_config(TrainConfig, path).model_init_kwargs == {"trust_remote_code": True}


def test_a_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, BASE + "report_to: &r [tensorboard, *r]\n")
    refused(TrainConfig, path, match="an alias refers to a value that contains it")


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = write(tmp_path, BASE + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    refused(TrainConfig, path, match=f"{path}: {path.stat().st_size:,} bytes; a config file holds at most")


def test_deep_nesting_is_one_line(tmp_path):
    path = write(tmp_path, BASE + "rename_columns: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(TrainConfig, path, match=str(path))


# ---------------------------------------------------------------------------------------------
# 2. A key given twice

def test_duplicate_top_level_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, BASE + "beta: 0.1\nlearning_rate: 1e-5\nbeta: 0.2\n")
    refused(TrainConfig, path, match=f"{path}:6: beta is given twice (first at line 4); keep one")


def test_duplicate_nested_key(tmp_path):
    path = write(tmp_path, "model: m\ndataset: d.jsonl\nrewards:\n  - function: exact_answer\n    weight: 1\n"
                           "    weight: 2\n")
    refused(TrainConfig, path, match=f"{path}:6: weight is given twice (first at line 5)")


def test_duplicate_key_in_set_value():
    with pytest.raises(ConfigError, match="--set peft:1: r is given twice"):
        parse_overrides(["peft={r: 8, alpha: 16, r: 4}"])


def test_a_merge_key_may_still_be_overridden(tmp_path):
    path = write(tmp_path, BASE + "peft: &p {r: 8, alpha: 16}\nmodel_init_kwargs:\n  <<: {trust_remote_code: false}\n"
                               "  trust_remote_code: true\n")
    assert load_config(TrainConfig, path).model_init_kwargs == {"trust_remote_code": True}


def test_a_top_level_key_that_is_not_a_name(tmp_path):
    for key in ("1", "null", "true"):
        path = write(tmp_path, BASE + f"{key}: x\n")
        refused(TrainConfig, path, match=f"{path}:4: a key must be a name, got {key!r}")
    with pytest.raises(ConfigError, match="a key must be a name, got 1"):
        build(TrainConfig, {**REQUIRED[TrainConfig], 1: "x"}, "test")


# ---------------------------------------------------------------------------------------------
# 3. The config path is a directory (or cannot be read)

def test_config_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "conf").mkdir()
    refused(TrainConfig, tmp_path / "conf", match=f"config file {tmp_path / 'conf'} is a directory, not a YAML file")
    assert "is a directory" in cli_error(capsys, "train", "--config", str(tmp_path / "conf"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_config_path_in_a_symlink_loop(tmp_path):
    (tmp_path / "c.yaml").symlink_to(tmp_path / "c.yaml")
    refused(TrainConfig, tmp_path / "c.yaml", match=f"config file {tmp_path / 'c.yaml'} is, or passes through, a "
                                                    f"symbolic link loop")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_config_file_without_read_permission(tmp_path):
    path = write(tmp_path, BASE)
    path.chmod(0)
    refused(TrainConfig, path, match=f"config file {path} cannot be read")


# ---------------------------------------------------------------------------------------------
# 4. An empty output_dir (output_file)

@pytest.mark.parametrize("command", [["train"], ["sft"], ["reward-model", "train"]])
def test_empty_output_dir_in_set_is_refused(command, capsys):
    err = cli_error(capsys, *command, "--set", "model=m", "--set", "dataset=d.jsonl",
                    "--set", "rewards=[exact_answer]" if command == ["train"] else "seed=0", "--set", "output_dir=")
    assert "--set output_dir: output_dir: expected str, got no value" in err


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig, RewardModelConfig])
def test_empty_output_dir_in_a_file_is_refused(cls, tmp_path):
    path = write(tmp_path, BASE.replace("rewards: [{function: exact_answer}]\n", "") +
                 ("rewards: [exact_answer]\n" if cls is TrainConfig else "") + "output_dir: ''\n")
    refused(cls, path, match=f"{path}:{4 if cls is TrainConfig else 3}: output_dir: required")
    refused(cls, path, ["output_dir=' '"], match="--set output_dir: output_dir: required")


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    path = write(tmp_path, BASE + f"output_dir: {tmp_path / 'taken'}\n")
    refused(TrainConfig, path, match=f"output_dir: {tmp_path / 'taken'} is a file, not a directory")


def test_make_preferences_needs_an_output_file():
    with pytest.raises(ConfigError, match="--set output_file: output_file: required"):
        load_config(PreferenceConfig, None, ["model=m", "dataset=d.jsonl", "output_file=''"])


def test_a_key_given_no_value_says_so(tmp_path):
    path = write(tmp_path, BASE + "beta:\n")
    refused(TrainConfig, path, match=f"{path}:4: beta: expected float, got no value")


# ---------------------------------------------------------------------------------------------
# 5. NaN and infinity in float keys

def float_keys(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is float]


CASES = [(cls, key) for family, (cls, _) in COMMANDS.items() for key in float_keys(cls)]


@pytest.mark.parametrize("cls, key", CASES, ids=[f"{c.__name__}.{k}" for c, k in CASES])
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "-.inf", "-Infinity"])
def test_every_float_key_refuses_nan_and_infinity(cls, key, value):
    sets = [f"{k}={v}" for k, v in {"model": "m", "dataset": "d.jsonl", "rewards": "[exact_answer]"}.items()
            if k in {f.name for f in dataclasses.fields(cls)}]
    refused(cls, None, [*sets, f"{key}={value}"], match=f"--set {key}: {key}: expected a finite number, got ")


def test_every_config_has_float_keys_under_this_check():
    assert {cls for cls, _ in CASES} == {cls for cls, _ in COMMANDS.values()} - {RewardModelEvalConfig}
    assert not float_keys(RewardModelEvalConfig)
    assert {"learning_rate", "temperature", "beta", "reward_timeout", "delta", "top_p"} <= set(float_keys(TrainConfig))


def test_nan_in_a_file_names_the_line(tmp_path):
    path = write(tmp_path, BASE + "temperature: .nan\n")
    refused(TrainConfig, path, match=f"{path}:4: temperature: expected a finite number, got nan")


def test_nested_float_fields_refuse_nan(tmp_path):
    path = write(tmp_path, "model: m\ndataset: d.jsonl\nrewards: [{function: exact_answer, weight: .nan}]\n")
    refused(TrainConfig, path, match="rewards[0].weight: expected a finite number, got nan")
    path = write(tmp_path, BASE + "iterative_rl: {every: 0, learning_rate: .inf}\n")
    refused(TrainConfig, path, match="iterative_rl.learning_rate: expected a finite number, got inf")
    path = write(tmp_path, BASE + "iterative_rl: {every: 0, replay: high}\n")
    refused(TrainConfig, path, match="iterative_rl.replay: expected a finite number, got 'high'")
    path = write(tmp_path, BASE + "iterative_rl: {every: 0, reset_reference: 1}\n")
    refused(TrainConfig, path, match="iterative_rl.reset_reference: expected bool, got 1")


def test_from_python_too():
    with pytest.raises(ConfigError, match="test: learning_rate: expected a finite number, got nan"):
        build(TrainConfig, {**REQUIRED[TrainConfig], "learning_rate": float("nan")}, "test")


# ---------------------------------------------------------------------------------------------
# 6. reward_timeout

@pytest.mark.parametrize("value, message", [
    (".inf", "reward_timeout: expected a finite number, got inf"),
    ("1e12", "reward_timeout: must be > 0 and at most 31536000 seconds"),
    ("0", "reward_timeout: must be > 0 and at most"),
])
def test_reward_timeout_must_be_a_finite_bound(tmp_path, value, message):
    refused(TrainConfig, write(tmp_path, BASE + f"reward_timeout: {value}\n"), match=message)


def test_a_long_reward_timeout_is_fine(tmp_path):
    assert load_config(TrainConfig, write(tmp_path, BASE + "reward_timeout: 86400\n")).reward_timeout == 86400.0


# ---------------------------------------------------------------------------------------------
# 7. `~` in path keys

@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_tilde_is_the_home_directory_in_path_keys(tmp_path, home):
    (home / "models" / "m").mkdir(parents=True)
    config = tmp_path / "project" / "c.yaml"
    config.parent.mkdir()
    config.write_text("model: ~/models/m\ndataset: ~/data/train.jsonl\neval_dataset: ~/data/test.jsonl\n"
                      "rewards: [~/rewards.py:score, {model: ~/rm, weight: 0.5}, {model: [~/rm1, rm2]}]\n"
                      "output_dir: ~/runs/x\n")
    cfg = load_config(TrainConfig, config)
    assert cfg.model == str(home / "models" / "m")
    assert (cfg.dataset, cfg.eval_dataset) == (str(home / "data" / "train.jsonl"), str(home / "data" / "test.jsonl"))
    assert cfg.rewards == [f"{home / 'rewards.py'}:score", {"model": str(home / "rm"), "weight": 0.5},
                           {"model": [str(home / "rm1"), "rm2"]}]
    assert cfg.output_dir == str(home / "runs" / "x")


def test_tilde_in_set_and_from_python(home):
    cfg = load_config(SFTConfig, None, ["model=~/m", "dataset=~/d.jsonl", "output_dir=~/runs/sft"])
    assert (cfg.model, cfg.dataset, cfg.output_dir) == (str(home / "m"), str(home / "d.jsonl"), str(home / "runs/sft"))
    cfg = build(PreferenceConfig, {"model": "m", "dataset": "d.jsonl", "output_file": "~/pairs.jsonl"})
    assert cfg.output_file == str(home / "pairs.jsonl")


def test_only_a_leading_tilde_is_expanded(tmp_path, home):
    cfg = load_config(TrainConfig, write(tmp_path, BASE + "output_dir: $HOME/runs\nprompt_column: ~/x\n"))
    assert cfg.output_dir == "$HOME/runs"   # no environment variables
    assert cfg.prompt_column == "~/x"       # and only in path keys
    assert load_config(TrainConfig, None, ["model=a~b", "dataset=d", "rewards=[exact_answer]"]).model == "a~b"


# ---------------------------------------------------------------------------------------------
# 8. Symbolic link loops

def test_output_dir_in_a_symlink_loop(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for value in ("loop", "loop/run"):
        path = write(tmp_path, BASE + f"output_dir: {tmp_path / value}\n")
        refused(TrainConfig, path, match=f"{path}:4: output_dir: {tmp_path / value} is, or passes through, a "
                                         f"symbolic link loop")
    err = cli_error(capsys, "sft", "--set", "model=m", "--set", "dataset=d", "--set", f"output_dir={tmp_path / 'loop'}")
    assert "--set output_dir: output_dir:" in err and "symbolic link loop" in err


def test_input_paths_in_a_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    refused(TrainConfig, write(tmp_path, BASE.replace("model: m", "model: a")), match="model: ")
    refused(TrainConfig, write(tmp_path, "model: m\ndataset: d\nrewards: [{model: a}]\n"),
            match="rewards[0].model: ")
    refused(TrainConfig, write(tmp_path, BASE + "eval_dataset: a/x.jsonl\n"), match="symbolic link loop")


def test_a_nul_character_in_a_path(tmp_path):
    refused(TrainConfig, write(tmp_path, BASE + 'output_dir: "runs/\\0x"\n'), match="contains a NUL character")


# ---------------------------------------------------------------------------------------------
# 9. top_entropy_quantile with a sequence-coupled surrogate

def make(**kw):
    return build(TrainConfig, {**REQUIRED[TrainConfig], **kw}, "test.yaml")


@pytest.mark.parametrize("keys, coupled", [
    ({"policy_loss": "gmpo"}, "policy_loss: gmpo"),
    ({"preset": "gmpo"}, "policy_loss: gmpo"),
    ({"ratio_level": "sequence"}, "ratio_level: sequence"),
    ({"preset": "gspo"}, "ratio_level: sequence"),
])
def test_entropy_selection_refuses_a_sequence_coupled_loss(keys, coupled):
    with pytest.raises(ConfigError, match=f"test.yaml: top_entropy_quantile: selects the tokens .* with {coupled} "
                                          f"each token's loss holds the whole sequence's ratio"):
        make(top_entropy_quantile=0.2, **keys)
    make(top_entropy_quantile=1.0, **keys)  # no selection, no problem


@pytest.mark.parametrize("keys", [{}, {"policy_loss": "cispo"}, {"policy_loss": "cispo", "ratio_level": "sequence"}])
def test_entropy_selection_with_a_per_token_loss(keys):
    assert make(top_entropy_quantile=0.2, **keys).top_entropy_quantile == 0.2


@pytest.mark.parametrize("loss, level, leaks", [("ppo_clip", "token", False), ("cispo", "sequence", False),
                                                ("ppo_clip", "sequence", True), ("gmpo", "token", True)])
def test_the_refusal_matches_the_surrogates_gradient(loss, level, leaks):
    """What the check is based on: with a pg_mask, a coupled surrogate still moves unselected tokens."""
    torch.manual_seed(0)
    logprobs = (torch.randn(2, 4) * 0.1 - 1).requires_grad_()
    old = logprobs.detach() + torch.randn(2, 4) * 0.05
    mask = torch.ones(2, 4, dtype=torch.bool)
    pg_mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    loss_value, _ = A.policy_loss(logprobs, old, None, torch.tensor([1.0, -0.5]), mask, loss_mode=loss,
                                  ratio_level=level, eps_low=0.2, eps_high=0.2, aggregation="token_mean",
                                  pg_mask=pg_mask, num_sequences=2, num_tokens=8, group_size=2, max_completion_length=4)
    grad = torch.autograd.grad(loss_value, logprobs)[0]
    assert bool(grad[~pg_mask].abs().max() > 0) == leaks


# ---------------------------------------------------------------------------------------------
# 10. delta above the clip band

@pytest.mark.parametrize("keys, delta, ok", [
    ({}, 1.1, False), ({}, 1.2, False), ({}, 1.21, True), ({}, 4.0, True),
    ({"preset": "dapo"}, 1.25, False), ({"preset": "dapo"}, 1.3, True),
    ({"epsilon_high": 1.0}, 1.5, False), ({}, -3.0, False),
])
def test_delta_must_lie_above_the_clip_band(keys, delta, ok):
    if ok:
        assert make(delta=delta, **keys).delta == delta
    else:
        with pytest.raises(ConfigError, match=r"test.yaml: delta: caps the ratio from above: must be > 1 \+ "
                                              r"epsilon_high = [\d.]+, above the clip band"):
            make(delta=delta, **keys)


def test_a_delta_inside_the_band_miscounts_the_clip():
    """What the bound is based on: a cap inside the band zeroes an in-band gradient (A > 0) and
    counts as clipped a token (A < 0) whose gradient is not zero."""
    ratio = torch.tensor([[1.1, 1.1]], requires_grad=True)
    loss_t, _, clipped_high = A.clipped_surrogate(ratio, torch.tensor([[1.0, -1.0]]), 0.2, 0.2, delta=1.05)
    grad = torch.autograd.grad(loss_t.sum(), ratio)[0]
    assert grad[0, 0] == 0 and not clipped_high[0, 0]       # in the band, yet no gradient, not counted
    assert grad[0, 1] != 0 and clipped_high[0, 1]           # counted as clipped, yet a gradient
