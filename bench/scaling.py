"""How a GRPO step grows with group size, completion length and prompt length.

    .venv/bin/python -m bench.scaling [--trl-python .venv-bench/bin/python] [--model-size 1m]

4 prompts per step, one update per rollout, beta 0.04, fp32, 2 threads, the ~1M model. Every
completion runs its full length (EOS is never sampled) so that the length axis means what it says.
Axes, one varied at a time from (G=8, T=16, addition prompts of ~6 tokens):
  group size G in 4, 8, 16, 32;  completion length T in 16, 64, 256;
  prompt length Lp in 8, 128, 512 (with G=8, T=64: the long-shared-prompt case).
On the prompt axis each point also runs ours with the plain HF-cache decode loop and TRL (when
--trl-python is given), to show where the prompt's cost goes: the group engine keeps one copy of
the prompt's keys/values per group and prefills P rows, not P*G.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench.bench_vs_trl import run_worker, summarise
from bench.common import build_models


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="1m")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--trl-python", default="", help="also run TRL on the prompt-length axis")
    ap.add_argument("--axes", nargs="+", default=["group", "tokens", "prompt"])
    ap.add_argument("--generation", default="sample", choices=["sample", "beam"],
                    help="ours: sampled groups, or beam search of width G (then TRL is not run)")
    args = ap.parse_args(argv)
    model = str(build_models(Path(args.models_dir), [args.model_size])[args.model_size])

    points = []  # (axis, value, G, T, Lp, system, engine)
    if "group" in args.axes:
        points += [("G", g, g, 16, 0, "ours", "auto") for g in (4, 8, 16, 32)]
    if "tokens" in args.axes:
        points += [("T", t, 8, t, 0, "ours", "auto") for t in (16, 64, 256)]
    if "prompt" in args.axes:
        for lp in (8, 128, 512):
            points.append(("Lp", lp, 8, 64, lp, "ours", "auto"))
            points.append(("Lp", lp, 8, 64, lp, "ours", "plain"))
            if args.trl_python and args.generation == "sample":
                points.append(("Lp", lp, 8, 64, lp, "trl", ""))

    print("| axis | value | G | T | prompt | system | median s/step | generation s | of which prefill s "
          "| logprobs s | update s | completion tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for axis, value, G, T, Lp, system, engine in points:
        extra = ["--model", model, "--group", str(G), "--tokens", str(T), "--prompt-len", str(Lp),
                 "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                 "--full-length"]
        if system == "ours":
            extra += ["--engine", engine, "--generation", args.generation]
        py = args.python if system == "ours" else args.trl_python
        res = run_worker(py, system, extra)
        s = summarise([res])
        prefill = statistics.median(st["prefill"] for st in res["steps"]) if system == "ours" else float("nan")
        name = f"ours ({'group engine' if engine == 'auto' else 'plain loop'})" if system == "ours" else "TRL"
        print(f"| {axis} | {value} | {G} | {T} | {Lp or '~6'} | {name} | {s['median']:.3f} | "
              f"{s['generation']:.3f} | {prefill:.3f} | {s['logprobs']:.3f} | {s['update']:.3f} | "
              f"{s['tokens_per_s']:.0f} | {s['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
