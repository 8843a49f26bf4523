"""Multi-process training: two gloo processes on CPU compute the single-process update exactly,
and `torchrun` runs the CLI end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port

from grpo.config import TrainConfig, build
from grpo.data import load_rows
from grpo.engine.models import load_causal_lm, load_tokenizer
from grpo.rewards import build_rewards
from grpo.runtime.distributed import World
from grpo.runtime.optim import make_scheduler
from grpo.train.rollout import collect_rollout
from grpo.train.update import update


def config(model, dataset, **kw):
    return build(TrainConfig, dict(model=model, dataset=dataset, rewards=["exact_answer", "answer_distance"],
                                   prompts_per_step=4, group_size=4, max_completion_length=4,
                                   learning_rate=1e-3, beta=0.04, micro_batch_size=3, **kw))


def take(rollout, rows):
    """The rows of a rollout (a process's share of the batch)."""
    out = {}
    for f in dataclasses.fields(rollout):
        v = getattr(rollout, f.name)
        out[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
    return dataclasses.replace(rollout, **out)


def one_update(cfg, rollout, world):
    torch.manual_seed(0)
    policy = load_causal_lm(cfg.model, torch.device("cpu"), torch.float32)
    # Plain SGD: the weight change is the gradient itself (Adam's first step, ~lr * sign(g), would
    # turn float rounding in near-zero gradients into lr-sized differences).
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    update(policy, optimizer, make_scheduler(optimizer, cfg), rollout, cfg, world, torch.Generator().manual_seed(1))
    return policy.state_dict()


def worker(rank, port, cfg, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    world = World()
    rollout = torch.load(path, weights_only=False)
    half = len(rollout) // 2
    mine = take(rollout, torch.arange(rank * half, (rank + 1) * half))
    state = one_update(cfg, mine, world)
    if rank == 0:
        torch.save(state, out)
    world.close()


@pytest.mark.parametrize("masked_half", [False, True])
def test_two_processes_compute_the_single_process_update(tiny_model_dir, addition_files, tmp_path, masked_half):
    """masked_half: every token of the second process's rows is masked (as mask_truncated_completions
    does when all its completions are cut off), so it has no gradient of its own; it must still
    take part in the gradient sum instead of leaving the other process waiting."""
    cfg = config(tiny_model_dir, addition_files["train"])
    policy = load_causal_lm(cfg.model, torch.device("cpu"), torch.float32)
    reference = load_causal_lm(cfg.model, torch.device("cpu"), torch.float32, trainable=False)
    rows = load_rows(cfg.dataset)[:4]
    rollout = collect_rollout(policy, reference, load_tokenizer(cfg.model), rows,
                              build_rewards(cfg.rewards, None, None), cfg, torch.Generator().manual_seed(0))
    assert rollout.advantages.abs().sum() > 0
    if masked_half:
        rollout.completion_mask[len(rollout) // 2:] = 0
    torch.save(rollout, tmp_path / "rollout.pt")
    single = one_update(cfg, rollout, World())
    mp.spawn(worker, args=(free_port(), cfg, tmp_path / "rollout.pt", tmp_path / "dist.pt"), nprocs=2)
    dist = torch.load(tmp_path / "dist.pt")
    changed = 0
    for k in single:
        torch.testing.assert_close(dist[k], single[k], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(single[k], policy.state_dict()[k])
    assert changed > 0


def test_torchrun_cli(tiny_model_dir, addition_files, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "grpo.cli", "train", "--quiet", "--set", f"model={tiny_model_dir}",
           "--set", f"dataset={addition_files['train']}", "--set", f"output_dir={out}",
           "--set", "rewards=[exact_answer, answer_distance]", "--set", "prompts_per_step=2",
           "--set", "group_size=4", "--set", "max_completion_length=4", "--set", "max_steps=2",
           "--set", "num_threads=1", "--set", "save_steps=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-1" / "trainer_state.pt").is_file()
    state = torch.load(out / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and len(state["reward_states"]) == 2  # each process's own


def bucket_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    world = World()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), torch.nn.Linear(4, 2))
    for i, p in enumerate(model.parameters()):
        # Rank r's gradient of parameter i is (r + 1) * (i + 1); rank 1 has none for parameter 2,
        # and nobody has one for parameter 5.
        if i == 5 or (rank == 1 and i == 2):
            continue
        p.grad = torch.full_like(p, float((rank + 1) * (i + 1)))
    world.sum_gradients(model, bucket_bytes=200)  # several buckets, some holding several parameters
    if rank == 0:
        torch.save([None if p.grad is None else p.grad.clone() for p in model.parameters()], out)
    world.close()


def test_gradient_sum_in_buckets_equals_the_sum_of_each_gradient(tmp_path):
    mp.spawn(bucket_worker, args=(free_port(), tmp_path / "grads.pt"), nprocs=2)
    grads = torch.load(tmp_path / "grads.pt")
    for i, g in enumerate(grads):
        if i == 5:
            assert g is None  # no process had one: it stays without, as on one process
        else:
            expected = (i + 1) * (1 if i == 2 else 3)  # rank 0's alone where rank 1 had none
            assert torch.equal(g, torch.full_like(g, float(expected))), i


def average_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    world = World()
    # rank 1 alone logged "only_one" (a reward function's log_metric); "text" is not a float
    record = {"step": 3, "text": "x", "loss": float(rank + 1), **({"only_one": 5.0} if rank else {})}
    averaged = world.average_floats(record)
    if rank == 0:
        torch.save(averaged, out)
    world.close()


def test_metrics_are_averaged_over_the_processes_that_logged_them(tmp_path):
    mp.spawn(average_worker, args=(free_port(), tmp_path / "avg.pt"), nprocs=2)
    assert torch.load(tmp_path / "avg.pt") == {"step": 3, "text": "x", "loss": 1.5, "only_one": 5.0}
