"""The calculator demo on several seeds: held-out success before and after GRPO, and the time.

    .venv/bin/python -m bench.agent_demo --seeds 0 1 2 --out /tmp/agent_demo

Each seed runs `grpo demo --task calculator --seed S` in a fresh subprocess (the tiny model built,
warm-started on synthetic episodes, then trained with GRPO calling the real `multiply` tool) and
reads its summary.json. Prints one row per seed: the held-out success (greedy episodes, 100
problems) before and after GRPO, the warm start's steps and seconds, GRPO's seconds, the seconds
of the whole command, and the command. Run the seeds one after another on an otherwise idle
machine: their times are the demo's only then.
`--set KEY=VALUE` passes GRPO keys on (e.g. --set max_steps=30).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/agent_demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        command = [sys.executable, "-m", "grpo.cli", "demo", "--task", "calculator", "--seed", str(seed),
                   "--output-dir", str(out), "--overwrite", "--quiet",
                   *[x for kv in args.set for x in ("--set", kv)]]
        start = time.time()
        subprocess.run(command, check=True)
        seconds = time.time() - start
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"seed": seed, "before": summary["success_before"], "after": summary["success_after"],
                     "warm_steps": summary["warm_steps"], "warm_seconds": summary["warm_seconds"],
                     "grpo_seconds": summary["train_seconds"], "seconds": seconds,
                     "command": shlex.join(["grpo", *command[3:]])})
        print(f"seed {seed}: {rows[-1]['before']:.0%} -> {rows[-1]['after']:.0%} in {seconds:.0f}s", flush=True)
    print()
    print("| seed | before | after | warm-start steps | warm start s | GRPO s | whole command s | command |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        gain = 100 * (r["after"] - r["before"])
        print(f"| {r['seed']} | {r['before']:.0%} | {r['after']:.0%} ({gain:+.0f} points) | "
              f"{r['warm_steps']} | {r['warm_seconds']:.0f} | {r['grpo_seconds']:.0f} | {r['seconds']:.0f} | "
              f"`{r['command']}` |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
