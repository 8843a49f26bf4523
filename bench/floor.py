"""The matmul floor of one GRPO step: how long its matrix multiplies alone take on this machine.

    .venv/bin/python -m bench.floor [--sizes 1m 30m] [--completion 12]

A step of the benchmark's work (4 prompts x 8 completions, one update per rollout, beta > 0) must
at least run these matmuls, with the shapes they have there:

- generation: T - 1 decode steps, each every layer's projections and MLP plus the LM head on 32
  rows (one token per completion), weights streamed layer after layer as in a real step;
- the reference forward and the update's forward: the same linears on the packed token list
  (each prompt once, each completion's tokens but the last: 4 x 6 + 32 x (T - 1) rows);
- the update's backward: for every linear, the gradient of its input (dY @ W) and of its weight
  (dY^T @ X), the same FLOPs as the forward twice.

Nothing else is timed: no attention, norms, activations, softmax, optimizer or Python. So no
implementation in eager PyTorch on this machine can run a step faster than this; the table puts
it beside the median step times that bench_vs_trl measured, to show how far a target is from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import build_models, set_threads


def linear_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """(in, out) of every linear of one forward, in order: per layer q, k, v, o, gate, up, down; then the LM head."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, i, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    kv = d * cfg.get("num_key_value_heads", H) // H
    layer = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]
    return layer * cfg["num_hidden_layers"] + [(d, V)]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def floor(model_dir: Path, rows: int, decode_steps: int, packed_rows: int, repeats: int) -> dict[str, float]:
    shapes = linear_shapes(model_dir)
    weights = [torch.randn(o, k) for k, o in shapes]
    dec_in = [torch.randn(rows, k) for k, _ in shapes]
    fwd_in = [torch.randn(packed_rows, k) for k, _ in shapes]
    grad_out = [torch.randn(packed_rows, o) for _, o in shapes]

    def decode_step():
        for x, w in zip(dec_in, weights):
            torch.nn.functional.linear(x, w)

    def forward():
        for x, w in zip(fwd_in, weights):
            torch.nn.functional.linear(x, w)

    def backward():
        for x, w, dy in zip(fwd_in, weights, grad_out):
            dy @ w          # gradient of the input
            dy.t() @ x      # gradient of the weight

    gen = decode_steps * timed(decode_step, repeats)
    fwd = timed(forward, repeats)
    bwd = timed(backward, repeats)
    flops_per_row = 2 * sum(k * o for k, o in shapes)
    total_flops = flops_per_row * (rows * decode_steps + 4 * packed_rows)
    seconds = gen + 2 * fwd + bwd
    return dict(generation=gen, reference=fwd, update=fwd + bwd, total=seconds,
                flops=total_flops, flops_per_s=total_flops / seconds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1m", "30m"])
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps = tokens - 1")
    ap.add_argument("--completion", type=int, default=12, help="mean completion length, EOS included")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    models = build_models(Path(args.models_dir), args.sizes)
    rows = args.prompts * args.group
    packed = args.prompts * args.prompt_len + rows * (args.completion - 1)
    print(f"Matmuls only, {args.threads} threads: decode {args.tokens - 1} steps x {rows} rows; "
          f"reference and update over {packed} packed rows; median of {args.repeats}.\n")
    print("| model | generation s | reference s | update s | step floor s | matmul FLOP/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        f = floor(models[size], rows, args.tokens - 1, packed, args.repeats)
        print(f"| {size} | {f['generation']:.3f} | {f['reference']:.3f} | {f['update']:.3f} | "
              f"{f['total']:.3f} | {f['flops_per_s'] / 1e9:.1f} G |", flush=True)


if __name__ == "__main__":
    main()
