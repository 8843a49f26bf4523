"""Process supervision against outcome supervision on the step task (grpo.recipes.steps).

    flock /tmp/grpo-measure.lock .venv/bin/python -m bench.process_vs_outcome --seeds 0 1 2 \\
        --json /tmp/process_vs_outcome.json

One warm start (`grpo.recipes.steps.warm_start`, seed `--warm-seed`), then for every seed both
arms from it, in alternating order so that drift in the machine's load hits both:

- `outcome`: the final-answer reward only, advantage_estimator group (DeepSeekMath 4.1.2);
- `process`: the final answer as the final step plus the rule-based step verifier on every line
  (advantage_estimator process, DeepSeekMath 4.1.3);
- `prm`: the same with a process reward model in place of the verifier: `grpo reward-model train
  --kind process` on the warm start's backbone, from the warm start's own samples labelled by the
  verifier (`grpo.recipes.steps.policy_prm_rows`; `PRM_DATA` can add training chains corrupted at
  random, `grpo.recipes.steps.prm_rows`; not Math-Shepherd's Monte-Carlo labels).

Everything else is the recipe's GRPO settings (grpo.recipes.steps.GRPO), with `--set KEY=VALUE`
applied to every arm alike (e.g. `--set learning_rate=3e-4`). Held-out greedy
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

ARMS = ("outcome", "process", "prm")
# The process reward model of the `prm` arm. Its loss falls slowly on this backbone: a few hundred
# steps leave it close to always answering "good", which the policy then learns to please; a
# higher learning rate does no better.
PRM = dict(kind="process", max_steps=1000, batch_size=32, learning_rate=1e-3, warmup_steps=20, eval_steps=250,
           logging_steps=50, max_length=64, eval_fraction=0.1)
# Its data: the warm start's own samples (`policy_samples` of each of the first `policy_prompts`
# training prompts) labelled by the verifier, and `copies` corrupted versions of every training
# chain. The samples carry the mistakes GRPO's completions make; the off-by-one corruptions do
# not, and they are mostly right where the samples are mostly wrong, so a PRM trained on them
# calls too many of the policy's bad steps good: none are used.
PRM_DATA = dict(copies=0, policy_prompts=2000, policy_samples=4)


def arm_settings(arm: str, prm_dir: str) -> dict:
    from grpo.recipes import steps

    if arm == "outcome":
        return {"advantage_estimator": "group", "rewards": steps.OUTCOME_REWARDS}
    if arm == "process":
        return {"advantage_estimator": "process", "rewards": steps.PROCESS_REWARDS}
    return {"advantage_estimator": "process",
            "rewards": [*steps.OUTCOME_REWARDS, {"model": prm_dir, "per": "step", "name": "prm"}]}


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


def overrides(pairs: list[str]) -> dict:
    """`KEY=VALUE` pairs as GRPO settings, each value read as YAML (3e-4 a float, true a bool)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def run(args) -> dict:
    from grpo.cli import quiet_libraries
    from grpo.config import RewardModelConfig, TrainConfig, build
    from grpo.recipes import steps
    from grpo.supervised.reward_model import train_reward_model
    from grpo.train.loop import train

    torch.set_num_threads(1)
    quiet_libraries()  # the progress bars of every model save and load would bury the results
    settings_over = overrides(args.set)
    out = Path(args.output_dir)
    t0 = time.time()
    sft, train_file, heldout_file, heldout_rows = steps.warm_start(
        out / "warm", args.warm_seed, {"max_steps": args.sft_steps} if args.sft_steps else None,
        operators=args.operators)
    train_rows = steps.problems(args.warm_seed, operators=args.operators)[0]
    length = steps.completion_tokens(train_rows + heldout_rows)
    heldout = min(args.heldout or len(heldout_rows), len(heldout_rows))
    warm_seconds = time.time() - t0
    prm = {}
    if "prm" in args.arms:
        t0 = time.time()
        rows = steps.prm_rows(train_rows, seed=args.warm_seed, copies=PRM_DATA["copies"])
        rows += steps.policy_prm_rows(sft, train_rows[:PRM_DATA["policy_prompts"]], PRM_DATA["policy_samples"],
                                      seed=args.warm_seed, max_new_tokens=length)
        data = steps.write_jsonl(rows, out / "prm_data.jsonl")
        prm = train_reward_model(build(RewardModelConfig, {"model": str(sft), "dataset": str(data),
                                                           "output_dir": str(out / "prm"), "seed": args.warm_seed,
                                                           **PRM}, "process_vs_outcome prm"), quiet=True,
                                 overwrite=True)
        prm["seconds"] = time.time() - t0
        print(f"prm: {prm}", flush=True)
    arms = [a for a in ARMS if a in args.arms]
    runs = {arm: {} for arm in arms}
    for k, seed in enumerate(args.seeds):
        order = arms[k % len(arms):] + arms[:k % len(arms)]  # rotated: each arm runs first once
        for arm in order:
            settings = {**steps.GRPO, **arm_settings(arm, str(out / "prm")),
                        "max_steps": args.max_steps, "eval_steps": args.eval_every,
                        "max_completion_length": length, **settings_over}
            run_dir = out / f"{arm}_{seed}"
            cfg = build(TrainConfig, {"model": str(sft), "dataset": str(train_file),
                                      "eval_dataset": str(heldout_file), "eval_max_prompts": heldout,
                                      "output_dir": str(run_dir), "seed": seed, **settings},
                        "process_vs_outcome")
            train(cfg, quiet=True, overwrite=True)
            runs[arm][seed] = curve(run_dir)
            print(f"{arm} seed {seed}: {runs[arm][seed][-1]}", flush=True)
    budget = args.budget or min(points[-1]["seconds"] for arm in runs.values() for points in arm.values())
    return {"runs": {a: {str(s): p for s, p in r.items()} for a, r in runs.items()}, "budget": budget,
            "warm_seconds": warm_seconds, "prm": prm, "seeds": args.seeds, "max_steps": args.max_steps,
            "eval_every": args.eval_every, "heldout": heldout, "set": settings_over,
            "operators": args.operators, "sft_steps": args.sft_steps or steps.SFT["max_steps"]}


def merged(results: list[dict], budget: float = 0.0) -> dict:
    """Several results as one: later runs replace earlier ones of the same arm and seed."""
    if len(results) == 1 and not budget:
        return results[0]
    out = {**results[0], "runs": {}}
    for result in results:
        for arm, seeds in result["runs"].items():
            out["runs"].setdefault(arm, {}).update(seeds)
    out["seeds"] = [int(s) for s in next(iter(out["runs"].values()))]
    out["budget"] = budget or min(points[-1]["seconds"] for arm in out["runs"].values() for points in arm.values())
    return out


def report(result: dict) -> None:
    budget, runs = result["budget"], result["runs"]
    first = next(iter(runs.values()))
    seeds = list(first)
    print(f"budget {budget:.1f} training seconds; held-out {result['heldout']} expressions; seeds {seeds}")
    final = {arm: [at_budget(runs[arm][s], budget) for s in seeds] for arm in runs}
    start = statistics.mean(first[s][0]["accuracy"] for s in seeds)
    print(f"warm start: {start:.1%}")
    print("| arm | accuracy at the budget (mean) | range over seeds |")
    print("|---|---|---|")
    for arm, values in final.items():
        print(f"| {arm} | {statistics.mean(values):.1%} | {min(values):.1%} - {max(values):.1%} |")
    if result.get("prm"):
        prm = result["prm"]
        by_class = (f"; {prm['eval_good_step_accuracy']:.1%} of good steps and {prm['eval_bad_step_accuracy']:.1%} "
                    f"of bad ones called right"
                    if None not in (prm.get("eval_good_step_accuracy"), prm.get("eval_bad_step_accuracy")) else "")
        print(f"process reward model: held-out step accuracy {prm['eval_step_accuracy']:.1%} "
              f"(good steps {prm['eval_good_fraction']:.1%}{by_class}), trained in {prm['seconds']:.0f} s")
    for arm in runs:
        print(f"{arm}: " + ", ".join(f"seed {s} {at_budget(runs[arm][s], budget):.1%} at the budget, "
                                     f"{runs[arm][s][-1]['accuracy']:.1%} at step {runs[arm][s][-1]['step']}"
                                     for s in seeds))
    # Without the outcome arm in this result there is nothing to compare the other arms' times with.
    others = [a for a in runs if a != "outcome"] if "outcome" in runs else []
    if others:
        print("| arm | seed | outcome at the budget | first reached at step | at seconds | outcome's own seconds |")
        print("|---|---|---|---|---|---|")
    for arm in others:
        for s, target in zip(seeds, final["outcome"]):
            hit = first_reaching(runs[arm][s], target)
            own = first_reaching(runs["outcome"][s], target)
            print(f"| {arm} | {s} | {target:.1%} | {hit['step'] if hit else 'never'} | "
                  f"{hit['seconds'] if hit else float('nan'):.1f} | {own['seconds']:.1f} |")
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


def pooled(results: list[dict]) -> None:
    """Seeds of several invocations, each judged at its own invocation's budget (the runs of one
    invocation share the machine's conditions, those of another need not): per seed and arm, the
    gap to outcome at the budget and at the last step, and how soon the arm first reached outcome's
    accuracy at the budget; then the mean gap over every seed, its standard error, and on how many
    seeds the arm needed half outcome's seconds or less."""
    rows = {}
    for result in results:
        budget, runs = result["budget"], result["runs"]
        for arm in (a for a in runs if a != "outcome"):
            for seed, points in runs[arm].items():
                base = runs["outcome"][seed]
                target = at_budget(base, budget)
                hit, own = first_reaching(points, target), first_reaching(base, target)
                rows.setdefault(arm, []).append({
                    "seed": seed, "budget": budget, "outcome": target, "arm": at_budget(points, budget),
                    "final_gap": points[-1]["accuracy"] - base[-1]["accuracy"], "hit": hit, "own": own["seconds"]})
    for arm, table in rows.items():
        print(f"| seed | budget s | outcome at the budget | {arm} at the budget | gap | gap at the last step | "
              f"{arm} first reaches outcome's accuracy | outcome's own seconds to it | {arm}'s share |")
        print("|---|---|---|---|---|---|---|---|---|")
        shares = []
        for r in table:
            # An outcome run at or below the warm start at the budget has no time to halve: not counted.
            share = r["hit"]["seconds"] / r["own"] if r["hit"] and r["own"] > 0 else float("inf")
            shares.append(share)
            reached = f"{r['hit']['seconds']:.1f} s (step {r['hit']['step']})" if r["hit"] else "never"
            shown = f"{share:.0%}" if share < float("inf") else "- (outcome at or below the warm start)"
            print(f"| {r['seed']} | {r['budget']:.1f} | {r['outcome']:.1%} | {r['arm']:.1%} | "
                  f"{100 * (r['arm'] - r['outcome']):+.1f} | {100 * r['final_gap']:+.1f} | {reached} | "
                  f"{r['own']:.1f} s | {shown} |")
        gaps = [100 * (r["arm"] - r["outcome"]) for r in table]
        error = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
        print(f"{arm}, {len(table)} seeds: outcome {statistics.mean(r['outcome'] for r in table):.1%}, "
              f"{arm} {statistics.mean(r['arm'] for r in table):.1%} at the budget; gap {statistics.mean(gaps):+.1f} "
              f"points (standard error {error:.1f}), {statistics.mean(100 * r['final_gap'] for r in table):+.1f} "
              f"at the last step; half outcome's seconds or less on {sum(x <= 0.5 for x in shares)} of "
              f"{len(table)} seeds")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--warm-seed", type=int, default=0)
    parser.add_argument("--operators", type=int, default=3,
                        help="operations per expression: lines per chain (the demo's 3; more makes the final "
                             "answer a sparser signal)")
    parser.add_argument("--sft-steps", type=int, default=0,
                        help="the warm start's SFT steps (default: the recipe's); longer chains need more")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=0, help="held-out expressions scored (default: all)")
    parser.add_argument("--output-dir", default="/tmp/process_vs_outcome")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="the budget in training seconds (default: the shortest run's), e.g. the outcome "
                             "arm's from an earlier measurement when only other arms run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a GRPO setting for every arm, over the recipe's (repeatable)")
    parser.add_argument("--json", default="")
    parser.add_argument("--report", nargs="+", default=[], metavar="JSON",
                        help="re-print the results --json files hold; with several, one result: a later file's "
                             "runs replace an earlier one's of the same arm and seed (e.g. a seed run again alone), "
                             "and the budget is the shortest of the runs kept (or --budget)")
    parser.add_argument("--pooled", nargs="+", default=[], metavar="JSON",
                        help="the seeds of several --json files (each an invocation with outcome), each judged at "
                             "its own file's budget, as one table and a mean over every seed")
    args = parser.parse_args(argv)
    if args.pooled:
        return pooled([json.loads(Path(f).read_text()) for f in args.pooled])
    if args.report:
        result = merged([json.loads(Path(f).read_text()) for f in args.report], args.budget)
    else:
        result = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
