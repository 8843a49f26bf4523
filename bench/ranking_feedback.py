"""Ranking feedback against pairwise feedback, and the rank estimator against the group one.

    .venv/bin/python -m bench.ranking_feedback --seeds 0 1 2 --json ranking_feedback.json

Per seed, the seed pipeline's warm start and its 8 samples of each of 2000 training and 250
held-out prompts (bench.seed_pipeline.prepare; the same generator, so the same samples), judged
twice at an equal labelling budget (every sample judged once): as correct-vs-wrong pairs (the
pipeline's pairs) and as one ranking of the 8 per prompt (right answers tied first, then the wrong
ones closer to farther). Then

1. reward models, Bradley-Terry on the pairs against Plackett-Luce on the rankings, each as a
   score head and as the likelihood verifier (+ NLL), with the pipeline's settings (rankings: 16
   a step, about as many sequences as 64 pairs): held-out correct-vs-wrong accuracy and Kendall's
   tau on the held-out rankings;
2. GRPO on each likelihood reward model, sampled groups, iterative RL (the pipeline's recipe): true
   held-out accuracy on 500 problems before, after, and the lowest at any evaluation;
3. `advantage_estimator: rank` against `group`: on the exact-answer demo (grpo demo's GRPO stage)
   and on the Plackett-Luce likelihood reward model's score with iterative RL (a reward whose
   scale drifts as the reward model keeps training): final held-out accuracy, and the seconds
   until held-out accuracy first reaches the group estimator's final accuracy (evaluations every
   25 steps; "-" if never).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RM_KINDS = {"score head": dict(kind="score_head", nll_coef=0.0), "likelihood + NLL": dict()}
FEEDBACK = ("pairs (BT)", "rankings (PL)")


def prepare_rankings(out: Path, seed: int) -> None:
    from grpo.config import PreferenceConfig, build
    from grpo.recipes.pipeline import (HELDOUT_PREFERENCE_PROMPTS, PREFERENCE_PROMPTS, PREFERENCES,
                                       RANKING_PREFERENCES)
    from grpo.recipes.preferences import make_preferences

    for name, data, n in (("train", "train.jsonl", PREFERENCE_PROMPTS),
                          ("heldout", "heldout.jsonl", HELDOUT_PREFERENCE_PROMPTS)):
        path = out / "data" / f"rankings_{name}.jsonl"
        if not path.exists():
            make_preferences(build(PreferenceConfig, {"model": str(out / "sft"), "dataset": str(out / "data" / data),
                                                      "num_prompts": n, "seed": seed, "output_file": str(path),
                                                      **PREFERENCES, **RANKING_PREFERENCES}), quiet=True)


def reward_model(out: Path, seed: int, feedback: str, kind: str) -> tuple[Path, dict]:
    """A trained reward model (cached) and its held-out metrics on the held-out rankings."""
    from grpo.config import RewardModelConfig, RewardModelEvalConfig, build
    from grpo.recipes.pipeline import RANKING_REWARD_MODEL, REWARD_MODEL
    from grpo.supervised.reward_model import eval_reward_model, train_reward_model

    ranking = feedback.startswith("rankings")
    directory = out / f"rm_{'pl' if ranking else 'bt'}_{kind.split()[0]}"
    if not (directory / "heldout.json").exists():
        data = "rankings" if ranking else "preferences"
        train_reward_model(build(RewardModelConfig, {
            "model": str(out / "sft"), "dataset": str(out / "data" / f"{data}_train.jsonl"),
            "eval_dataset": str(out / "data" / f"{data}_heldout.jsonl"), "output_dir": str(directory),
            "seed": seed, **REWARD_MODEL, "report_to": [], **(RANKING_REWARD_MODEL if ranking else {}),
            **RM_KINDS[kind]}), quiet=True, overwrite=True)
        metrics = eval_reward_model(build(RewardModelEvalConfig, {
            "model": str(directory), "dataset": str(out / "data" / "rankings_heldout.jsonl"),
            "max_length": REWARD_MODEL["max_length"]}), quiet=True)
        (directory / "heldout.json").write_text(json.dumps(metrics))
    return directory, json.loads((directory / "heldout.json").read_text())


def grpo(out: Path, seed: int, tag: str, settings: dict) -> dict:
    """One GRPO run (cached): accuracy before / after / lowest, and (elapsed s, accuracy) at each
    evaluation."""
    from grpo.config import TrainConfig, build
    from grpo.train.loop import train

    run = out / "runs_ranking" / tag
    if (run / "result.json").exists():
        return json.loads((run / "result.json").read_text())
    cfg = build(TrainConfig, {"model": str(out / "sft"), "dataset": str(out / "data" / "train.jsonl"),
                              "eval_dataset": str(out / "data" / "heldout.jsonl"), "eval_max_prompts": 500,
                              "output_dir": str(run), "seed": seed, "report_to": [], "save_steps": 0,
                              "samples_steps": 0, **settings})
    start = time.time()
    train(cfg, quiet=True, overwrite=True)
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(line.get("elapsed", 0.0), line["eval_accuracy"]) for line in lines if "eval_accuracy" in line]
    result = {"before": summary["eval_before"]["eval_accuracy"], "after": summary["eval_after"]["eval_accuracy"],
              "lowest": min(a for _, a in curve[1:]) if len(curve) > 1 else summary["eval_after"]["eval_accuracy"],
              "curve": curve, "seconds": time.time() - start}
    (run / "result.json").write_text(json.dumps(result))
    return result


def seconds_to(curve: list, target: float) -> float | None:
    return next((t for t, a in curve if a >= target), None)


def main() -> None:
    from bench.seed_pipeline import prepare
    from grpo.cli import quiet_libraries
    from grpo.recipes.addition import GRPO
    from grpo.recipes.pipeline import ITERATIVE, SEED_GRPO

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-dir", default="runs/bench_seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    results = []

    def record(**row):
        results.append(row)
        print(json.dumps(row), flush=True)

    for seed in args.seeds:
        out = prepare(seed, Path(args.work_dir))
        prepare_rankings(out, seed)
        verifier = {"function": "exact_answer", "weight": 0.0}
        for feedback in FEEDBACK:
            for kind in RM_KINDS:
                rm_dir, metrics = reward_model(out, seed, feedback, kind)
                row = dict(part="reward model", seed=seed, feedback=feedback, kind=kind,
                           correct_vs_wrong=metrics["correct_vs_wrong_accuracy"], kendall_tau=metrics["kendall_tau"],
                           top1=metrics["top1_accuracy"])
                if kind == "likelihood + NLL":
                    iterative = {**ITERATIVE, "replay_dataset": str(out / "data" / (
                        "rankings_train.jsonl" if feedback.startswith("rankings") else "preferences_train.jsonl"))}
                    row.update(grpo(out, seed, f"{feedback.split()[0]}_likelihood_sample", {
                        **SEED_GRPO, "generation": "sample", "iterative_rl": iterative,
                        "rewards": [{"model": str(rm_dir), "name": "reward_model"}, verifier]}))
                    row.pop("curve")
                record(**row)
        pl_dir = reward_model(out, seed, "rankings (PL)", "likelihood + NLL")[0]
        iterative_pl = {**ITERATIVE, "replay_dataset": str(out / "data" / "rankings_train.jsonl")}
        tasks = {
            "exact answer": {**GRPO, "rewards": [{"function": "exact_answer"}]},
            "PL reward model + iterative RL": {
                **SEED_GRPO, "generation": "sample", "iterative_rl": iterative_pl,
                "rewards": [{"model": str(pl_dir), "name": "reward_model"}, verifier]},
        }
        for task, settings in tasks.items():
            # The group run on the PL reward model is part 2's run (the same settings).
            tags = {"group": "rankings_likelihood_sample" if task.startswith("PL") else "exact_group",
                    "rank": f"{task.split()[0]}_rank"}
            runs = {est: grpo(out, seed, tags[est], {**settings, "eval_steps": 25,
                                                     **({"advantage_estimator": "rank"} if est == "rank" else {})})
                    for est in ("group", "rank")}
            target = runs["group"]["after"]
            for est, r in runs.items():
                record(part="estimator", seed=seed, task=task, estimator=est, before=r["before"], after=r["after"],
                       lowest=r["lowest"], seconds=r["seconds"], seconds_to_group_final=seconds_to(r["curve"], target))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(tables(results, args))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def tables(results: list[dict], args) -> str:
    cmd = "python -m bench.ranking_feedback --seeds " + " ".join(map(str, args.seeds))
    lines = [f"`{cmd}` (seeds {args.seeds}; mean, range in brackets)", "",
             "| feedback | reward model | RM correct-vs-wrong | RM Kendall's tau | RM top-1 | "
             "GRPO true accuracy before -> after | lowest - before (worst seed) |", "|---|---|---|---|---|---|---|"]
    for feedback in FEEDBACK:
        for kind in RM_KINDS:
            rows = [r for r in results
                    if r["part"] == "reward model" and (r["feedback"], r["kind"]) == (feedback, kind)]
            if not rows:
                continue
            grpo_cell, low = "-", "-"
            if "after" in rows[0]:
                after = [r["after"] for r in rows]
                grpo_cell = (f"{_mean(r['before'] for r in rows):.1%} -> {_mean(after):.1%} "
                             f"[{min(after):.1%}, {max(after):.1%}]")
                low = f"{min(r['lowest'] - r['before'] for r in rows):+.1%}"
            lines.append(f"| {feedback} | {kind} | {_mean(r['correct_vs_wrong'] for r in rows):.1%} | "
                         f"{_mean(r['kendall_tau'] for r in rows):.3f} | {_mean(r['top1'] for r in rows):.1%} | "
                         f"{grpo_cell} | {low} |")
    lines += ["", "| reward | estimator | true accuracy before -> after | s to group's final accuracy (per seed) | "
              "GRPO s |", "|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in results if r["part"] == "estimator"):
        for est in ("group", "rank"):
            rows = [r for r in results if r["part"] == "estimator" and (r["task"], r["estimator"]) == (task, est)]
            after = [r["after"] for r in rows]
            reach = ", ".join("-" if r["seconds_to_group_final"] is None else f"{r['seconds_to_group_final']:.0f}"
                              for r in rows)
            lines.append(f"| {task} | {est} | {_mean(r['before'] for r in rows):.1%} -> {_mean(after):.1%} "
                         f"[{min(after):.1%}, {max(after):.1%}] | {reach} | {_mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
