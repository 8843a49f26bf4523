"""A checkpoint is an input like any other: it may come from someone else, or be cut short or
damaged on disk. Whatever is wrong with it, `--resume` (and every other load of a checkpoint)
stops with one RunError naming the file, runs nothing a file carries, and never shows a
traceback of ours; a checkpoint grpo writes always loads with torch's safe unpickler.
"""

import io
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo.cli import main
from grpo.errors import RunError
from grpo.runs.checkpoint import (STATE_FILE, NotStorable, load_state, load_weights, restore_rng, rng_state,
                                  save_checkpoint, storable)


def train_args(tiny_model_dir, addition_files, out, **kw):
    sets = dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=out,
                rewards="[answer_distance]", prompts_per_step=2, group_size=4, max_completion_length=4,
                max_steps=2, learning_rate=1e-3, max_prompt_length=16, report_to="[]", save_steps=1)
    sets.update(kw)
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, addition_files, tmp_path_factory):
    """A finished two-step run that kept checkpoint-1."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(["train", "--quiet", *train_args(tiny_model_dir, addition_files, out)]) == 0
    assert (out / "checkpoint-1" / STATE_FILE).is_file()
    return out


def copy_of(saved_run, tmp_path) -> tuple[Path, Path]:
    """A run directory holding only checkpoint-1 of the saved run (as an interrupted run leaves it)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(saved_run / "checkpoint-1", out / "checkpoint-1")
    return out, out / "checkpoint-1"


def resume_fails(tiny_model_dir, addition_files, out, capsys, *expected) -> str:
    assert main(["train", "--quiet", "--resume", *train_args(tiny_model_dir, addition_files, out)]) == 2
    err = capsys.readouterr().err
    ours = [l for l in err.splitlines() if l.startswith("grpo")]  # another library's line must not count
    assert "Traceback" not in err and len(ours) == 1, err
    for text in expected:
        assert text in err, err
    return err


class Marker:
    """A pickle that, loaded unsafely, creates a file: what a crafted checkpoint could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


# ----------------------------------------------------------------------------------------------
# trainer_state.pt is read with the safe unpickler only


def test_a_trainer_state_carrying_code_is_refused_and_never_run(saved_run, tiny_model_dir, addition_files, tmp_path,
                                                               capsys):
    out, checkpoint = copy_of(saved_run, tmp_path)
    marker = tmp_path / "ran"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    torch.save({**state, "best": Marker(marker)}, checkpoint / STATE_FILE)
    err = resume_fails(tiny_model_dir, addition_files, out, capsys, str(checkpoint / STATE_FILE),
                       "(exec)", "cannot be loaded safely")
    assert "older grpo" in err
    # A plain pickle (not torch's zip format) is refused the same way.
    (checkpoint / STATE_FILE).write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(RunError, match="trainer_state.pt"):
        load_state(checkpoint)
    assert not marker.exists()
    assert not (out / "model.safetensors").exists()  # nothing trained, nothing written


def test_a_state_from_an_older_format_is_refused_not_loaded_unsafely(tmp_path):
    # What an older grpo could have pickled beside the tensors: NumPy numbers in a reward's state.
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    torch.save({"step": 1, "reward_states": [{"r": {"mean": np.float64(0.5)}}]}, checkpoint / STATE_FILE)
    with pytest.raises(RunError, match=r"from an older grpo.*cannot be loaded safely") as e:
        load_state(checkpoint)
    assert "numpy" in str(e.value) and str(checkpoint / STATE_FILE) in str(e.value)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not_a_dict", "no_optimizer", "bad_step",
                                    "bad_sampler", "bad_rng", "foreign_optimizer", "bad_scheduler"])
def test_a_damaged_trainer_state_is_one_run_error_naming_it(saved_run, tiny_model_dir, addition_files, tmp_path,
                                                            capsys, damage):
    out, checkpoint = copy_of(saved_run, tmp_path)
    path = checkpoint / STATE_FILE
    data = path.read_bytes()
    state = torch.load(path, weights_only=True)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    else:
        changes = {"not_a_dict": None, "no_optimizer": {"optimizer": "gone"}, "bad_step": {"step": "2"},
                   "bad_sampler": {"sampler": {"epoch": 0}}, "bad_rng": {"rng": [{"python": 1}]},
                   "foreign_optimizer": {"optimizer": {"state": {}, "param_groups": [{"params": [0]}]}},
                   "bad_scheduler": {"scheduler": {"last_epoch": "x", "_step_count": None, "base_lrs": 3}}}[damage]
        torch.save([1, 2] if changes is None else {**state, **changes}, path)
    resume_fails(tiny_model_dir, addition_files, out, capsys, str(path))


def test_a_checkpoint_grpo_writes_loads_with_the_safe_unpickler(saved_run):
    state = torch.load(saved_run / "checkpoint-1" / STATE_FILE, weights_only=True)
    assert state["step"] == 1 and isinstance(state["rng"][0]["python"], tuple)
    assert load_state(saved_run / "checkpoint-1")["step"] == 1


def test_storable_makes_the_state_safe_to_load_or_refuses_it_when_saving(tmp_path, tiny_model_dir):
    Point = namedtuple("Point", "x y")
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).state_dict()
    state = {"numpy": np.float32(1.5), "array": np.arange(3), "named": Point(1, 2), "module": module,
             "rng": rng_state(torch.Generator()), "set": {1, 2}, "dtype": torch.bfloat16}
    buffer = io.BytesIO()
    torch.save(storable(state), buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    assert back["numpy"] == 1.5 and torch.equal(back["array"], torch.arange(3)) and back["named"] == (1, 2)
    assert back["set"] == {1, 2} and back["dtype"] is torch.bfloat16
    # A module's state_dict keeps its order and the versions load_state_dict reads.
    assert list(back["module"]) == list(module) and back["module"]._metadata == module._metadata
    assert back["rng"]["python"] == state["rng"]["python"]

    with pytest.raises(NotStorable, match=r"the trainer state\['reward_states'\]\[0\]\['r'\] is a .*Marker"):
        storable({"reward_states": [{"r": Marker(tmp_path / "x")}]}, "the trainer state")
    # save_checkpoint refuses it before writing anything: the last complete checkpoint stays the last.
    from grpo.engine.models import load_causal_lm, load_tokenizer
    model = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    with pytest.raises(RunError, match=r"could not write checkpoint-3.*Marker.*no checkpoint was saved"):
        save_checkpoint(tmp_path, 3, model, load_tokenizer(tiny_model_dir), {"best": Marker(tmp_path / "x")})
    assert not list(tmp_path.glob("*checkpoint-3"))


def test_a_process_the_checkpoint_has_no_rng_for_keeps_its_own_streams(tmp_path):
    saved = torch.Generator().manual_seed(1)
    state = {"rng": [rng_state(saved)]}
    mine = torch.Generator().manual_seed(2)
    expected = torch.Generator().manual_seed(2).get_state()
    restore_rng(state, mine, 1, tmp_path)  # rank 1 of a run saved from one process
    assert torch.equal(mine.get_state(), expected)
    restore_rng(state, mine, 0, tmp_path)
    assert torch.equal(mine.get_state(), saved.get_state())


# ----------------------------------------------------------------------------------------------
# The weights


@pytest.mark.parametrize("damage", ["empty", "truncated", "missing"])
def test_damaged_weights_in_a_checkpoint_are_one_run_error_naming_the_file(saved_run, tiny_model_dir, addition_files,
                                                                           tmp_path, capsys, damage):
    out, checkpoint = copy_of(saved_run, tmp_path)
    weights = checkpoint / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        resume_fails(tiny_model_dir, addition_files, out, capsys, str(checkpoint), "holds no loadable model")
        return
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[:len(data) - 100])
    resume_fails(tiny_model_dir, addition_files, out, capsys, str(weights), "not a valid safetensors file")


def test_a_truncated_adapter_is_one_run_error_before_anything_loads(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "best-model"
    checkpoint.mkdir()
    save_file({"a": torch.zeros(64)}, str(checkpoint / "adapter_model.safetensors"))
    data = (checkpoint / "adapter_model.safetensors").read_bytes()
    (checkpoint / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(RunError, match=r"adapter_model.safetensors is not a valid safetensors file"):
        load_weights(checkpoint, policy=None)


def test_weights_that_do_not_fit_the_policy_are_one_run_error(saved_run, tiny_model_dir):
    from grpo.engine.models import load_causal_lm
    policy = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    policy.resize_token_embeddings(policy.config.vocab_size + 8)
    with pytest.raises(RunError, match=r"checkpoint-1's weights do not fit this run's model"):
        load_weights(saved_run / "checkpoint-1", policy)


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints: DCP's index is a pickle too


@pytest.fixture
def shards(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    checkpoint = tmp_path / "checkpoint-1"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(checkpoint / "sharded"))
    return checkpoint, model


def fresh_model_state():
    torch.manual_seed(1)
    return {"model": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).state_dict()}


def test_sharded_weights_load_through_the_safe_index_reader(shards):
    from grpo.runs.sharded_checkpoint import _load_shards

    checkpoint, model = shards
    target = fresh_model_state()
    _load_shards(target, checkpoint)
    assert all(torch.equal(target["model"][k], v) for k, v in model.state_dict().items())


def test_a_sharded_index_carrying_code_is_refused_and_never_run(shards, tmp_path):
    from grpo.runs.sharded_checkpoint import _load_shards

    checkpoint, _ = shards
    marker = tmp_path / "ran"
    (checkpoint / "sharded" / ".metadata").write_bytes(pickle.dumps(Marker(marker)))
    with pytest.raises(RunError, match=r"sharded/\.metadata is not a readable checkpoint index.*builtins\.exec"):
        _load_shards(fresh_model_state(), checkpoint)
    assert not marker.exists()
    # A dotted name reaching a function through an allowed module is refused too.
    # pathlib.Path.write_text(PosixPath(marker), "hi"), which plain pickle.loads runs.
    crafted = b"\x80\x04cpathlib\nPath.write_text\n(cpathlib\nPosixPath\n(V" + str(marker).encode() + b"\ntRVhi\ntR."
    (checkpoint / "sharded" / ".metadata").write_bytes(crafted)
    with pytest.raises(RunError, match=r"refers to pathlib\.Path\.write_text"):
        _load_shards(fresh_model_state(), checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["index", "shard"])
def test_damaged_shards_are_one_run_error_naming_them(shards, damage):
    from grpo.runs.sharded_checkpoint import _load_shards

    checkpoint, _ = shards
    file = checkpoint / "sharded" / ".metadata" if damage == "index" else \
        next((checkpoint / "sharded").glob("*.distcp"))
    file.write_bytes(file.read_bytes()[:20])
    with pytest.raises(RunError, match=r"sharded"):
        _load_shards(fresh_model_state(), checkpoint)


@pytest.mark.parametrize("damage", ["garbage", "binary", "not_an_object", "no_config"])
def test_a_damaged_run_record_is_one_run_error_naming_it(saved_run, tiny_model_dir, addition_files, tmp_path, capsys,
                                                         damage):
    out, checkpoint = copy_of(saved_run, tmp_path)
    path = checkpoint / "run.json"
    path.write_bytes({"garbage": b"{not json", "binary": b"\xff\xfe\x00garbage", "not_an_object": b"[1, 2]",
                      "no_config": b'{"data": {}}'}[damage])
    resume_fails(tiny_model_dir, addition_files, out, capsys, str(path))
