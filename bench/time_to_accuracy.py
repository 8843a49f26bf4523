"""The race: held-out greedy accuracy against training seconds, TRL's GRPOTrainer vs ours.

    .venv/bin/python -m bench.time_to_accuracy --trl-python .venv-bench/bin/python \\
        --budget 240 --seeds 0 1 2 --png /tmp/race.png --json /tmp/race.json

From the same warm start (the demo's SFT model, `grpo.recipes.addition.warm_start` with the
demo's seed; `--warm-start per-seed`: one per seed, its own base model, data and SFT) on the
demo's task (two-number addition, `exact_answer`, the 500 held-out problems), every system
trains for the same wall-clock budget with the same prompts per step (32), group size (8),
learning rate (1e-4), completion length (6) and threads (2):

- `trl`: TRL's GRPOTrainer with its defaults for everything else (beta 0, its default loss_type
  and scale_rewards, clip 0.2, a linear decay over max_steps = 10^6, i.e. constant here);
- ours, the demo's settings (`grpo.recipes.addition.GRPO`: preset grpo, beta 0.04, 10 warm-up
  steps) with: `default` (i.i.d. samples), `beam` (beam-search groups), `stochastic_beam`
  (groups drawn without replacement), `dynamic` (dynamic sampling), and on request
  `stochastic_beam_priority` (its debiased advantages), `dapo` (DAPO's recipe whole: preset dapo
  with dynamic sampling), `dynamic_mu2` (dynamic sampling, two updates per rollout) and
  `dynamic_beta0` (dynamic sampling without the KL penalty, TRL's beta).

Each run is a fresh subprocess (`worker` mode); runs are interleaved (every seed runs every
system, in a rotated order) so that drift in the machine's load hits all systems. The clock
counts training only: it stops while the held-out set is evaluated (every --eval-every training
seconds, with this package's greedy evaluator for both systems). Prints the curves, the time each
system needed to reach TRL's final accuracy, their final accuracies and the mean of their evaluations
in the budget's last quarter (a run's accuracy swings between evaluations: this leans less on the
last one); draws all curves in one PNG. `--report race.json [more.json ...] --budget B` re-prints
and re-draws the results that earlier runs saved with `--json`, taken together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_vs_trl import run_worker

ROOT = Path(__file__).resolve().parent.parent
SHARED = dict(prompts_per_step=32, group_size=8, learning_rate=1e-4, max_completion_length=6, max_prompt_length=16)
OURS = {
    "default": {},
    "beam": {"generation": "beam"},
    "stochastic_beam": {"generation": "stochastic_beam"},
    "dynamic": {"dynamic_sampling": True},
    "stochastic_beam_priority": {"generation": "stochastic_beam", "advantage_estimator": "priority"},
    # DAPO's recipe whole (arXiv 2503.14476): clip-higher, token-mean loss, no KL, dynamic sampling.
    "dapo": {"preset": "dapo", "dynamic_sampling": True},
    # Dynamic sampling with two passes over each rollout (GRPO's mu = 2: the clip then binds).
    "dynamic_mu2": {"dynamic_sampling": True, "num_iterations": 2},
    # Dynamic sampling without the KL penalty (TRL's default beta): no reference pass either.
    "dynamic_beta0": {"dynamic_sampling": True, "beta": 0.0},
}
SYSTEMS = ["trl", "default", "beam", "stochastic_beam", "dynamic"]


# ----------------------------------------------------------------------------------------------
# Workers: one run of one system, in its own process, printing one RESULT line.

class Clock:
    """Training seconds only: `pause()` ... `resume()` around each evaluation."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def evaluate(self, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - t


def heldout_accuracy(model, tokenizer, rows, max_prompts):
    """Greedy accuracy with grpo's evaluator, whichever system trained `model`."""
    import torch

    from grpo.config import TrainConfig
    from grpo.engine.backend import LocalBackend
    from grpo.rewards import Reward
    from grpo.rewards.functions import exact_answer
    from grpo.train.evaluate import evaluate

    cfg = TrainConfig(max_completion_length=SHARED["max_completion_length"],
                      max_prompt_length=SHARED["max_prompt_length"], eval_batch_size=256, apply_chat_template="never")
    with torch.no_grad():
        result = evaluate(LocalBackend(model, tokenizer), tokenizer, rows[:max_prompts],
                          [Reward("exact_answer", exact_answer)], cfg)
    return (result["values"]["exact_answer"] == 1).float().mean().item()


def run_ours(args) -> dict:
    import torch

    from grpo.config import TrainConfig, build
    from grpo.data import PromptSampler, load_rows
    from grpo.engine.backend import LocalBackend
    from grpo.engine.models import load_tokenizer
    from grpo.recipes.addition import GRPO
    from grpo.rewards import build_rewards
    from grpo.runs.models import load_models
    from grpo.runtime.distributed import World
    from grpo.runtime.optim import make_optimizer, make_scheduler
    from grpo.runtime.precision import Precision
    from grpo.runtime.setup import RunSetup
    from grpo.train.rollout import collect_rollout
    from grpo.train.update import update

    torch.manual_seed(args.seed)
    out = tempfile.mkdtemp(prefix="race-ours-")
    cfg = build(TrainConfig, {**GRPO, **SHARED, **OURS[args.system], "model": args.model, "dataset": args.train,
                              "output_dir": out, "seed": args.seed, "report_to": [], "num_threads": args.threads},
                f"race {args.system}")
    device = torch.device("cpu")
    precision = Precision(device, torch.float32)
    tokenizer = load_tokenizer(args.model)
    world = World()
    policy, reference = load_models(cfg, RunSetup(device, precision, world, None))
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, 10**6)
    rewards = build_rewards(cfg.rewards, device, torch.float32)
    rows, heldout = load_rows(args.train), load_rows(args.heldout)
    sampler = PromptSampler(len(rows), args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000)
    backend = LocalBackend(policy, tokenizer)

    def more_rows(n):  # what loop.py passes for dynamic sampling (one process)
        return [rows[i] for i in sampler.next(n)]

    clock = Clock()
    curve = [(0.0, clock.evaluate(lambda: heldout_accuracy(policy, tokenizer, heldout, args.eval_prompts)))]
    next_eval, steps, extra = args.eval_every, 0, []
    while True:
        batch = [rows[i] for i in sampler.next(cfg.prompts_per_step)]
        rollout = collect_rollout(policy, reference, tokenizer, batch, rewards, cfg, generator, precision=precision,
                                  backend=backend, more_rows=more_rows)
        update(policy, optimizer, scheduler, rollout, cfg, world, generator, precision)
        backend.sync_weights(policy)
        steps += 1
        extra.append({k: v for k, v in rollout.sampling_stats.items()})
        elapsed = clock.train_seconds()
        if elapsed >= next_eval or elapsed >= args.budget:
            curve.append((elapsed, clock.evaluate(lambda: heldout_accuracy(policy, tokenizer, heldout,
                                                                             args.eval_prompts))))
            next_eval += args.eval_every
        if elapsed >= args.budget:
            break
    result = dict(system=args.system, seed=args.seed, curve=curve, steps=steps)
    if any(extra):
        result["dynamic_sampling"] = {k: statistics.mean(e[k] for e in extra) for k in extra[0]}
    return result


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.data import load_rows
    from grpo.rewards.functions import exact_answer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows, heldout = load_rows(args.train), load_rows(args.heldout)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    fields = GRPOConfig.__dataclass_fields__
    optional = {k: v for k, v in dict(max_prompt_length=SHARED["max_prompt_length"], log_completions=False).items()
                if k in fields}
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="race-trl-"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=SHARED["prompts_per_step"] * SHARED["group_size"],  # TRL counts completions
        num_generations=SHARED["group_size"], max_completion_length=SHARED["max_completion_length"],
        learning_rate=SHARED["learning_rate"], max_steps=10**6, logging_strategy="no", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed, **optional)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    curve, state = [], {"next": args.eval_every, "steps": 0}

    class Race(TrainerCallback):
        def on_train_begin(self, a, s, control, **kw):
            self.clock = Clock()
            curve.append((0.0, self.clock.evaluate(lambda: heldout_accuracy(trainer.model, tokenizer, heldout,
                                                                              args.eval_prompts))))

        def on_step_end(self, a, s, control, **kw):
            state["steps"] += 1
            elapsed = self.clock.train_seconds()
            if elapsed >= state["next"] or elapsed >= args.budget:
                curve.append((elapsed, self.clock.evaluate(lambda: heldout_accuracy(trainer.model, tokenizer, heldout,
                                                                                     args.eval_prompts))))
                state["next"] += args.eval_every
            if elapsed >= args.budget:
                control.should_training_stop = True

    trainer.add_callback(Race())
    trainer.train()
    return dict(system="trl", seed=args.seed, curve=curve, steps=state["steps"],
                trl_version=__import__("trl").__version__, loss_type=getattr(config, "loss_type", None),
                beta=config.beta)


def tied_fraction(model_dir: str, train: str, seed: int, prompts: int, modes: list[str]) -> dict[str, float]:
    """The fraction of groups whose G rewards all tie, per generation mode, at the warm start:
    one rollout of `prompts` prompts (the same ones for every mode), no training."""
    import torch

    from grpo import algorithm
    from grpo.config import TrainConfig, build
    from grpo.data import PromptSampler, load_rows
    from grpo.engine.models import load_causal_lm, load_tokenizer
    from grpo.recipes.addition import GRPO
    from grpo.rewards import build_rewards
    from grpo.train.rollout import collect_rollout

    tokenizer = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    rows = load_rows(train)
    batch = [rows[i] for i in PromptSampler(len(rows), seed).next(prompts)]
    out = {}
    for mode in modes:
        cfg = build(TrainConfig, {**GRPO, **SHARED, "model": model_dir, "dataset": train, "generation": mode,
                                  "prompts_per_step": prompts, "beta": 0.0, "report_to": []}, "ties")
        rewards = build_rewards(cfg.rewards, torch.device("cpu"), torch.float32)
        rollout = collect_rollout(policy, None, tokenizer, batch, rewards, cfg, torch.Generator().manual_seed(seed))
        out[mode] = algorithm.zero_variance_groups(rollout.rewards, cfg.group_size).float().mean().item()
        out[f"{mode}_accuracy"] = rollout.rewards.mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# The driver.

def accuracy_at(curve, t: float) -> float:
    """The last evaluated accuracy at or before training second t."""
    return [a for s, a in curve if s <= t + 1e-9][-1]


def time_to(curve, level: float) -> float | None:
    return next((s for s, a in curve if a >= level - 1e-9), None)


def late_mean(curve, budget: float) -> float:
    """The mean of the evaluations in the budget's last quarter, the final one included: one run's
    accuracy swings by several points between evaluations, and this leans less on the last one."""
    return statistics.mean(a for s, a in curve if s >= 0.75 * budget - 1e-9)


def report(results: list[dict], budget: float) -> str:
    systems = list(dict.fromkeys(r["system"] for r in results))
    trl = {r["seed"]: r for r in results if r["system"] == "trl"}
    trl_final = {seed: r["curve"][-1][1] for seed, r in trl.items()}
    trl_time = {seed: time_to(r["curve"], trl_final[seed]) for seed, r in trl.items()}
    trl_late = {seed: late_mean(r["curve"], budget) for seed, r in trl.items()}
    marks = [0, budget / 4, budget / 2, 3 * budget / 4]
    lines = [f"Held-out greedy accuracy against training seconds (evaluation excluded); budget {budget:.0f} s per "
             "run. \"s to TRL's final\": the first evaluation at or above TRL's final accuracy (same seed), and "
             "that time over TRL's own.", "",
             "| system | seed | steps | " + " | ".join(f"acc @ {m:.0f}s" for m in marks)
             + " | final | s to TRL's final (x TRL's) | final - TRL's |", "|---" * (6 + len(marks)) + "|"]
    summary = {}
    for system in systems:
        for r in sorted((r for r in results if r["system"] == system), key=lambda r: r["seed"]):
            accs = [accuracy_at(r["curve"], m) for m in marks]
            final, target = r["curve"][-1][1], trl_final.get(r["seed"])
            reach = time_to(r["curve"], target) if target is not None else None
            own = trl_time.get(r["seed"])
            ratio = f" ({reach / own:.2f}x)" if reach is not None and own else ""
            gap = final - target if target is not None else None
            late = late_mean(r["curve"], budget)
            late_gap = late - trl_late[r["seed"]] if r["seed"] in trl_late else None
            summary.setdefault(system, []).append(dict(final=final, reach=reach, gap=gap, late=late,
                                                       late_gap=late_gap))
            lines.append(f"| {system} | {r['seed']} | {r['steps']} | " + " | ".join(f"{a:.1%}" for a in accs)
                         + f" | {final:.1%} | {'-' if reach is None else f'{reach:.0f}{ratio}'} | "
                         + f"{'-' if gap is None else f'{100 * gap:+.1f} pts'} |")
    lines += ["", "| system | mean final | mean s to TRL's final (seeds that reach it) | mean final - TRL's "
              "| mean of the last quarter's evaluations | that - TRL's |", "|---|---|---|---|---|---|"]

    def points(rows, key):  # the mean gap in points over the seeds that have one
        gaps = [row[key] for row in rows if row[key] is not None]
        return f"{100 * statistics.mean(gaps):+.1f} pts" if gaps else "-"

    for system, rows in summary.items():
        reached = [row["reach"] for row in rows if row["reach"] is not None]
        reach = f"{statistics.mean(reached):.0f} ({len(reached)}/{len(rows)})" if reached else f"- (0/{len(rows)})"
        lines.append(f"| {system} | {statistics.mean(row['final'] for row in rows):.1%} | {reach} | "
                     f"{points(rows, 'gap')} | {statistics.mean(row['late'] for row in rows):.1%} | "
                     f"{points(rows, 'late_gap')} |")
    for r in results:
        if "dynamic_sampling" in r:
            d = r["dynamic_sampling"]
            lines.append(f"\n{r['system']} seed {r['seed']}: per step on average {d['dynamic_sampling/rounds']:.2f} "
                         f"generation rounds, {d['dynamic_sampling/prompts_generated']:.1f} prompts generated, "
                         f"{d['dynamic_sampling/zero_variance_frac']:.1%} of their groups tied.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, budget: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    systems = list(dict.fromkeys(r["system"] for r in results))
    colors = plt.get_cmap("tab10")
    for k, system in enumerate(systems):
        runs = [r for r in results if r["system"] == system]
        for j, r in enumerate(runs):
            xs, ys = zip(*r["curve"])
            ax.step(xs, ys, where="post", color=colors(k), alpha=0.35 if len(runs) > 1 else 1.0, linewidth=1,
                    label=None if len(runs) > 1 else system)
        if len(runs) > 1:  # the mean over seeds, on a common grid
            grid = [budget * i / 200 for i in range(201)]
            mean = [statistics.mean(accuracy_at(r["curve"], t) for r in runs) for t in grid]
            ax.plot(grid, mean, color=colors(k), linewidth=2.2, label=f"{system} (mean of {len(runs)})")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_xlim(0, budget)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Time to accuracy from the demo's warm start")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("system", choices=["trl", *OURS])
        for name in ("--model", "--train", "--heldout"):
            ap.add_argument(name, required=True)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--budget", type=float, default=240)
        ap.add_argument("--eval-every", type=float, default=20)
        ap.add_argument("--eval-prompts", type=int, default=500)
        ap.add_argument("--threads", type=int, default=2)
        args = ap.parse_args(argv)
        from bench.common import emit, set_threads
        set_threads(args.threads)
        emit(run_trl(args) if args.system == "trl" else run_ours(args))
        return

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=["trl", *OURS])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=240, help="training seconds per run")
    ap.add_argument("--eval-every", type=float, default=20, help="training seconds between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out problems evaluated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=0, help="0: the demo's SFT schedule (smoke tests: fewer)")
    ap.add_argument("--warm-start", default="demo", choices=["demo", "per-seed"],
                    help="demo: every seed starts from the demo's SFT model (its seed, 0) and data, and the seeds "
                         "vary the RL runs only; per-seed: each seed builds its own base model, data and SFT")
    ap.add_argument("--work-dir", default="/tmp/grpo-race", help="warm starts are built and kept here")
    ap.add_argument("--python", default=sys.executable, help="interpreter for grpo's runs")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed")
    ap.add_argument("--json", default="", help="also write raw results here")
    ap.add_argument("--report", nargs="+", default=[], metavar="JSON",
                    help="run nothing: print the table and draw the PNG of the results earlier --json runs wrote "
                         "(several files: their runs together, e.g. more seeds)")
    ap.add_argument("--png", default="race.png")
    ap.add_argument("--ties", type=int, default=0, metavar="PROMPTS",
                    help="only measure, at each warm start, the fraction of tied groups of one rollout of PROMPTS "
                         "prompts per generation mode (no training)")
    args = ap.parse_args(argv)
    if args.report:
        results = [r for path in args.report for r in json.loads(Path(path).read_text())]
        print(report(results, args.budget))
        plot(results, Path(args.png), args.budget)
        print(f"\ncurves: {args.png}")
        return

    from bench.common import set_threads
    from grpo.recipes.addition import warm_start
    set_threads(args.threads)
    results = []
    for k, seed in enumerate(args.seeds):
        start = seed if args.warm_start == "per-seed" else 0  # the demo's seed
        work = Path(args.work_dir) / f"seed{start}" / (f"sft{args.sft_steps}" if args.sft_steps else "demo")
        if not (work / "sft" / "config.json").exists():
            print(f"[race] warm start of seed {start} (the demo's SFT) under {work}", flush=True)
            warm_start(work, start, {"max_steps": args.sft_steps} if args.sft_steps else None)
        if args.ties:
            ties = tied_fraction(str(work / "sft"), str(work / "data" / "train.jsonl"), seed, args.ties,
                                 ["sample", "beam", "stochastic_beam"])
            print(f"[ties seed {seed}] tied groups of {args.ties} x {SHARED['group_size']}: " + ", ".join(
                f"{m} {ties[m]:.1%} (reward mean {ties[m + '_accuracy']:.1%})"
                for m in ("sample", "beam", "stochastic_beam")), flush=True)
            continue
        files = ["--model", str(work / "sft"), "--train", str(work / "data" / "train.jsonl"),
                 "--heldout", str(work / "data" / "heldout.jsonl")]
        common = [*files, "--seed", str(seed), "--budget", str(args.budget), "--eval-every", str(args.eval_every),
                  "--eval-prompts", str(args.eval_prompts), "--threads", str(args.threads)]
        order = args.systems[k % len(args.systems):] + args.systems[:k % len(args.systems)]
        for system in order:
            python = args.trl_python if system == "trl" else args.python
            r = run_worker(python, "worker", [system, *common], timeout=args.budget * 4 + 1800,
                           module="bench.time_to_accuracy")
            results.append(r)
            print(f"[race seed {seed}] {system:24s} {r['steps']:4d} steps  accuracy "
                  f"{r['curve'][0][1]:.1%} -> {r['curve'][-1][1]:.1%}", flush=True)
    if args.ties:
        return
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print(report(results, args.budget))
    plot(results, Path(args.png), args.budget)
    print(f"\ncurves: {args.png}")


if __name__ == "__main__":
    main()
