"""The seed pipeline's grid: reward-model kind x guard x generation, over seeds.

    .venv/bin/python -m bench.seed_pipeline --seeds 0 1 2 --json seed_grid.json

Per seed, once: the demo's warm start (grpo.recipes.addition.warm_start), the pipeline's
preference pairs (grpo.recipes.pipeline.PREFERENCES: correct-vs-wrong, 2000 training and 250
held-out prompts) and its reward models: the score head, the likelihood verifier (BT + NLL), DPO's
implicit reward, and two more score heads of other seeds for the ensemble. Then GRPO from the warm
start with reward = the reward model's score (the verifier logged with weight 0), 100 steps,
held-out accuracy on 500 problems every 25 steps, for each row of VARIANTS and both generations.

Prints, per (reward model, guard, generation): the reward model's held-out correct-vs-wrong
accuracy, true accuracy before and after (mean over seeds, and the range), the lowest held-out
accuracy at any evaluation during training minus the warm start (the worst over seeds), and the
seconds of GRPO.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import pipeline_preferences

# Reward model -> its RewardModelConfig settings over the pipeline's (grpo.recipes.pipeline.REWARD_MODEL).
REWARD_MODELS = {
    "score head": dict(kind="score_head", nll_coef=0.0),
    "likelihood + NLL": dict(),  # the pipeline's own
    "DPO implicit": dict(kind="dpo", nll_coef=0.0, dpo_beta=0.1),
}
# (reward model, guard) -> GRPO settings over the pipeline's SEED_GRPO (no iterative RL unless named).
VARIANTS = {
    ("score head", "none"): {},
    ("score head", "normalise + clip 1"): {"rmspec": {"normalize": True, "clip": 1.0}},
    ("score head", "KL in loss 0.2"): {"beta": 0.2},
    ("score head", "KL in reward 0.1"): {"reward_kl_coef": 0.1},
    ("score head", "ensemble min of 3"): {"ensemble": "min"},
    ("score head", "best held-out"): {"early_stopping_patience": 2, "load_best_model_at_end": True},
    ("score head", "iterative RL"): {"iterative": True},
    ("likelihood + NLL", "none"): {},
    ("likelihood + NLL", "iterative RL"): {"iterative": True},
    ("DPO implicit", "none"): {},
}
GENERATIONS = ("beam", "sample")


def prepare(seed: int, work: Path) -> Path:
    from grpo.recipes.addition import warm_start
    from grpo.recipes.pipeline import _correct_pairs_file

    out = work / f"seed{seed}"
    if not (out / "sft" / "model.safetensors").exists():
        out.mkdir(parents=True, exist_ok=True)
        warm_start(out, seed, quiet=True)
    pipeline_preferences(out, seed, "preferences")
    correct = out / "data" / "heldout_correct_pairs.jsonl"
    if not correct.exists():
        _correct_pairs_file(out / "data" / "preferences_heldout.jsonl", correct)
    return out


def reward_model(out: Path, seed: int, name: str, settings: dict, member: int = 0) -> tuple[Path, float]:
    """A trained reward model (cached) and its held-out correct-vs-wrong accuracy."""
    from grpo.config import RewardModelConfig, RewardModelEvalConfig, build
    from grpo.recipes.pipeline import REWARD_MODEL
    from grpo.supervised.reward_model import eval_reward_model, train_reward_model

    directory = out / ("rm_" + name.replace(" ", "_").replace("+", "") + (f"_{member}" if member else ""))
    if not (directory / "accuracy.json").exists():
        train_reward_model(build(RewardModelConfig, {
            "model": str(out / "sft"), "dataset": str(out / "data" / "preferences_train.jsonl"),
            "eval_dataset": str(out / "data" / "preferences_heldout.jsonl"), "output_dir": str(directory),
            "seed": seed * 100 + member, **REWARD_MODEL, "report_to": [], **settings}), quiet=True, overwrite=True)
        accuracy = eval_reward_model(build(RewardModelEvalConfig, {
            "model": str(directory), "dataset": str(out / "data" / "heldout_correct_pairs.jsonl"),
            "max_length": REWARD_MODEL["max_length"]}), quiet=True)["accuracy"]
        (directory / "accuracy.json").write_text(json.dumps({"correct_vs_wrong": accuracy}))
    return directory, json.loads((directory / "accuracy.json").read_text())["correct_vs_wrong"]


def grpo(out: Path, seed: int, rm: str, guard: dict, generation: str) -> dict:
    from grpo.config import TrainConfig, build
    from grpo.recipes.pipeline import ITERATIVE, SEED_GRPO
    from grpo.train.loop import train

    tag = "_".join(guard) or "none"  # every guard its own run directory (and cached result)
    guard = dict(guard)
    spec = {"name": "reward_model", **guard.pop("rmspec", {})}
    if guard.pop("ensemble", None):
        members = [str(reward_model(out, seed, "score head", REWARD_MODELS["score head"], m)[0]) for m in range(3)]
        spec.update(model=members, ensemble="min")
    else:
        spec["model"] = str(reward_model(out, seed, rm, REWARD_MODELS[rm])[0])
    if guard.pop("iterative", False):
        guard["iterative_rl"] = {**ITERATIVE, "replay_dataset": str(out / "data" / "preferences_train.jsonl")}
    run = out / "runs" / f"{rm}_{tag}_{generation}".replace(" ", "_").replace("+", "")
    if (run / "result.json").exists():  # measured by an earlier invocation
        return json.loads((run / "result.json").read_text())
    cfg = build(TrainConfig, {**SEED_GRPO, "model": str(out / "sft"), "dataset": str(out / "data" / "train.jsonl"),
                              "eval_dataset": str(out / "data" / "heldout.jsonl"), "eval_max_prompts": 500,
                              "output_dir": str(run), "seed": seed, "generation": generation, "report_to": [],
                              "save_steps": 0, **guard,
                              "rewards": [spec, {"function": "exact_answer", "weight": 0.0}]})
    start = time.time()
    train(cfg, quiet=True, overwrite=True)
    summary = json.loads((run / "summary.json").read_text())
    evals = [json.loads(l).get("eval/accuracy") for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e is not None]
    result = {"before": summary["eval_before"]["eval_accuracy"], "after": summary["eval_after"]["eval_accuracy"],
              "lowest": min(evals[1:]), "seconds": time.time() - start}
    (run / "result.json").write_text(json.dumps(result))
    return result


def main() -> None:
    from grpo.cli import quiet_libraries

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-dir", default="runs/bench_seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        out = prepare(seed, Path(args.work_dir))
        for (rm, guard), settings in VARIANTS.items():
            accuracy = None if "ensemble" in settings else reward_model(out, seed, rm, REWARD_MODELS[rm])[1]
            if "ensemble" in settings:
                accuracy = min(reward_model(out, seed, rm, REWARD_MODELS[rm], m)[1] for m in range(3))
            for generation in GENERATIONS:
                r = grpo(out, seed, rm, settings, generation)
                results.append({"seed": seed, "reward_model": rm, "guard": guard, "generation": generation,
                                "rm_correct_vs_wrong": accuracy, **r})
                print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results, args))


def table(results: list[dict], args) -> str:
    cmd = "python -m bench.seed_pipeline --seeds " + " ".join(map(str, args.seeds))
    lines = [f"`{cmd}` (seeds {args.seeds}; mean, range in brackets)", "",
             "| reward model | guard | groups | RM correct-vs-wrong | true accuracy before -> after | "
             "lowest during - before (worst seed) | GRPO s |", "|---|---|---|---|---|---|---|"]
    for (rm, guard) in VARIANTS:
        for generation in GENERATIONS:
            rows = [r for r in results if (r["reward_model"], r["guard"], r["generation"]) == (rm, guard, generation)]
            if not rows:
                continue
            after = [r["after"] for r in rows]
            lines.append(
                f"| {rm} | {guard} | {generation} | {statistics.mean(r['rm_correct_vs_wrong'] for r in rows):.1%} | "
                f"{statistics.mean(r['before'] for r in rows):.1%} -> {statistics.mean(after):.1%} "
                f"[{min(after):.1%}, {max(after):.1%}] | {min(r['lowest'] - r['before'] for r in rows):+.1%} | "
                f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
