"""FSDP2 sharding (`grpo.runtime.sharding`, `grpo.runs.sharded_checkpoint`): two gloo processes on
CPU against one process.

One spawn of two processes (module fixture `two_processes`) runs every scenario and saves what it
saw; the tests compare that with the same work done here on one unsharded process:

- generation and the pi_ref pass inside `gathered` on the sharded models draw the same tokens and
  log-probs as the unsharded model (the engine calls submodules FSDP's hooks never see, and the
  two processes generate different numbers of tokens);
- `update` on each process's half of a fixed batch: the summed loss, every gradient (gathered
  whole) and the weights after one AdamW step equal one process's update on the whole batch;
  also when every token of one process's half is masked out;
- each process holds half of the parameter, gradient and AdamW bytes;
- a sharded checkpoint, saved, loaded into fresh models and continued, gives bit-identical weights
  to never stopping; the gathered `save_pretrained` directory loads in plain transformers and
  holds the trained weights.
"""

import dataclasses
import errno
import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port

from grpo.config import TrainConfig, build
from grpo.data import PromptSampler, load_rows
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import load_causal_lm, load_tokenizer
from grpo.errors import RunError
from grpo.rewards import build_rewards
from grpo.runs.checkpoint import latest_checkpoint, rng_state, train_state
from grpo.runtime.distributed import World
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.runtime.precision import Precision
from grpo.runtime.sharding import local_bytes
from grpo.train.rollout import collect_rollout
from grpo.train.update import update

P, G = 4, 4          # prompts and completions per prompt of the whole batch (2 prompts per process)
CPU = torch.device("cpu")


def config(model, dataset, **kw):
    # micro_batch_size = one process's rows: one process's two micro-batches are the two halves.
    # No clipping: the clip coefficient would be computed from the norm in a different order.
    return build(TrainConfig, dict(model=model, dataset=dataset, rewards=["exact_answer", "answer_distance"],
                                   prompts_per_step=P // 2, group_size=G, max_completion_length=6,
                                   learning_rate=1e-3, beta=0.04, micro_batch_size=P * G // 2,
                                   max_grad_norm=0.0, weight_decay=0.1, **kw))


def take(rollout, rows):
    out = {f.name: getattr(rollout, f.name)[rows] if isinstance(getattr(rollout, f.name), torch.Tensor)
           else getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
    return dataclasses.replace(rollout, **out)


def cat(a, b):
    out = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        out[f.name] = torch.cat([x, y]) if isinstance(x, torch.Tensor) else \
            {k: torch.cat([x[k], y[k]]) for k in x} if isinstance(x, dict) and f.name != "timings" else \
            x + y if isinstance(x, list) else x
    return dataclasses.replace(a, **out)


def half_rollout(policy, reference, tokenizer, rows, cfg, rank):
    """Process `rank`'s share of the batch: its two prompts, its own generator, and its own
    completion length (6 and 4 tokens: the two processes run different numbers of forwards)."""
    cfg = dataclasses.replace(cfg, max_completion_length=6 - 2 * rank)
    return collect_rollout(policy, reference, tokenizer, rows[2 * rank:2 * rank + 2],
                           build_rewards(cfg.rewards, None, None), cfg, torch.Generator().manual_seed(100 + rank))


def one_update(policy, cfg, rollout, world):
    optimizer = make_optimizer(policy, cfg)
    stats = update(policy, optimizer, make_scheduler(optimizer, cfg), rollout, cfg, world,
                   torch.Generator().manual_seed(1))
    return stats, optimizer


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads_and_weights(policy):
    return ({n: full(p.grad).clone() for n, p in policy.named_parameters()},
            {n: full(p.detach()).clone() for n, p in policy.named_parameters()})


def train_steps(policy, reference, optimizer, scheduler, sampler, generator, rows, cfg, world, steps):
    """`grpo train`'s step, sharded: the rollout gathers each model for its passes, the update
    runs through FSDP's hooks."""
    tokenizer, rewards = load_tokenizer(cfg.model), build_rewards(cfg.rewards, None, None)
    completions = []
    for _ in range(steps):
        indices = sampler.next(cfg.prompts_per_step * world.size)
        mine = indices[world.rank * cfg.prompts_per_step:(world.rank + 1) * cfg.prompts_per_step]
        rollout = collect_rollout(policy, reference, tokenizer, [rows[i] for i in mine], rewards, cfg, generator,
                                  gather=world.gather)
        update(policy, optimizer, scheduler, rollout, cfg, world, generator)
        completions.append(rollout.completion_ids)
    return completions


def plain_logprob_sum(model, rollout):
    """Sum of the scored log-probs through `model(...)` (the path FSDP's hooks see whole)."""
    logprobs, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.completion_mask, engine="plain")
    return (logprobs * rollout.completion_mask).sum()


def fresh_run(cfg, world, seed):
    from grpo.runtime.sharding import shard_model

    policy = shard_model(load_causal_lm(cfg.model, CPU, torch.float32), world, torch.float32)
    reference = shard_model(load_causal_lm(cfg.model, CPU, torch.float32, trainable=False), world, torch.float32)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, 3 * cfg.num_iterations)
    return policy, reference, optimizer, scheduler, PromptSampler(64, cfg.seed), torch.Generator().manual_seed(seed)


def worker(rank, port, cfg, tied_cfg, batch, out):
    from grpo.runs.sharded_checkpoint import (restore_sharded_train_state, save_gathered_pretrained,
                                              save_sharded_checkpoint)
    from grpo.runtime.sharding import gathered, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    # A collective one process never joins fails within a minute instead of hanging the suite.
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    world = World()
    seen = {}
    half = torch.arange(rank * P * G // 2, (rank + 1) * P * G // 2)
    tokenizer = load_tokenizer(cfg.model)
    rows = load_rows(cfg.dataset)[:P]

    # Generation and the reference pass on the sharded models.
    policy = shard_model(load_causal_lm(cfg.model, CPU, torch.float32), world, torch.float32)
    reference = shard_model(load_causal_lm(cfg.model, CPU, torch.float32, trainable=False), world, torch.float32)
    with gathered(policy, reference):
        assert not any(hasattr(p, "full_tensor") for p in policy.parameters())  # plain tensors inside
        assert not torch.is_grad_enabled()  # a gradient there would be lost at the reshard
    assert all(hasattr(p, "full_tensor") for p in policy.parameters())          # sharded again after
    seen["rollout"] = half_rollout(policy, reference, tokenizer, rows, cfg, rank)  # gathers each model itself

    # The update on this process's half of the fixed batch.
    stats, optimizer = one_update(policy, cfg, take(batch, half), world)
    seen["loss"] = stats["loss"]
    seen["grads"], seen["weights"] = grads_and_weights(policy)
    seen["bytes"] = local_bytes(policy, optimizer)
    masked = take(batch, half)
    if rank == 1:
        masked.completion_mask = torch.zeros_like(masked.completion_mask)
    policy = shard_model(load_causal_lm(cfg.model, CPU, torch.float32), world, torch.float32)
    stats, _ = one_update(policy, cfg, masked, world)
    seen["masked_loss"] = stats["loss"]
    seen["masked_grads"], _ = grads_and_weights(policy)

    # The plain `model(...)` forward, with grad, in float32 and with bfloat16 compute.
    for dtype in (torch.float32, torch.bfloat16):
        policy = shard_model(load_causal_lm(cfg.model, CPU, torch.float32), world, dtype)
        with Precision(CPU, dtype).autocast():
            if dtype == torch.bfloat16:
                with gathered(policy):
                    seen["gathered_dtype"] = next(policy.parameters()).dtype
            plain_logprob_sum(policy, take(batch, half)).backward()
        seen[f"plain_grads_{dtype}"], _ = grads_and_weights(policy)
        seen[f"master_dtypes_{dtype}"] = {(p.dtype, p.grad.dtype) for p in policy.parameters()}

    # Checkpoint, resume, continue (tied embeddings, like Qwen2-0.5B), then the gathered model.
    rows = load_rows(tied_cfg.dataset)[:64]
    run = fresh_run(tied_cfg, world, seed=7 + rank)
    train_steps(*run, rows, tied_cfg, world, steps=1)
    policy, _, optimizer, scheduler, sampler, generator = run
    state = train_state(1, optimizer, scheduler, Precision(CPU, torch.float32), sampler, {},
                        world.gather_objects(rng_state(generator)), {})
    save_sharded_checkpoint(out / "run", 1, policy, optimizer, tokenizer, state, world)

    class FullDisk:  # rank 0's part of the next checkpoint fails as a full disk would
        def save_pretrained(self, directory):
            raise OSError(errno.ENOSPC, "No space left on device")
    try:
        save_sharded_checkpoint(out / "run", 2, policy, optimizer, FullDisk() if rank == 0 else tokenizer, state, world)
    except RunError as e:  # on every process, none left waiting at a barrier
        seen["full_disk"] = str(e)
    seen["continued_completions"] = train_steps(*run, rows, tied_cfg, world, steps=2)
    _, seen["continued"] = grads_and_weights(policy)
    save_gathered_pretrained(policy, tokenizer, out / "final", world)

    run = fresh_run(tied_cfg, world, seed=999)  # other RNG streams: the checkpoint's must win
    policy, _, optimizer, scheduler, sampler, generator = run
    state = restore_sharded_train_state(latest_checkpoint(out / "run"), policy, optimizer, scheduler,
                                        Precision(CPU, torch.float32), sampler, generator, rank)
    seen["resumed_step"] = state["step"]
    seen["resumed_completions"] = train_steps(*run, rows, tied_cfg, world, steps=2)
    _, seen["resumed"] = grads_and_weights(policy)
    torch.save(seen, out / f"rank{rank}.pt")
    world.close()


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, addition_files, tmp_path_factory):
    """Everything the two processes saw, and the batch they split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("sharding")
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True))
    tied.save_pretrained(out / "tied")
    tokenizer.save_pretrained(out / "tied")
    cfg = config(tiny_model_dir, addition_files["train"])
    tied_cfg = config(str(out / "tied"), addition_files["train"], warmup_steps=2, num_iterations=2)  # pi_old too
    rows = load_rows(cfg.dataset)[:P]
    policy = load_causal_lm(cfg.model, CPU, torch.float32)
    reference = load_causal_lm(cfg.model, CPU, torch.float32, trainable=False)
    halves = [half_rollout(policy, reference, tokenizer, rows, cfg, r) for r in (0, 1)]
    # One batch for both processes (column-padded alike), so that each half is a process's share.
    T = max(h.completion_ids.shape[1] for h in halves)
    for h in halves:
        pad = T - h.completion_ids.shape[1]
        h.completion_ids = torch.nn.functional.pad(h.completion_ids, (0, pad), value=tokenizer.pad_token_id)
        for name in ("completion_mask", "old_logprobs", "ref_logprobs", "sampling_logprobs"):
            if getattr(h, name) is not None:
                setattr(h, name, torch.nn.functional.pad(getattr(h, name), (0, pad)))
    batch = cat(*halves)
    # A reference that is not the policy, so the KL term and its gradient are not zero.
    batch.ref_logprobs = batch.ref_logprobs + 0.3 * torch.randn(batch.ref_logprobs.shape,
                                                                generator=torch.Generator().manual_seed(3))
    assert batch.advantages.abs().sum() > 0 and batch.completion_mask.sum() > 0
    mp.spawn(worker, args=(free_port(), cfg, tied_cfg, batch, out), nprocs=2)
    seen = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return dict(seen=seen, cfg=cfg, tied_cfg=tied_cfg, batch=batch, halves=halves, out=out)


def test_a_full_disk_while_saving_a_sharded_checkpoint_stops_every_process_and_keeps_the_last(two_processes):
    for rank in (0, 1):
        message = two_processes["seen"][rank]["full_disk"]
        assert "could not write checkpoint-2" in message and "the last complete checkpoint is checkpoint-1" in message
    assert "No space left on device" in two_processes["seen"][0]["full_disk"]
    assert not (two_processes["out"] / "run" / ".tmp-checkpoint-2").exists()
    assert not (two_processes["out"] / "run" / "checkpoint-2").exists()


def single_update(cfg, batch):
    policy = load_causal_lm(cfg.model, CPU, torch.float32)
    stats, optimizer = one_update(policy, cfg, batch, World(distributed=False))
    return stats, optimizer, policy


@pytest.fixture(scope="module")
def single(two_processes):
    cfg, batch = two_processes["cfg"], two_processes["batch"]
    stats, optimizer, policy = single_update(cfg, batch)
    grads, weights = grads_and_weights(policy)
    return dict(loss=stats["loss"], grads=grads, weights=weights, bytes=local_bytes(policy, optimizer),
                initial=load_causal_lm(cfg.model, CPU, torch.float32).state_dict())


def test_generation_and_reference_pass_on_the_sharded_model(two_processes):
    for rank in (0, 1):
        got, want = two_processes["seen"][rank]["rollout"], two_processes["halves"][rank]
        T = got.completion_ids.shape[1]
        assert torch.equal(got.completion_ids, want.completion_ids[:, :T])  # the same tokens drawn
        m = got.completion_mask.bool()  # log-probs are only defined there
        torch.testing.assert_close(got.ref_logprobs[m], want.ref_logprobs[:, :T][m], rtol=1e-5, atol=1e-6)
    steps = [two_processes["seen"][r]["rollout"].completion_ids.shape[1] for r in (0, 1)]
    assert steps == [6, 4]  # the processes ran different numbers of decode steps


def test_sharded_update_computes_the_single_process_loss_and_gradients(two_processes, single):
    seen = two_processes["seen"]
    assert abs(single["loss"]) > 1e-3  # the KL term: not the ~0 of a ratio-1 surrogate alone
    torch.testing.assert_close(seen[0]["loss"] + seen[1]["loss"], single["loss"], rtol=1e-6, atol=0.0)
    assert seen[0]["grads"].keys() == single["grads"].keys()
    for name, g in single["grads"].items():
        assert g.abs().max() > 0, name
        for rank in (0, 1):
            torch.testing.assert_close(seen[rank]["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_sharded_adamw_step_is_the_single_process_step(two_processes, single):
    """The step on the shards (decay and no-decay groups, lr schedule) moves every weight as one
    process's AdamW does with the same gradient. (Compared from the same gradient because Adam's
    first step is ~lr * sign(g): a gradient within rounding of 0 could move either way.)"""
    cfg, seen = two_processes["cfg"], two_processes["seen"][0]
    policy = load_causal_lm(cfg.model, CPU, torch.float32)
    optimizer = make_optimizer(policy, cfg)
    make_scheduler(optimizer, cfg)
    for name, p in policy.named_parameters():
        p.grad = seen["grads"][name].clone()
    optimizer.step()
    for name, p in policy.named_parameters():
        assert not torch.equal(p.detach(), single["initial"][name]), name  # every parameter moved
        for rank in (0, 1):
            torch.testing.assert_close(two_processes["seen"][rank]["weights"][name], p.detach(), rtol=1e-6,
                                       atol=1e-8, msg=name)


def test_a_process_whose_tokens_are_all_masked_still_joins_the_reduce_scatter(two_processes):
    """Process 1 has nothing to score; it must run its forward and backward anyway (each is a
    collective), and the gradient is process 0's half alone, as on one process."""
    cfg, batch = two_processes["cfg"], two_processes["batch"]
    masked = dataclasses.replace(batch, completion_mask=batch.completion_mask.clone())
    masked.completion_mask[P * G // 2:] = 0
    stats, _, policy = single_update(cfg, masked)
    seen = two_processes["seen"]
    assert seen[1]["masked_loss"] == 0.0
    torch.testing.assert_close(seen[0]["masked_loss"], stats["loss"], rtol=1e-6, atol=1e-7)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(seen[0]["masked_grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_plain_forward_gradients_in_float32_and_bfloat16_compute(two_processes):
    """Through `model(...)`: float32 equals one process; bfloat16 compute (FSDP's mixed precision
    policy) gathers bf16 weights, reduces float32 gradients into float32 master shards, and is
    within bf16 rounding of the float32 gradient."""
    cfg, batch, seen = two_processes["cfg"], two_processes["batch"], two_processes["seen"]
    policy = load_causal_lm(cfg.model, CPU, torch.float32)
    plain_logprob_sum(policy, batch).backward()
    assert seen[0]["gathered_dtype"] == torch.bfloat16
    for dtype in (torch.float32, torch.bfloat16):
        assert seen[0][f"master_dtypes_{dtype}"] == {(torch.float32, torch.float32)}
    errors = []
    for name, p in policy.named_parameters():
        for rank in (0, 1):
            torch.testing.assert_close(seen[rank][f"plain_grads_{torch.float32}"][name], p.grad, rtol=1e-5,
                                       atol=1e-6, msg=name)
        bf16 = seen[0][f"plain_grads_{torch.bfloat16}"][name]
        errors.append(float((bf16 - p.grad).norm() / p.grad.norm()))
    assert max(errors) < 0.05 and min(errors) > 0, errors  # bf16 rounding: not the fp32 numbers, but near


def test_each_process_holds_half_the_parameter_gradient_and_optimizer_bytes(two_processes, single):
    one = single["bytes"]
    assert one["parameters"] == one["gradients"] and one["optimizer"] == 2 * one["parameters"]  # fp32, AdamW m and v
    for rank in (0, 1):
        mine = two_processes["seen"][rank]["bytes"]
        for kind in ("parameters", "gradients", "optimizer"):
            assert abs(mine[kind] / one[kind] - 0.5) < 0.02, (rank, kind, mine[kind], one[kind])
    for kind in ("parameters", "gradients", "optimizer"):  # shards without padding: they add up exactly
        assert sum(two_processes["seen"][r]["bytes"][kind] for r in (0, 1)) == one[kind]


def test_sharded_checkpoint_resumes_bit_exactly(two_processes):
    for rank in (0, 1):
        seen = two_processes["seen"][rank]
        assert seen["resumed_step"] == 1
        for a, b in zip(seen["resumed_completions"], seen["continued_completions"]):
            assert torch.equal(a, b)  # the RNG streams came back too
        for name, w in seen["continued"].items():
            assert torch.equal(seen["resumed"][name], w), name
    run = two_processes["out"] / "run"
    assert [p.name for p in run.iterdir()] == ["checkpoint-1"]  # no temporary directory left
    assert (run / "checkpoint-1" / "sharded" / ".metadata").is_file()


def test_gathered_model_loads_in_plain_transformers(two_processes):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two_processes["out"] / "final")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    trained = two_processes["seen"][0]["continued"]
    state = dict(model.named_parameters())
    assert state.keys() == trained.keys()
    initial = load_causal_lm(two_processes["tied_cfg"].model, CPU, torch.float32).state_dict()
    for name, w in trained.items():
        assert torch.equal(state[name].detach(), w), name
        assert not torch.equal(w, initial[name]), name  # trained, not the starting weights
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_resuming_an_unsharded_checkpoint_with_fsdp_is_a_config_error(tmp_path):
    from grpo.errors import ConfigError
    from grpo.runs.sharded_checkpoint import restore_sharded_train_state

    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="fsdp: .*checkpoint-3 holds no sharded/"):
        restore_sharded_train_state(tmp_path / "checkpoint-3", None, None, None, None, None, None, 0)
