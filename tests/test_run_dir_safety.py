"""What a command may delete or overwrite, and what a resumed run must match (grpo.runs.run_dir).

A user's work is sacred: --overwrite empties only a directory grpo made and only when everything
in it is grpo's own output; a run directory has one writer at a time; an interrupt after the
last step still saves the trained model; --resume continues only the run it claims to be.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from grpo.errors import RunError
from grpo.runs import run_dir
from grpo.runs.interrupts import StopRequests
from grpo.runs.run_dir import LOCK, MARKER, STAGING, check_output_dir, claim_output_dir, publish
from grpo.train.loop import train

from test_safety import ROOT, cli, small, spawn_train, train_args, weights


def fake_run(out: Path, command: str = "grpo train") -> Path:
    """A directory as a finished `grpo train` leaves it, without training (claimed, then written)."""
    with claim_output_dir(out, command, inputs={}, resume=False, overwrite=False):
        pass
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "train_config.json",
                 "summary.json", "README.md"):
        (out / name).write_text("{}")
    (out / "checkpoint-2").mkdir()
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "run.json"):
        (out / "checkpoint-2" / name).write_text("{}")
    return out


def tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# --overwrite deletes only what grpo wrote


def test_overwrite_refuses_a_folder_grpo_did_not_make(tiny_model_dir, addition_files, tmp_path, capsys):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    (home / "Documents").mkdir()
    (home / "Documents" / "thesis.tex").write_text("years of work")
    before = tree(home)
    assert cli("train", "--quiet", "--overwrite", *train_args(tiny_model_dir, addition_files, home)) == 2
    err = capsys.readouterr().err
    assert f"output_dir {home} was not made by grpo (it has no {MARKER} marker)" in err, err
    assert "Traceback" not in err
    # Without --overwrite it says so too, and does not suggest a flag that would be refused.
    assert cli("train", "--quiet", *train_args(tiny_model_dir, addition_files, home)) == 2
    err = capsys.readouterr().err
    assert "was not made by grpo" in err and "pass --overwrite" not in err
    assert tree(home) == before


def test_overwrite_refuses_a_grpo_run_that_holds_a_users_file_anywhere(tiny_model_dir, addition_files, tmp_path,
                                                                       capsys):
    out = fake_run(tmp_path / "run")
    for extra in (out / "notes.txt", out / "checkpoint-2" / "my_analysis.ipynb", out / "mine"):
        if extra.name == "mine":
            extra.mkdir()
            (extra / "a.txt").write_text("x")
        else:
            extra.write_text("mine")
        before = tree(out)
        assert cli("train", "--quiet", "--overwrite", *train_args(tiny_model_dir, addition_files, out)) == 2
        err = capsys.readouterr().err
        shown = str(extra.relative_to(out)) + ("/" if extra.is_dir() else "")
        assert "grpo did not write" in err and shown in err and "move it out" in err, err
        assert tree(out) == before
        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    # A symbolic link is never grpo's, even one named as grpo's files are.
    (out / "metrics.jsonl").unlink()
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("theirs")
    (out / "metrics.jsonl").symlink_to(target)
    with pytest.raises(RunError, match=r"grpo did not write \(metrics.jsonl\)"):
        check_output_dir(out, inputs={}, resume=False, overwrite=True)
    assert target.read_text() == "theirs"


def test_overwrite_never_deletes_the_config_file_or_a_reward_file_in_output_dir(tiny_model_dir, addition_files,
                                                                                  tmp_path, capsys):
    out = fake_run(tmp_path / "run")
    config = out / "train_config.json"  # named as grpo's own file: still the user's input
    config.write_text(json.dumps({"model": tiny_model_dir, "dataset": addition_files["train"],
                                  "rewards": ["answer_distance"]}))
    before = tree(out)
    assert cli("train", "--quiet", "--overwrite", "--config", str(config), *train_args(tiny_model_dir, addition_files,
                                                                                       out)) == 2
    err = capsys.readouterr().err
    assert f"would delete this run's own input: config {config}" in err, err
    assert tree(out) == before
    # A reward function's file, named in the config or given as a function from it.
    config.unlink()
    reward = out / "modeling_rewards.py"  # a name grpo's layout knows: still the user's input
    reward.write_text("def r(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    assert cli("train", "--quiet", "--overwrite",
               *train_args(tiny_model_dir, addition_files, out, rewards=f"[{{function: '{reward}:r'}}]")) == 2
    err = capsys.readouterr().err
    assert "would delete this run's own input: reward r's file" in err and str(reward) in err, err
    assert reward.is_file()


def test_overwrite_refuses_a_symlinked_output_dir(tiny_model_dir, addition_files, tmp_path, capsys):
    real = fake_run(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = tree(real)
    assert cli("train", "--quiet", "--overwrite", *train_args(tiny_model_dir, addition_files, link)) == 2
    err = capsys.readouterr().err
    assert f"output_dir {link} is a symbolic link" in err and "give the real path" in err, err
    assert tree(real) == before


def test_overwrite_refuses_root_home_and_the_directories_above_the_working_one(tmp_path, monkeypatch):
    home = tmp_path / "home"
    work = home / "projects" / "x"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for directory in (home, home / "projects", work):
        (directory / MARKER).write_text(json.dumps({"command": "grpo train"}))
        with pytest.raises(RunError, match="grpo never empties it"):
            run_dir.check_clearable(directory, {})
    with pytest.raises(RunError, match="is the root directory"):
        run_dir.check_clearable(Path("/"), {})


def test_overwrite_of_a_run_grpo_wrote_replaces_exactly_that(tmp_path):
    out = fake_run(tmp_path / "run")
    check_output_dir(out, inputs={}, resume=False, overwrite=True)
    with claim_output_dir(out, "grpo train", inputs={}, resume=False, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == [LOCK, MARKER]
    assert json.loads((out / MARKER).read_text())["command"] == "grpo train"


def test_sft_and_reward_model_train_follow_the_same_rule(tiny_model_dir, addition_files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("the user's")  # a name grpo writes, in a folder grpo did not make
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    assert cli("sft", "--quiet", "--overwrite", "--set", f"model={tiny_model_dir}", "--set",
               f"dataset={addition_files['train']}", "--set", f"output_dir={out}") == 2
    assert "was not made by grpo" in capsys.readouterr().err
    assert cli("reward-model", "train", "--quiet", "--overwrite", "--set", f"model={tiny_model_dir}", "--set",
               f"dataset={pairs}", "--set", f"output_dir={out}") == 2
    assert "was not made by grpo" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "the user's"


def test_a_real_runs_output_is_all_recognised_as_grpos(tiny_model_dir, addition_files, tmp_path):
    # LoRA with a merged model, checkpoints, samples, an evaluation and the model card: every
    # entry a run writes is one --overwrite may replace.
    out = tmp_path / "run"
    train(small(tiny_model_dir, addition_files, out, max_steps=2, save_steps=1, samples_steps=1,
                eval_dataset=addition_files["heldout"], eval_max_prompts=2, peft={"r": 4}, merge_adapter=True),
          quiet=True)
    assert (out / "adapter").is_dir() and (out / "checkpoint-1").is_dir() and not (out / STAGING).exists()
    run_dir.check_clearable(out, {})


# ----------------------------------------------------------------------------------------------
# One writer at a time


def hold_lock(directory: Path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom grpo.runs.run_dir import lock_run_dir\n"
            "lock = lock_run_dir(Path(sys.argv[1]))\nprint('ready', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_writer_is_refused_naming_the_process_that_holds_the_directory(tiny_model_dir, addition_files,
                                                                                 tmp_path, capsys):
    out = fake_run(tmp_path / "run")
    before = tree(out)
    holder = hold_lock(out)
    try:
        for flags in (["--overwrite"], ["--resume"], []):
            assert cli("train", "--quiet", *flags, *train_args(tiny_model_dir, addition_files, out)) == 2
            err = capsys.readouterr().err
            assert f"output_dir {out} is being written by another grpo process (pid {holder.pid}:" in err, err
        # The lock is taken before anything is deleted, whatever a check before it saw.
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            claim_output_dir(out, "grpo train", inputs={}, resume=False, overwrite=True)
        # A fresh run into an empty directory another process claimed is refused too.
        empty = tmp_path / "empty"
        other = hold_lock(empty)
        try:
            with pytest.raises(RunError, match=f"pid {other.pid}"):
                train(small(tiny_model_dir, addition_files, empty), quiet=True)
        finally:
            other.kill()
            other.wait()
    finally:
        holder.kill()  # the lock dies with its process
        holder.wait()
    assert {k: v for k, v in tree(out).items() if k != LOCK} == {k: v for k, v in before.items() if k != LOCK}
    with claim_output_dir(out, "grpo train", inputs={}, resume=False, overwrite=True):
        pass


def test_under_torchrun_every_process_hears_the_directory_is_taken(tiny_model_dir, addition_files, tmp_path):
    from conftest import free_port
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "grpo.cli", "train", "--quiet",
               *train_args(tiny_model_dir, addition_files, out, num_threads=1)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert f"is being written by another grpo process (pid {holder.pid}:" in result.stderr
    assert not (out / "metrics.jsonl").exists()


def test_overwrite_refuses_while_a_run_nested_in_the_directory_is_writing(tmp_path):
    demo = tmp_path / "demo"
    with claim_output_dir(demo, "grpo demo", inputs={}, resume=False, overwrite=False):
        pass
    fake_run(demo / "grpo")
    holder = hold_lock(demo / "grpo")
    try:
        busy = rf"{demo / 'grpo'} is being written by another grpo process \(pid {holder.pid}"
        with pytest.raises(RunError, match=busy):
            check_output_dir(demo, inputs={}, resume=False, overwrite=True)
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------
# Interrupts at the end never lose the run


def slow_final_eval_reward(tmp_path: Path) -> tuple[str, Path]:
    """A reward that hangs when it scores the final held-out evaluation (global_step at its end)."""
    started = tmp_path / "final-eval-started"
    f = tmp_path / "slow.py"
    f.write_text("import time\nfrom pathlib import Path\n\n"
                 "def r(prompts, completions, trainer_state=None, **kw):\n"
                 "    if trainer_state is not None and trainer_state.global_step == trainer_state.max_steps:\n"
                 f"        Path({str(started)!r}).touch()\n"
                 "        time.sleep(3600)\n"
                 "    return [float(len(c)) for c in completions]\n")
    return f"{f}:r", started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_final_evaluation_still_saves_the_trained_model(tiny_model_dir, addition_files,
                                                                            tmp_path, signum):
    from transformers import AutoModelForCausalLM

    spec, started = slow_final_eval_reward(tmp_path)
    out = tmp_path / "run"
    proc = spawn_train(train_args(tiny_model_dir, addition_files, out, max_steps=2, num_threads=1,
                                  eval_dataset=addition_files["heldout"], eval_max_prompts=2,
                                  rewards=f"[{{function: '{spec}'}}]"), tmp_path)
    deadline = time.time() + 180
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()[1]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    ours = [l for l in err.splitlines() if l.startswith("grpo")]
    assert "Traceback" not in err and len(ours) == 2, err
    assert f"grpo: {name}: skipping the final evaluation; saving the trained model" in ours[0]
    assert f"interrupted by {name} after the last step (2): the final evaluation was skipped; the trained model " \
           f"is saved in {out}" in ours[1]
    AutoModelForCausalLM.from_pretrained(out)  # whole, and where the message says
    assert not (out / STAGING).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert "eval_after" not in summary and summary["eval_after_skipped"] == f"stopped by {name}"


def test_sighup_mid_run_saves_a_checkpoint_as_sigterm_does(tiny_model_dir, addition_files, tmp_path):
    out = tmp_path / "run"
    proc = spawn_train(train_args(tiny_model_dir, addition_files, out, max_steps=30, num_threads=1), tmp_path)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err
    ours = [l for l in err.splitlines() if l.startswith("grpo")]
    assert "grpo: SIGHUP: stopping at the end of this step" in ours[0], err
    step = int(ours[-1].split(" at step ")[1].split(":")[0])
    assert f"interrupted by SIGHUP at step {step}: saved {out / f'checkpoint-{step}'}" in ours[-1]
    assert (out / f"checkpoint-{step}" / "trainer_state.pt").is_file()


def test_the_final_save_completes_whatever_signal_comes_and_an_evaluation_is_abandoned():
    with StopRequests(say=lambda m: None) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a second one: still no exception while saving
            done = True
        assert done and stop.requested and stop.name() == "SIGTERM"
    with StopRequests(say=lambda m: None) as stop:
        start = time.time()

        def evaluation():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            return "finished"

        with stop.deferred():
            assert stop.unless_stopped(evaluation) is None and time.time() - start < 10
            assert stop.unless_stopped(lambda: pytest.fail("started after a stop")) is None


def test_publish_moves_the_model_into_place_config_last(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_text("old")
    (out / "metrics.jsonl").write_text("kept")
    tmp = run_dir.staging_dir(out)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (tmp / name).write_text("new")
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("new")
    order, real = [], os.replace
    monkeypatch.setattr(run_dir.os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    publish(tmp, out)
    assert order[-1] == "config.json" and not tmp.exists()
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == {
        "config.json": "new", "model.safetensors": "new", "tokenizer.json": "new", "metrics.jsonl": "kept"}
    # Cut short before config.json: no directory that looks like a whole model.
    tmp = run_dir.staging_dir(out)
    (tmp / "config.json").write_text("newer")
    (tmp / "model.safetensors").write_text("newer")

    def fail_on_config(a, b):
        if Path(b).name == "config.json":
            raise OSError("killed")
        real(a, b)

    monkeypatch.setattr(run_dir.os, "replace", fail_on_config)
    with pytest.raises(OSError):
        publish(tmp, out)
    assert not (out / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# A resumed run is the run it claims to be


def test_resume_with_max_steps_at_or_below_the_checkpoint_is_refused(tiny_model_dir, addition_files, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    train(small(tiny_model_dir, addition_files, out, max_steps=3, save_steps=1), quiet=True)
    finished = weights(out)
    for max_steps in (2, 1):
        assert cli("train", "--quiet", "--resume", *train_args(tiny_model_dir, addition_files, out,
                                                               max_steps=max_steps, save_steps=1)) == 2
        err = capsys.readouterr().err
        assert f"--resume: {out / 'checkpoint-2'} is at step 2 and max_steps is {max_steps}: nothing to train; " \
               f"raise max_steps above 2" in err, err
    assert all(torch.equal(finished[k], v) for k, v in weights(out).items())


def test_resume_refuses_a_base_model_whose_weights_changed(tiny_model_dir, addition_files, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    train(small(str(model), addition_files, out, max_steps=3, save_steps=1), quiet=True)
    recorded = json.loads((out / "checkpoint-2" / "run.json").read_text())["model"]
    assert list(recorded["files"]) == ["model.safetensors"]
    assert recorded["files"]["model.safetensors"].startswith("sha256:")
    tensors = load_file(str(model / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # one weight
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    args = train_args(str(model), addition_files, out, max_steps=4, save_steps=1)
    assert cli("train", "--quiet", "--resume", *args) == 2
    err = capsys.readouterr().err
    assert f"belongs to a different run (model {model} model.safetensors: 'sha256:" in err, err
    assert "--allow-changes" in err
    assert cli("train", "--quiet", "--resume", "--allow-changes", *args) == 0


# ----------------------------------------------------------------------------------------------
# An output file never lands in an input


def test_reward_model_score_never_writes_into_the_reward_model_directory(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, model)
    before = tree(model)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    config = tmp_path / "score.yaml"
    config.write_text(f"model: {model}\ndataset: {rows}\n")
    for target in (model / "config.json", model / "scores.jsonl"):
        assert cli("reward-model", "score", "--overwrite", "--config", str(config),
                   "--set", f"output_file={target}") == 2
        err = capsys.readouterr().err
        assert f"output_file {target} is inside this command's model {model}" in err, err
    assert cli("reward-model", "score", "--overwrite", "--config", str(config), "--set", f"output_file={config}") == 2
    assert f"output_file {config} is this command's config" in capsys.readouterr().err
    link = tmp_path / "scores.jsonl"
    link.symlink_to(tmp_path / "somewhere.jsonl")
    assert cli("reward-model", "score", "--overwrite", "--config", str(config), "--set", f"output_file={link}") == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert tree(model) == before


# ----------------------------------------------------------------------------------------------
# The demo replaces only what the demo wrote


def test_the_demo_replaces_its_own_output_and_never_a_users_file(tmp_path, capsys):
    from grpo.recipes.addition import claim_recipe_dir
    from grpo.recipes.demo import run_demo

    out = tmp_path / "demo"
    run_demo(str(out), quiet=True, sft_overrides={"max_steps": 2, "logging_steps": 1},
             grpo_overrides={"max_steps": 1, "eval_max_prompts": 2, "prompts_per_step": 2, "group_size": 2,
                             "eval_steps": 1, "samples_steps": 1})
    assert json.loads((out / MARKER).read_text())["command"] == "grpo demo"
    # Everything the demo wrote is the demo's: a second demo replaces it without being asked.
    with claim_recipe_dir(out, "demo", overwrite=False):
        assert sorted(p.name for p in out.iterdir()) == [LOCK, MARKER]
    run_demo(str(out), quiet=True, sft_overrides={"max_steps": 1}, grpo_overrides={
        "max_steps": 1, "eval_max_prompts": 1, "prompts_per_step": 2, "group_size": 2, "report_to": []})
    for mine in (out / "my_notes.md", out / "data" / "my_split.jsonl", out / "sft" / "eval.ipynb"):
        mine.write_text("the user's")
        before = tree(out)
        for overwrite in (False, True):
            with pytest.raises(RunError, match=rf"grpo did not write \({mine.relative_to(out)}\)"):
                claim_recipe_dir(out, "demo", overwrite=overwrite)
        assert tree(out) == before
        mine.unlink()
    # The other recipe replaces the demo's output only when told to.
    with pytest.raises(RunError, match="not written by `grpo demo --pipeline seed`"):
        claim_recipe_dir(out, "seed pipeline", overwrite=False)
    with claim_recipe_dir(out, "seed pipeline", overwrite=True):
        pass
    # An older demo's marker is grpo's too.
    (out / MARKER).unlink()
    (out / run_dir.LEGACY_MARKER).write_text("demo\n")
    (out / "summary.json").write_text("{}")
    with claim_recipe_dir(out, "demo", overwrite=False):
        assert not (out / "summary.json").exists()
