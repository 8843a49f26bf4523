"""Per-process memory of one GRPO step: two processes sharded with FSDP2 (`fsdp: true`,
`grpo.runtime.sharding`) against one process, on the CPU with gloo.

    python -m bench.fsdp_memory                                   # Qwen2-0.5B's vocabulary and width
    python -m bench.fsdp_memory --layers 2 --vocab 512 --hidden 64 --intermediate 128 --heads 4 \\
        --kv-heads 2 --prompts 2 --group 2 --tokens 4                # a smoke run, seconds

The model has Qwen2-0.5B's shapes (151,936-token vocabulary, width 896, 14 query / 2 key-value
heads, MLP 4864, tied embeddings) with few layers, random weights and the character tokenizer.
One step as `grpo train` runs it: the rollout (P prompts x G completions of `--tokens` tokens,
forced to full length by an EOS that is never sampled, so every process does the same work;
pi_ref with beta 0.04), then the update (AdamW). The global batch is the same in every mode: one
process takes all P prompts, each of two processes P / 2; micro-batches are the same size.

Modes: `single` (one process, no sharding); `gathered` (two processes, FSDP2; each model is
unsharded once for its rollout passes, as `collect_rollout` does); `hooks` (two processes, FSDP2,
the rollout left to FSDP's per-layer hooks: every forward, each decode step included, all-gathers
one layer at a time; the generation runs the engine's plain path through `model(...)`).

Per process it prints the bytes it holds for the model state, counted from the tensors
(`sharding.local_bytes`: the policy's weights, gradients and AdamW moments, and the reference's
weights), and resident memory: after setup, the peak of the rollout and of the update (Linux's
high-water mark, reset at the start of each phase through /proc/self/clear_refs), and ru_maxrss of
the whole process. glibc is told to return every large free to the system (a fixed mmap
threshold), so a peak is what was live, not what the heap kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

from bench.common import reset_peak, rss

MiB = 2 ** 20


def worker(rank: int, world_size: int, mode: str, port: int, args, out: Path) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
    torch.set_num_threads(args.threads)

    import grpo.engine.backend
    import grpo.train.rollout
    from bench.common import addition_rows
    from grpo.config import TrainConfig
    from grpo.engine.models import load_causal_lm, load_tokenizer
    from grpo.rewards import build_rewards
    from grpo.runtime.distributed import World
    from grpo.runtime.optim import make_optimizer, make_scheduler
    from grpo.runtime.sharding import local_bytes, shard_model
    from grpo.train.update import update

    generate = grpo.engine.backend.generate_groups

    def full_length(*a, **k):
        k["eos_token_id"] = [-1]  # never sampled: every completion runs max_new_tokens on every process
        return generate(*a, **k, **({"engine": "plain"} if mode == "hooks" else {}))
    grpo.engine.backend.generate_groups = full_length
    if mode == "hooks":
        # The alternative measured here: nothing gathered up front, every forward through FSDP's
        # hooks; on leaving a pass every unit is resharded (a trained root would otherwise stay
        # gathered from its no-grad forward until the update's backward).
        @contextlib.contextmanager
        def per_layer(*models):
            from torch.distributed.fsdp import FSDPModule
            try:
                yield
            finally:
                for m in models:
                    for unit in (m.modules() if m is not None else ()):
                        if isinstance(unit, FSDPModule):
                            unit.reshard()
        grpo.train.rollout.gathered = per_layer

    world = World()
    cpu = torch.device("cpu")
    per_process = args.prompts // world_size
    cfg = TrainConfig(model=args.model, prompts_per_step=per_process, group_size=args.group,
                      max_completion_length=args.tokens, beta=0.04, micro_batch_size=args.micro_batch,
                      learning_rate=1e-6, max_prompt_length=4096, rewards=[{"function": "exact_answer"}])
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, cpu, torch.float32)
    reference = load_causal_lm(args.model, cpu, torch.float32, trainable=False)
    n_params = sum(p.numel() for p in policy.parameters())
    with torch.no_grad():  # from_pretrained leaves CPU weights mapped from the file until first
        for p in [*policy.parameters(), *reference.parameters()]:  # read: resident from the start
            p.data = p.data.clone()
    if mode != "single":
        policy = shard_model(policy, world, torch.float32)
        reference = shard_model(reference, world, torch.float32)
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    rewards = build_rewards(cfg.rewards, None, None)
    rows = addition_rows(args.prompts)[rank * per_process:(rank + 1) * per_process]
    generator = torch.Generator().manual_seed(rank)

    result = {"mode": mode, "rank": rank, "processes": world_size, "parameters": n_params,
              "rss_setup": rss("VmRSS")}
    reset_peak()
    rollout = grpo.train.rollout.collect_rollout(policy, reference, tokenizer, rows, rewards, cfg, generator,
                                                 gather=world.gather if world_size > 1 else None)
    result["peak_rollout"] = rss("VmHWM")
    reset_peak()
    update(policy, optimizer, scheduler, rollout, cfg, world, generator)
    result["peak_update"] = rss("VmHWM")
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["state"] = local_bytes(policy, optimizer)
    result["state"]["reference"] = local_bytes(reference)["parameters"]
    result["completion_tokens"] = int(rollout.completion_mask.sum())
    (out / f"{mode}-{rank}.json").write_text(json.dumps(result))
    world.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results: list[dict]) -> str:
    single = next((r for r in results if r["mode"] == "single"), None)
    head = ("| mode | process | policy weights + grads + AdamW MiB | reference MiB | bytes / parameter | "
            "RSS after setup MiB | rollout peak MiB | update peak MiB | ru_maxrss MiB | vs one process |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        s = r["state"]
        policy = s["parameters"] + s["gradients"] + s["optimizer"]
        ratio = f"{r['ru_maxrss'] / single['ru_maxrss']:.2f}" if single else "-"
        lines.append(f"| {r['mode']} | {r['rank']} of {r['processes']} | {policy / MiB:,.0f} "
                     f"| {s['reference'] / MiB:,.0f} "
                     f"| {(policy + s['reference']) / r['parameters']:.2f} | {r['rss_setup'] / MiB:,.0f} "
                     f"| {r['peak_rollout'] / MiB:,.0f} | {r['peak_update'] / MiB:,.0f} | {r['ru_maxrss'] / MiB:,.0f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    import torch.multiprocessing as mp

    from bench.common import save_qwen2

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8, help="prompts of the global batch (even)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward")
    p.add_argument("--threads", type=int, default=1)
    # `hooks` ran before the chunked LM head (which a 151,936-token vocabulary gets by default): that
    # head runs on the root unit's weights outside the model's forward, where per-layer hooks have
    # resharded them, so the mode now stops with a DTensor error; it is kept for models whose head
    # is not chunked (--vocab under 65,536).
    p.add_argument("--modes", nargs="+", default=["single", "gathered"], choices=["single", "gathered", "hooks"])
    p.add_argument("--model", default="", help="a saved model directory (default: build one)")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if args.prompts % 2:
        p.error("--prompts must be even (two processes share them)")
    # Every large free goes back to the system at once, so resident memory follows live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.model:
            args.model = str(save_qwen2(tmp / "model", hidden_size=args.hidden, num_layers=args.layers,
                                        num_heads=args.heads, num_kv_heads=args.kv_heads,
                                        intermediate_size=args.intermediate, vocab_size=args.vocab,
                                        max_positions=4096))
        results = []
        for mode in args.modes:
            n = 1 if mode == "single" else 2
            mp.spawn(worker, args=(n, mode, free_port(), args, tmp), nprocs=n)
            results += [json.loads((tmp / f"{mode}-{r}.json").read_text()) for r in range(n)]
    print(f"One GRPO step, {args.prompts} prompts x {args.group} completions x {args.tokens} tokens, "
          f"{results[0]['parameters'] / 1e6:.1f}M parameters ({args.layers} layers, vocabulary {args.vocab}, "
          f"width {args.hidden}, tied), float32 on the CPU, beta 0.04, AdamW:\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
