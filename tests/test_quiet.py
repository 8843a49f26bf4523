"""Our commands print only our own lines: other libraries' warnings, log records and progress
bars stay off the console unless --verbose asks for them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A reward function that makes the noise libraries make while a run trains: a log record on a
# library's logger, a Python warning from a library's module, a progress bar.
NOISY_REWARD = '''
import logging
import warnings

import tqdm

from noisy_lib import warn_like_a_library


def r(prompts, completions, **kw):
    logging.getLogger("kernels").warning("NOISE-LOG: publisher trust check skipped")
    logging.getLogger("transformers.modeling_utils").warning("NOISE-HF: some weights were not used")
    warn_like_a_library()
    for _ in tqdm.tqdm(range(3), desc="NOISE-BAR"):
        pass
    logging.getLogger("grpo.rewards").warning("OURS: a grpo logger keeps its warnings")
    return [0.0] * len(completions)
'''

NOISY_LIB = '''
import warnings


def warn_like_a_library():
    warnings.warn("NOISE-WARN: this argument is deprecated", FutureWarning)
'''


def run_noisy(tiny_model_dir, addition_files, tmp_path, *extra):
    (tmp_path / "noisy_lib.py").write_text(NOISY_LIB)
    (tmp_path / "noisy_reward.py").write_text(NOISY_REWARD)
    sets = dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=tmp_path / "run",
                rewards=f"[{{function: '{tmp_path / 'noisy_reward.py'}:r'}}]", prompts_per_step=2, group_size=2,
                max_completion_length=2, max_steps=1, max_prompt_length=16, report_to="[]", num_threads=1)
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    for var in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "grpo.cli", "train", *extra, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


NOISE = ("NOISE-LOG", "NOISE-HF", "NOISE-WARN", "NOISE-BAR")


def test_a_run_prints_only_our_lines(tiny_model_dir, addition_files, tmp_path):
    result = run_noisy(tiny_model_dir, addition_files, tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert not [n for n in NOISE if n in output], output
    assert "OURS: a grpo logger keeps its warnings" in result.stderr
    assert "model saved to" in result.stdout


def test_verbose_shows_the_libraries_noise(tiny_model_dir, addition_files, tmp_path):
    result = run_noisy(tiny_model_dir, addition_files, tmp_path, "--verbose")
    assert result.returncode == 0, result.stderr
    assert all(n in result.stdout + result.stderr for n in NOISE), result.stderr


@pytest.mark.parametrize("command", [["train"], ["sft"], ["demo"], ["reward-model", "train"], ["report", "x"],
                                     ["config", "train"]])
def test_every_command_takes_verbose(command):
    from grpo.cli import parser

    args = parser().parse_args([*command, "--verbose"])
    assert args.verbose is True


def test_every_command_has_one_handler():
    from grpo.cli import HANDLERS, parser

    commands = next(a for a in parser()._actions if a.dest == "command").choices
    assert set(commands) == set(HANDLERS)


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`grpo config train | head -1`: the reader may stop early; no error, no traceback."""
    import io

    from grpo.cli import main

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["config", "train"]) == 0
    assert capsys.readouterr().err == ""
