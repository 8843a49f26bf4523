"""Which data teaches a process reward model on the step task (grpo.recipes.steps).

    flock /tmp/grpo-measure.lock .venv/bin/python -m bench.prm_data --sft-steps 350

One warm start (`grpo.recipes.steps.warm_start`), then one PRM per row of `RECIPES` on the warm
start's backbone (`grpo reward-model train --kind process`, the `prm` arm's settings of
bench.process_vs_outcome but for the steps and learning rate), from data labelled by the rule-based
step verifier:

- corrupted chains: each training chain with numbers off by one or operators swapped at random
  (`steps.prm_rows`), `copies` per chain;
- own samples: the warm start's samples of the first `prompts` training prompts, 4 each
  (`steps.policy_prm_rows`), the mistakes GRPO's completions make.

Every PRM is judged on the same held-out steps: the warm start's 4 samples of each held-out prompt,
labelled by the verifier. Prints per PRM its step accuracy, and the same on the bad steps and on the
good ones: most of the policy's steps are bad, so a PRM that calls every step bad scores high on
step accuracy and zero on the good steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.process_vs_outcome import PRM

# (name, corrupted copies of each training chain, training prompts sampled 4 times (-1: all),
#  training steps, learning rate)
RECIPES = [
    ("corrupted chains, 1 per training chain", 1, 0, 300, 1e-3),
    ("corrupted chains, 3 per training chain", 3, 0, 1000, 1e-3),
    ("2 corrupted per chain + own samples of 2000 prompts", 2, 2000, 1000, 1e-3),
    ("own samples of 2000 prompts (the prm arm's)", 0, 2000, 1000, 1e-3),
    ("own samples of every training prompt", 0, -1, 1500, 1e-3),
]
SAMPLES = 4


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the warm start's, the samples' and the PRMs' seed")
    parser.add_argument("--sft-steps", type=int, default=0, help="the warm start's steps (default: the recipe's)")
    parser.add_argument("--recipes", type=int, nargs="+", default=list(range(len(RECIPES))),
                        help="rows of RECIPES to run (default: all)")
    parser.add_argument("--heldout", type=int, default=0, help="held-out prompts sampled (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="/tmp/prm_data")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    from grpo.cli import quiet_libraries
    from grpo.config import RewardModelConfig, build
    from grpo.recipes import steps
    from grpo.supervised.reward_model import train_reward_model

    torch.set_num_threads(args.threads)
    quiet_libraries()
    out = Path(args.output_dir)
    sft, _, _, heldout_rows = steps.warm_start(out / "warm", args.seed,
                                               {"max_steps": args.sft_steps} if args.sft_steps else None)
    train_rows = steps.problems(args.seed)[0]
    length = steps.completion_tokens(train_rows + heldout_rows)
    # The held-out steps every PRM is judged on: the warm start's own, as GRPO will ask it to judge.
    heldout_rows = heldout_rows[:args.heldout or len(heldout_rows)]
    heldout = steps.write_jsonl(steps.policy_prm_rows(sft, heldout_rows, SAMPLES, seed=args.seed,
                                                      max_new_tokens=length), out / "heldout_steps.jsonl")
    own = {}  # samples per prompt count, drawn once and shared by the recipes that use them
    results = []
    for k in args.recipes:
        name, copies, prompts, max_steps, lr = RECIPES[k]
        t0 = time.time()
        rows = steps.prm_rows(train_rows, seed=args.seed, copies=copies) if copies else []
        if prompts:
            n = len(train_rows) if prompts < 0 else prompts
            if n not in own:
                own[n] = steps.policy_prm_rows(sft, train_rows[:n], SAMPLES, seed=args.seed, max_new_tokens=length)
            rows += own[n]
        data = steps.write_jsonl(rows, out / f"data_{k}.jsonl")
        summary = train_reward_model(build(RewardModelConfig, {
            **PRM, "model": str(sft), "dataset": str(data), "eval_dataset": str(heldout),
            "output_dir": str(out / f"prm_{k}"), "seed": args.seed, "max_steps": max_steps, "learning_rate": lr,
            "eval_steps": 0}, "prm_data"), quiet=True, overwrite=True)
        results.append({"recipe": name, "rows": len(rows), "max_steps": max_steps, "learning_rate": lr,
                        "seconds": time.time() - t0, **summary})
        print(f"{name}: {json.dumps(results[-1])}", flush=True)
    good = results[0]["eval_good_fraction"] if results else 0.0
    print(f"held-out: {len(heldout_rows)} prompts x {SAMPLES} samples of the warm start, "
          f"{good:.1%} of their steps good (always \"bad\" scores {1 - good:.1%})")
    print("| PRM data (verifier labels) | rows | steps | learning rate | all steps | bad steps | good steps |")
    print("|---|---|---|---|---|---|---|")

    def cell(x):  # a class with no held-out steps has no accuracy
        return "-" if x is None else f"{x:.1%}"

    for r in results:
        print(f"| {r['recipe']} | {r['rows']} | {r['max_steps']} | {r['learning_rate']:g} | "
              f"{cell(r['eval_step_accuracy'])} | {cell(r['eval_bad_step_accuracy'])} | "
              f"{cell(r['eval_good_step_accuracy'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"sft_steps": args.sft_steps, "seed": args.seed, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
