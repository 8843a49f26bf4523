"""Process supervision against outcome supervision on the step task (grpo.recipes.steps).

    flock /tmp/grpo-measure.lock .venv/bin/python -m bench.process_vs_outcome --seeds 0 1 2 \\
        --json /tmp/process_vs_outcome.json

One warm start (`grpo.recipes.steps.warm_start`, seed `--warm-seed`), then for every seed both
arms from it, in alternating order so that drift in the machine's load hits both:

- `outcome`: the final-answer reward only, advantage_estimator group (DeepSeekMath 4.1.2);
- `process`: the final answer as the final step plus the rule-based step verifier on every line
  (advantage_estimator process, DeepSeekMath 4.1.3).

Everything else is the recipe's GRPO settings (grpo.recipes.steps.GRPO). Held-out greedy
final-answer accuracy every --eval-every steps; the clock is the sum of the training steps'
own seconds (evaluation not counted). The budget is the shortest run's training seconds, the same
for every run: a run's accuracy at the budget is its last evaluation within it. Prints per arm the
mean curve, the accuracy at the budget (mean and range over seeds), and for process the steps and
seconds it needed to first reach the same seed's outcome accuracy at the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ARMS = {
    "outcome": {"advantage_estimator": "group", "rewards": "OUTCOME_REWARDS"},
    "process": {"advantage_estimator": "process", "rewards": "PROCESS_REWARDS"},
}


def curve(run_dir: Path) -> list[dict]:
    """[(step, training seconds so far, held-out accuracy)] of one run, from its metrics.jsonl."""
    points, seconds = [], 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        seconds += m.get("time/step", m.get("seconds_step", 0.0))
        accuracy = m.get("eval/accuracy", m.get("eval_accuracy"))  # the namespaced name, or the plain one
        if accuracy is not None:
            points.append({"step": m["step"], "seconds": seconds, "accuracy": accuracy})
    return points


def at_budget(points: list[dict], budget: float) -> float:
    return [p for p in points if p["seconds"] <= budget + 1e-9][-1]["accuracy"]


def first_reaching(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["accuracy"] >= target), None)


def run(args) -> dict:
    from grpo.config import TrainConfig, build
    from grpo.recipes import steps
    from grpo.train.loop import train

    torch.set_num_threads(1)
    out = Path(args.output_dir)
    t0 = time.time()
    sft, train_file, heldout_file, heldout_rows = steps.warm_start(out / "warm", args.warm_seed)
    warm_seconds = time.time() - t0
    runs = {arm: {} for arm in ARMS}
    for k, seed in enumerate(args.seeds):
        order = list(ARMS) if k % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            settings = {**steps.GRPO, **ARMS[arm], "rewards": getattr(steps, ARMS[arm]["rewards"]),
                        "max_steps": args.max_steps, "eval_steps": args.eval_every}
            run_dir = out / f"{arm}_{seed}"
            cfg = build(TrainConfig, {"model": str(sft), "dataset": str(train_file),
                                      "eval_dataset": str(heldout_file), "eval_max_prompts": len(heldout_rows),
                                      "output_dir": str(run_dir), "seed": seed, **settings},
                        "process_vs_outcome")
            train(cfg, quiet=True, overwrite=True)
            runs[arm][seed] = curve(run_dir)
            print(f"{arm} seed {seed}: {runs[arm][seed][-1]}", flush=True)
    budget = min(points[-1]["seconds"] for arm in runs.values() for points in arm.values())
    return {"runs": {a: {str(s): p for s, p in r.items()} for a, r in runs.items()}, "budget": budget,
            "warm_seconds": warm_seconds, "seeds": args.seeds, "max_steps": args.max_steps,
            "eval_every": args.eval_every, "heldout": len(heldout_rows)}


def report(result: dict) -> None:
    budget, runs = result["budget"], result["runs"]
    seeds = list(runs["outcome"])
    print(f"budget {budget:.1f} training seconds; held-out {result['heldout']} expressions; seeds {seeds}")
    final = {arm: [at_budget(runs[arm][s], budget) for s in seeds] for arm in runs}
    start = statistics.mean(runs["outcome"][s][0]["accuracy"] for s in seeds)
    print(f"warm start: {start:.1%}")
    print("| arm | accuracy at the budget (mean) | range over seeds |")
    print("|---|---|---|")
    for arm, values in final.items():
        print(f"| {arm} | {statistics.mean(values):.1%} | {min(values):.1%} - {max(values):.1%} |")
    print("| seed | outcome at budget | process reaches it at step | at seconds | outcome's seconds to its own |")
    print("|---|---|---|---|---|")
    for s, target in zip(seeds, final["outcome"]):
        hit = first_reaching(runs["process"][s], target)
        own = first_reaching(runs["outcome"][s], target)
        print(f"| {s} | {target:.1%} | {hit['step'] if hit else 'never'} | "
              f"{hit['seconds']:.1f} | {own['seconds']:.1f} |" if hit else
              f"| {s} | {target:.1%} | never | - | {own['seconds']:.1f} |")
    steps_ = sorted({p["step"] for arm in runs.values() for r in arm.values() for p in r})
    print("| step | " + " | ".join(f"{arm} (acc, s)" for arm in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for step in steps_:
        cells = []
        for arm in runs:
            pts = [p for s in seeds for p in runs[arm][s] if p["step"] == step]
            cells.append(f"{statistics.mean(p['accuracy'] for p in pts):.1%}, "
                         f"{statistics.mean(p['seconds'] for p in pts):.0f}" if len(pts) == len(seeds) else "-")
        print(f"| {step} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warm-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--output-dir", default="/tmp/process_vs_outcome")
    parser.add_argument("--json", default="")
    parser.add_argument("--report", default="", help="re-print the results a --json file holds")
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
    else:
        result = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
