"""The calculator agent task trained by grpo and by TRL's GRPOTrainer(tools=...), interleaved.

    .venv/bin/python -m bench.agents_vs_trl --trl-python .venv-bench/bin/python --rounds 3 --steps 30

The task is `grpo demo --task calculator`'s (grpo.recipes.calculator): 3-digit products that the
tiny model answers by calling the real `multiply(a, b)` tool and copying its result. The warm
start is the demo's (supervised on synthetic episodes until a quarter of a probe is solved),
made once and saved; both systems load the same saved model and train it on the same rows with
the demo's GRPO hyperparameters, as far as both have them:

- 8 prompts x 8 episodes per optimizer step, one update per rollout, at most 128 episode tokens,
  at most 3 model turns (TRL: max_tool_calling_iterations=2), temperature 0.5, beta 0,
  learning rate 3e-4 constant after 5 warm-up steps, AdamW betas (0.9, 0.99), clipping at 1.0,
  float32, `--threads` intra-op threads (1 by default: the runs then time the same work whatever
  else the machine does);
- the loss: per-sequence mean of token losses, advantages scaled by the group's std (ours
  `loss_aggregation: sequence_mean`, `advantage_estimator: group`; TRL `loss_type="grpo"`,
  `scale_rewards="group"`); tool tokens masked out of the loss in both;
- the same reward (`final_answer`: the last assistant message is the product).

TRL generates with transformers' `generate` (`use_vllm=False`) and parses calls with the
Qwen3 response template (`trl.chat_template_utils.qwen3_template`, the `<tool_call>` JSON format
this tokenizer's template writes). Both are scored by the same evaluator every `--eval-every`
steps: the demo's greedy episodes on the same held-out problems (`calculator.probe_success`
for TRL, `grpo train`'s own evaluation for ours; both print the warm start's score, which
must agree). Evaluation time is not training time.

Each run is a fresh subprocess, rounds interleave (ours, TRL, ours, TRL, ...) so that drift in
the machine's load hits both. Printed: median seconds per step, their ratio, each system's
success along the way, and the training seconds each took to first reach TRL's final success
rate (median over rounds), and their ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_vs_trl import run_worker

# grpo.recipes.calculator.GRPO's keys, as both systems spell them.
TURNS, TOKENS, PROMPTS, GROUP, LR, WARMUP, TEMPERATURE = 3, 128, 8, 8, 3e-4, 5, 0.5


def warm_start(models_dir: Path, seed: int) -> Path:
    """The demo's warm start for `seed`, made once: the model, tokenizer and data under models_dir."""
    import torch

    from grpo.recipes import calculator as calc
    from grpo.recipes.tasks import build_tiny_model

    recipe = hashlib.sha1(json.dumps([calc.MODEL, calc.WARM], sort_keys=True).encode()).hexdigest()[:8]
    out = models_dir / f"calculator-warm-seed{seed}-{recipe}"  # made again when the recipe changes
    if (out / "done.json").exists():
        return out
    torch.set_num_threads(1)
    tokenizer = calc.build_tokenizer()
    model = build_tiny_model(len(tokenizer), **calc.MODEL, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    train_rows, heldout_rows = calc.problems(seed)
    torch.manual_seed(seed)
    steps = calc.warm_start(model, tokenizer, train_rows, seed, **calc.WARM)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    calc.write_rows(train_rows, out / "train.jsonl")
    calc.write_rows(heldout_rows, out / "heldout.jsonl")
    (out / "done.json").write_text(json.dumps({"warm_steps": steps, "seed": seed}))
    return out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose success is >= target (None if none is)."""
    return next((p["seconds"] for p in curve if p["success"] >= target - 1e-6), None)  # float32 means


# ---------------------------------------------------------------------------------------------
# Workers: one run of one system in its own process, printing one RESULT line.

def run_ours(args) -> dict:
    import torch

    from grpo.config import TrainConfig, build
    from grpo.recipes import calculator as calc
    from grpo.train.loop import train

    warm = Path(args.warm)
    out = Path(tempfile.mkdtemp(prefix="agents-ours-"))
    cfg = build(TrainConfig, {
        **calc.GRPO, "model": str(warm / "model"), "dataset": str(warm / "train.jsonl"),
        "eval_dataset": str(warm / "heldout.jsonl"), "eval_max_prompts": args.heldout, "output_dir": str(out),
        "seed": args.seed, "max_steps": args.steps, "eval_steps": args.eval_every, "logging_steps": 1,
        "num_threads": args.threads}, "agents_vs_trl")
    torch.set_num_threads(args.threads)
    train(cfg, quiet=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def get(r, *keys):
        return next((r[k] for k in keys if k in r), None)
    steps, curve, elapsed = [], [], 0.0
    for r in records:
        seconds = get(r, "seconds_step", "time/step")
        if seconds is not None:
            steps.append(seconds)
            elapsed += seconds
        success = get(r, "eval_accuracy", "eval/accuracy")
        if success is not None:
            curve.append({"step": r["step"], "seconds": elapsed, "success": success})
    return dict(system="ours", step_seconds=steps, curve=curve)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from bench.workers import trl_version_kwargs
    from grpo.recipes import calculator as calc

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warm = Path(args.warm)
    tokenizer = AutoTokenizer.from_pretrained(warm / "model")
    tokenizer.padding_side = "left"
    # TRL parses tool calls with transformers' response parsing; this template writes Qwen's
    # `<tool_call>{json}</tool_call>` blocks, so Qwen3's response template reads them.
    tokenizer.response_template = qwen3_template
    scorer = AutoTokenizer.from_pretrained(warm / "model")  # the evaluator's, without TRL's template
    model = AutoModelForCausalLM.from_pretrained(warm / "model", dtype=torch.float32)
    dataset = Dataset.from_list(read_rows(warm / "train.jsonl"))
    heldout = read_rows(warm / "heldout.jsonl")[:args.heldout]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="agents-trl-"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=TOKENS, max_tool_calling_iterations=TURNS - 1,
        beta=0.0, num_iterations=1, temperature=TEMPERATURE, learning_rate=LR,
        lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP, adam_beta2=0.99, max_grad_norm=1.0,
        weight_decay=0.0, max_steps=args.steps, logging_strategy="no", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed, loss_type="grpo", scale_rewards="group", use_vllm=False,
        **trl_version_kwargs(args))
    trainer = GRPOTrainer(model=model, reward_funcs=calc.final_answer, args=config, train_dataset=dataset,
                          processing_class=tokenizer, tools=[calc.multiply])

    def score() -> float:
        was = trainer.model.training
        trainer.model.eval()
        success = calc.probe_success(trainer.model, scorer, heldout)
        trainer.model.train(was)
        return success

    steps: list[float] = []
    curve = [{"step": 0, "seconds": 0.0, "success": score()}]

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append(time.perf_counter() - self.t0)
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                curve.append({"step": state.global_step, "seconds": sum(steps), "success": score()})

    trainer.add_callback(Clock())
    trainer.train()
    return dict(system="trl", step_seconds=steps, curve=curve, trl_version=__import__("trl").__version__)


def worker(argv: list[str]) -> None:
    from bench.common import emit
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["ours", "trl"])
    ap.add_argument("--warm", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--eval-every", type=int, required=True)
    ap.add_argument("--heldout", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    emit(run_ours(args) if args.system == "ours" else run_trl(args))


# ---------------------------------------------------------------------------------------------

def summarise(runs: dict) -> dict:
    """Median s/step per system, TRL's final success, and each system's time to reach it."""
    out = {}
    for system, results in runs.items():
        skip = [s for r in results for s in r["step_seconds"][1:]]  # the first step compiles nothing but warms caches
        out[system] = {"median": statistics.median(skip), "final": statistics.median(r["curve"][-1]["success"]
                                                                                      for r in results),
                       "before": statistics.median(r["curve"][0]["success"] for r in results)}
    if "trl" in runs:
        target = out["trl"]["final"]
        for system, results in runs.items():
            reached = [first_reach(r["curve"], target) for r in results]
            hit = [x for x in reached if x is not None]
            out[system]["reached"] = reached
            out[system]["to_target"] = statistics.median(hit) if len(hit) == len(reached) else None
        out["target"] = target
    return out


def report(runs: dict, args) -> str:
    s = summarise(runs)
    lines = [f"Calculator agent task, seed {args.seed}, {args.threads} thread(s): {PROMPTS} prompts x {GROUP} "
             f"episodes per step, "
             f"<= {TURNS} turns, <= {TOKENS} tokens; {args.rounds} interleaved rounds x {args.steps} steps; "
             f"held-out success on {args.heldout} problems every {args.eval_every} steps.", "",
             "| system | median s/step | TRL s/step / ours | success before -> after (median) "
             "| training s to TRL's final success (median) | TRL's time / ours |",
             "|---|---|---|---|---|---|"]
    for system in runs:
        x = s[system]
        ratio = s["trl"]["median"] / x["median"] if system == "ours" and "trl" in s else None
        to = x.get("to_target")
        t_ratio = (s["trl"]["to_target"] / to if system == "ours" and to and s.get("trl", {}).get("to_target")
                   else None)
        lines.append(f"| {system} | {x['median']:.2f} | {'%.2fx' % ratio if ratio else ''} | "
                     f"{x['before']:.0%} -> {x['final']:.0%} | "
                     f"{'%.0f' % to if to is not None else 'not reached in every round'} | "
                     f"{'%.2fx' % t_ratio if t_ratio else ''} |")
    lines += ["", "Success along the way (step: success @ training seconds), per round:"]
    for system, results in runs.items():
        for i, r in enumerate(results):
            lines.append(f"- {system} round {i + 1}: " + ", ".join(
                f"{p['step']}: {p['success']:.0%} @ {p['seconds']:.0f}s" for p in r["curve"]))
    if "target" in s:
        lines.append(f"TRL's final success (median over rounds): {s['target']:.0%}.")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("ours", "trl"):
        return worker(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="GRPO steps per run")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=100, help="held-out problems scored")
    ap.add_argument("--seed", type=int, default=0, help="the warm start's and both runs' seed")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every run, both systems")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--python", default=sys.executable, help="interpreter for grpo's runs")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--json", default="", help="also write raw results here")
    args = ap.parse_args(argv)
    from grpo.cli import quiet_libraries

    quiet_libraries()  # the warm start's save would print transformers' progress bars
    t = time.time()
    warm = warm_start(Path(args.models_dir), args.seed)
    print(f"warm start {warm} ({time.time() - t:.0f}s)", flush=True)
    common = ["--warm", str(warm), "--steps", str(args.steps), "--eval-every", str(args.eval_every),
              "--heldout", str(args.heldout), "--seed", str(args.seed), "--threads", str(args.threads)]
    runs: dict = {"ours": [], **({} if args.skip_trl else {"trl": []})}
    for r in range(args.rounds):
        for system in runs:
            py = args.python if system == "ours" else args.trl_python
            res = run_worker(py, system, common, module="bench.agents_vs_trl")
            runs[system].append(res)
            curve = ", ".join(f"{p['step']}: {p['success']:.0%}" for p in res["curve"])
            print(f"[round {r + 1}/{args.rounds}] {system:4s} median {statistics.median(res['step_seconds']):.2f}s"
                  f"/step; success {curve}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    print()
    print(report(runs, args))


if __name__ == "__main__":
    main()
