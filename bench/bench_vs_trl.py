"""grpo vs TRL's GRPOTrainer on the same work, measured side by side in one invocation.

    .venv/bin/python -m bench.bench_vs_trl --trl-python .venv-bench/bin/python

Both systems train the same locally built Llama models (~1M and ~30M parameters, character
tokenizer) on the same two-number-addition prompts with the same reward: 4 prompts x 8
completions per optimizer step, 16 completion tokens, temperature 1, beta 0.04 (both compute
reference log-probs), one update per rollout, fp32, no gradient checkpointing, 2 threads.

Every measurement is a fresh subprocess (so peak RSS is one system's alone), and rounds are
interleaved: matmul, ours, TRL, matmul, ours, TRL, ... so that drift in the machine's load hits
both systems alike. TRL runs from its own virtual environment (`--trl-python`) when its
dependencies should not touch the main one; `pip install 'grpo[bench]'` puts it next to grpo.

With `--backend vllm` both systems sample with vLLM colocated in the training process: ours with
`rollout_backend: vllm`, TRL with `use_vllm: true, vllm_mode: colocate` (both need vLLM installed
in their interpreters). On a GPU:

    python -m bench.bench_vs_trl --device cuda --dtype bfloat16 --sizes qwen0.5b --backend vllm

On a GPU (`--device cuda --dtype bfloat16 --sizes qwen0.5b`, a Qwen2-0.5B-shaped model): both
systems keep float32 weights and compute under bf16 autocast; the table adds generation tokens/s,
peak GPU memory and the update phase's model FLOP utilisation (its necessary FLOPs / its time,
against a bf16 8192^2 matmul measured in the same run and against the datasheet peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import build_models, model_dims, nominal_peak, step_flops

ROOT = Path(__file__).resolve().parent.parent


def run_worker(python: str, system: str, extra: list[str], timeout: float = 1800,
               module: str = "bench.workers") -> dict:
    cmd = [python, "-m", module, system, *extra]
    # ROOT first; a PYTHONPATH already set (e.g. carried wheels on a GPU machine) stays behind it.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def summarise(results: list[dict], dims: dict | None = None, group: int = 8) -> dict:
    """Medians over every measured step; with `dims`, also the step's FLOP/s and the update
    phase's (see step_flops)."""
    steps = [s for r in results for s in r["steps"]]
    med = lambda k: statistics.median(s[k] for s in steps)  # noqa: E731
    totals = [s["total"] for s in steps]
    tokens = [s["tokens"] for s in steps if s["tokens"] >= 0]
    work = [] if dims is None else [step_flops(dims, s["prompt_lengths"], group, s["lengths"]) for s in steps]
    gpu = [r["peak_gpu_mib"] for r in results if "peak_gpu_mib" in r]
    return dict(n=len(steps), median=statistics.median(totals), min=min(totals), max=max(totals),
                generation=med("generation"), logprobs=med("logprobs"), update=med("update"),
                tokens_per_s=(statistics.median(tokens) / statistics.median(totals)) if tokens else float("nan"),
                gen_tokens_per_s=statistics.median([s["tokens"] / s["generation"] for s in steps
                                                    if s["tokens"] >= 0 and s["generation"] > 0] or [float("nan")]),
                tokens=statistics.median(tokens) if tokens else float("nan"),
                peak_rss_mib=max(r["peak_rss_mib"] for r in results),
                peak_gpu_mib=max(gpu) if gpu else None,
                device_name=next((r["device_name"] for r in results if "device_name" in r), None),
                **({} if dims is None else dict(
                    flops=statistics.median(w["total"] for w in work),
                    flops_per_s=statistics.median(w["total"] / s["total"] for w, s in zip(work, steps)),
                    update_flops_per_s=statistics.median(w["update"] / s["update"] for w, s in zip(work, steps)))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1m", "30m"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per system")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per round (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of both systems (bfloat16 on a GPU)")
    ap.add_argument("--trl-weights", default="float32", choices=["float32", "bfloat16"],
                    help="TRL's weights: float32 (autocast, like ours) or bfloat16 (pure bf16, as many TRL "
                         "GPU recipes load models)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16, help="max completion tokens")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--python", default=sys.executable, help="interpreter for grpo's runs")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--backend", default="local", choices=["local", "vllm"],
                    help="vllm: ours with rollout_backend vllm against TRL with use_vllm, vllm_mode colocate")
    ap.add_argument("--json", default="", help="also write raw results here")
    args = ap.parse_args(argv)

    models = build_models(Path(args.models_dir), args.sizes)
    where = ["--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
    common = [*where, "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts", str(args.prompts),
              "--group", str(args.group), "--tokens", str(args.tokens), "--backend", args.backend]
    raw: dict = {}
    for size in args.sizes:
        raw[size] = {"ours": [], "trl": [], "matmul": []}
        for r in range(args.rounds):
            raw[size]["matmul"].append(run_worker(args.python, "matmul", where))
            for system in ("ours", "trl"):
                if system == "trl" and args.skip_trl:
                    continue
                py = args.python if system == "ours" else args.trl_python
                extra = ["--trl-weights", args.trl_weights] if system == "trl" else []
                res = run_worker(py, system, ["--model", str(models[size]), *common, *extra])
                raw[size][system].append(res)
                s = summarise([res])
                print(f"[{size} round {r + 1}/{args.rounds}] {system:4s} median {s['median']:.3f}s "
                      f"(gen {s['generation']:.3f} lp {s['logprobs']:.3f} upd {s['update']:.3f}) "
                      f"rss {s['peak_rss_mib']:.0f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print()
    print(report(raw, models, args))


VLLM_NOTE = ", rollouts by vLLM colocated (ours: rollout_backend vllm; TRL: use_vllm, vllm_mode colocate)"


def report(raw: dict, models: dict, args) -> str:
    gpu = args.device == "cuda"
    lines = [f"Per optimizer step: {args.prompts} prompts x {args.group} completions, {args.tokens} tokens, "
             f"beta 0.04, {args.dtype} on {args.device}"
             f"{VLLM_NOTE if args.backend == 'vllm' else ''}"
             f"{'' if gpu else f', {args.threads} threads'}; {args.rounds} interleaved rounds x {args.steps} steps "
             f"after {args.warmup} warm-up steps per round.", "",
             "| model | system | median s/step | min-max | generation | logprobs (ref/old) | update "
             "| completion tok/s | generation tok/s | peak RSS MiB |" + (" peak GPU MiB |" if gpu else "")
             + " steps/s ours/TRL | FLOP/s | of matmul | update FLOP/s (of matmul) |"
             + (" update MFU (datasheet) |" if gpu else ""),
             "|---" * (14 + 2 * gpu) + "|"]
    work = {}  # size -> median necessary GFLOP of our steps, for the footnote
    device_name = None
    for size, by_system in raw.items():
        matmul = statistics.median(m["flops_per_s"] for m in by_system["matmul"])
        dims = model_dims(models[size])
        sums = {k: summarise(v, dims, args.group) for k, v in by_system.items() if k != "matmul" and v}
        if "ours" in sums:
            work[size] = sums["ours"]["flops"]
        for system, s in sums.items():
            ratio = (sums["trl"]["median"] / s["median"]) if "trl" in sums and system == "ours" else None
            achieved, upd = s["flops_per_s"], s["update_flops_per_s"]
            device_name = device_name or s["device_name"]
            peak = nominal_peak(s["device_name"] or "") if args.dtype == "bfloat16" else None
            lines.append(
                f"| {size} | {system} | {s['median']:.3f} | {s['min']:.3f}-{s['max']:.3f} | "
                f"{s['generation']:.3f} | {s['logprobs']:.3f} | {s['update']:.3f} | {s['tokens_per_s']:.0f} | "
                f"{s['gen_tokens_per_s']:.0f} | {s['peak_rss_mib']:.0f} |"
                + (f" {s['peak_gpu_mib']:.0f} |" if gpu else "")
                + f" {'%.2fx' % ratio if ratio else ''} | {achieved / 1e9:.1f} G | {100 * achieved / matmul:.0f}% | "
                f"{upd / 1e9:.1f} G ({100 * upd / matmul:.0f}%) |"
                + ((f" {100 * upd / peak:.1f}% |" if peak else " n/a |") if gpu else ""))
        label = f"matmul {'8192' if gpu else '2048'}^2 {args.dtype}"
        lines.append(f"| {size} | {label} |" + " |" * (9 + gpu) + f" {matmul / 1e9:.1f} G | 100% | |"
                     + (" |" if gpu else ""))
    if device_name:
        lines += ["", f"GPU: {device_name}. TRL's weights: {args.trl_weights}."]
    lines += ["", "FLOP/s = the step's necessary matmul FLOPs (bench/common.py `step_flops`: the sampled "
              "completions up to EOS, each prompt once per group, generation + reference forward + "
              "forward and backward = 5 forwards, attention included) / its time; median over steps. "
              "Median necessary work per step: " + ", ".join(
                  f"{size}: {flops / 1e9:.1f} GFLOP" for size, flops in work.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
