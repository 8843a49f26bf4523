"""Ranking feedback against pairwise feedback, and the rank estimator against the group one.

    grpo demo --pipeline seed --feedback ranking --seed S --output-dir runs/seed_ranking_S   # S = 0, 1, 2
    .venv/bin/python -m bench.ranking_feedback --seeds 0 1 2 --pipeline-dir 'runs/seed_ranking_{seed}'

Per seed, from the output of `grpo demo --pipeline seed --feedback ranking`: its warm start, its
rankings of the warm policy's 8 samples of each of 2000 training and 250 held-out prompts, its
Plackett-Luce reward model (likelihood + NLL) and its GRPO run on sampled groups with iterative RL.
Then, at an equal labelling budget (the same 8 samples of each prompt, drawn again with the same
seed and generator, every one judged once), the pipeline's correct-vs-wrong pairs instead, and

1. a Bradley-Terry reward model of the same kind and settings on the pairs, and both feedbacks
   again as a score head (`kind: score_head`: a fresh linear head on the warm policy, no NLL
   term); every reward model's held-out correct-vs-wrong accuracy (every (right, wrong) pair of
   the held-out rankings), Kendall's tau-b and top-1 accuracy on the held-out rankings;
2. GRPO on each reward model with the pipeline's settings (sampled groups, iterative
   RL replaying the pairs): true held-out accuracy on 500 problems before, after, and the lowest
   at any evaluation (every 25 steps), beside the pipeline's own run on the Plackett-Luce model;
3. `advantage_estimator: rank` against `group`: on the exact-answer demo (grpo demo's GRPO stage
   from the same warm start) and on the Plackett-Luce reward model's score with iterative RL (a
   reward whose scale drifts as the reward model keeps training): final held-out accuracy, and
   the seconds of training until held-out accuracy first reaches the group estimator's final
   accuracy ("-": never).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.common import pipeline_preferences


def heldout_metrics(out: Path, rm_dir: Path) -> dict:
    """Kendall's tau, top-1 and correct-vs-wrong accuracy on the held-out rankings (cached)."""
    from grpo.config import RewardModelEvalConfig, build
    from grpo.recipes.pipeline import REWARD_MODEL
    from grpo.supervised.reward_model import eval_reward_model

    cache = rm_dir / "heldout_rankings.json"
    if not cache.exists():
        cache.write_text(json.dumps(eval_reward_model(build(RewardModelEvalConfig, {
            "model": str(rm_dir), "dataset": str(out / "data" / "preferences_heldout.jsonl"),
            "max_length": REWARD_MODEL["max_length"]}), quiet=True)))
    return json.loads(cache.read_text())


def reward_model(out: Path, seed: int, feedback: str, kind: str) -> Path:
    """A reward model of `kind` on the pairs (Bradley-Terry) or the rankings (Plackett-Luce), with
    the pipeline's settings (cached). The pipeline's own Plackett-Luce likelihood model is reused."""
    from grpo.config import RewardModelConfig, build
    from grpo.recipes.pipeline import RANKING_REWARD_MODEL, REWARD_MODEL
    from grpo.supervised.reward_model import train_reward_model

    pairs = feedback.startswith("pairs")
    if not pairs and kind == "likelihood":
        return out / "reward_model"
    directory = out / f"rm_{'bradley_terry' if pairs else 'plackett_luce'}{'' if kind == 'likelihood' else '_' + kind}"
    data = ("pairs_{}.jsonl" if pairs else "preferences_{}.jsonl")
    settings = {**REWARD_MODEL, **({} if pairs else RANKING_REWARD_MODEL), "kind": kind,
                "nll_coef": REWARD_MODEL["nll_coef"] if kind == "likelihood" else 0.0}
    if not (directory / "summary.json").exists():
        train_reward_model(build(RewardModelConfig, {
            "model": str(out / "sft"), "dataset": str(out / "data" / data.format("train")),
            "eval_dataset": str(out / "data" / data.format("heldout")), "output_dir": str(directory),
            "seed": seed, **settings, "report_to": []}), quiet=True, overwrite=True)
    return directory


def result_of(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(line.get("time/elapsed", 0.0), line["eval/accuracy"]) for line in lines if "eval/accuracy" in line]
    return {"before": summary["eval_before"]["eval_accuracy"], "after": summary["eval_after"]["eval_accuracy"],
            "lowest": min(a for _, a in curve[1:]) if len(curve) > 1 else summary["eval_after"]["eval_accuracy"],
            "curve": curve, "seconds": summary["train_seconds"]}


def grpo(out: Path, seed: int, tag: str, settings: dict) -> dict:
    """One GRPO run from the warm start (cached)."""
    from grpo.config import TrainConfig, build
    from grpo.train.loop import train

    run = out / "bench_runs" / tag
    if not (run / "summary.json").exists():
        train(build(TrainConfig, {"model": str(out / "sft"), "dataset": str(out / "data" / "train.jsonl"),
                                  "eval_dataset": str(out / "data" / "heldout.jsonl"), "eval_max_prompts": 500,
                                  "output_dir": str(run), "seed": seed, "report_to": [], "samples_steps": 0,
                                  **settings}), quiet=True, overwrite=True)
    return result_of(run)


FEEDBACKS = ("pairs (BT)", "rankings (PL)")


def seconds_to(curve: list, target: float) -> float | None:
    return next((t for t, a in curve if a >= target), None)


def main() -> None:
    from grpo.cli import quiet_libraries
    from grpo.recipes.addition import GRPO
    from grpo.recipes.pipeline import ITERATIVE, SEED_GRPO

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pipeline-dir", default="runs/seed_ranking_{seed}",
                   help="each seed's `grpo demo --pipeline seed --feedback ranking` output directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", nargs="+", default=["likelihood", "score_head"], choices=["likelihood", "score_head"],
                   help="the reward-model kinds to compare pairs and rankings with")
    p.add_argument("--no-estimators", dest="estimators", action="store_false",
                   help="skip the rank-against-group runs")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    results = []

    def record(**row):
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    verifier = {"function": "exact_answer", "weight": 0.0}
    for seed in args.seeds:
        out = Path(args.pipeline_dir.format(seed=seed))
        pipeline_preferences(out, seed, "pairs")  # the same samples, judged as pairs

        def on(rm: Path, replay: str) -> dict:
            return {**SEED_GRPO, "generation": "sample",
                    "iterative_rl": {**ITERATIVE, "replay_dataset": str(out / "data" / replay)},
                    "rewards": [{"model": str(rm), "name": "reward_model"}, verifier]}

        for kind in args.kinds:
            for feedback in FEEDBACKS:
                rm = reward_model(out, seed, feedback, kind)
                if feedback.startswith("rankings") and kind == "likelihood":
                    run = result_of(out / "sample")  # the pipeline's own GRPO run on this model
                else:
                    tag = f"{'bt' if feedback.startswith('pairs') else 'pl'}_{kind}_group".replace("_likelihood", "")
                    replay = "pairs_train.jsonl" if feedback.startswith("pairs") else "preferences_train.jsonl"
                    run = grpo(out, seed, tag, on(rm, replay))
                m = heldout_metrics(out, rm)
                record(part="reward model", seed=seed, feedback=feedback, kind=kind,
                       correct_vs_wrong=m["correct_vs_wrong_accuracy"], kendall_tau=m["kendall_tau"],
                       top1=m["top1_accuracy"], **run)
        if not args.estimators:
            continue
        tasks = {"exact answer": ({**GRPO, "eval_steps": 25, "rewards": [{"function": "exact_answer"}]}, None),
                 "PL reward model + iterative RL": (on(out / "reward_model", "preferences_train.jsonl"),
                                                    result_of(out / "sample"))}
        for task, (settings, group_run) in tasks.items():
            tag = task.split()[0].lower()
            both = {"group": group_run or grpo(out, seed, f"{tag}_group", settings),
                    "rank": grpo(out, seed, f"{tag}_rank", {**settings, "advantage_estimator": "rank"})}
            for estimator, r in both.items():
                record(part="estimator", seed=seed, task=task, estimator=estimator,
                       seconds_to_group_final=seconds_to(r["curve"], both["group"]["after"]), **r)
    print(tables(results, args))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def tables(results: list[dict], args) -> str:
    lines = [f"seeds {args.seeds}; mean, range in brackets", "",
             "| feedback | reward model | RM correct-vs-wrong | RM Kendall's tau | RM top-1 | "
             "GRPO true accuracy before -> after | lowest - before (worst seed) |", "|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in results if r["part"] == "reward model"):
        for feedback in FEEDBACKS:
            rows = [r for r in results
                    if r["part"] == "reward model" and (r["feedback"], r["kind"]) == (feedback, kind)]
            if rows:
                after = [r["after"] for r in rows]
                lines.append(f"| {feedback} | {kind} | {_mean(r['correct_vs_wrong'] for r in rows):.1%} | "
                             f"{_mean(r['kendall_tau'] for r in rows):.3f} | {_mean(r['top1'] for r in rows):.1%} | "
                             f"{_mean(r['before'] for r in rows):.1%} -> {_mean(after):.1%} [{min(after):.1%}, "
                             f"{max(after):.1%}] | {min(r['lowest'] - r['before'] for r in rows):+.1%} |")
    lines += ["", "| reward | estimator | true accuracy before -> after | s to group's final accuracy (per seed) | "
              "GRPO s |", "|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in results if r["part"] == "estimator"):
        for estimator in ("group", "rank"):
            rows = [r for r in results if r["part"] == "estimator" and (r["task"], r["estimator"]) == (task, estimator)]
            after = [r["after"] for r in rows]
            reach = ", ".join("-" if r["seconds_to_group_final"] is None else f"{r['seconds_to_group_final']:.0f}"
                              for r in rows)
            lines.append(f"| {task} | {estimator} | {_mean(r['before'] for r in rows):.1%} -> {_mean(after):.1%} "
                         f"[{min(after):.1%}, {max(after):.1%}] | {reach} | {_mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
