"""`grpo demo --task steps`: a multi-step task where the final answer alone is a sparse signal.

An arithmetic expression is evaluated one reduction per line, `(3+4)*5-6=` ->
`7*5-6` / `35-6` / `29`: the innermost brackets first, then the first `*`, then the first `+` or
`-`, one operation per line (`reduce_once`). Every line is checkable (`step_verifier`, the
rule-based step reward), and only the last line is the answer (`final_answer`, the outcome).

1. Build the tiny model with a character tokenizer that has brackets and the newline.
2. Warm it up with `grpo sft` on correct chains for a few hundred steps only, stopped while
   chains that are right all the way down are still a minority.
3. GRPO with process supervision (`advantage_estimator: process`, the outcome plus the step
   verifier, steps cut at "\\n"), or with the outcome alone (`--set advantage_estimator=group`
   and the outcome reward only: bench/process_vs_outcome.py compares the two).
4. Greedy held-out final-answer accuracy before and after.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch

from grpo.config import SFTConfig, TrainConfig, build
from grpo.supervised.sft import train_sft
from grpo.train.loop import train

from .addition import claim_recipe_dir
from .tasks import build_char_tokenizer, build_tiny_model, write_jsonl

CHARS = list("0123456789+-*()=\n")
_TOKEN = re.compile(r"\d+|[-+*()]")
_UNARY_MINUS = re.compile(r"(^|[-+*(])-")
OPERATORS = 3      # operations per expression: chains of three lines (the demo's)
MAX_VALUE = 99     # every intermediate value stays in [0, MAX_VALUE]
HELDOUT = 300

# Stopped early on purpose, so that GRPO has room, but not too early: GRPO learns only from groups
# whose completions disagree, and a warm start that gets almost every chain wrong leaves most groups
# all wrong, with no signal at all; the few that teach then pull the policy around at random.
# A chain is at most 19 characters: 24 tokens hold it and its EOS.
SFT = dict(max_steps=400, batch_size=64, learning_rate=1e-3, warmup_steps=30, lr_scheduler="constant",
           logging_steps=50, max_completion_length=24, max_prompt_length=16)
PROCESS_REWARDS = [{"function": "grpo.recipes.steps:final_answer"},
                   {"function": "grpo.recipes.steps:step_verifier", "per": "step"}]
OUTCOME_REWARDS = [{"function": "grpo.recipes.steps:final_answer"}]
# The learning rate is kept moderate: a step's signal comes from a handful of groups, and Adam makes
# even a noisy one a full-sized step; a higher rate turns that noise into drift away from the warm start.
GRPO = dict(max_steps=150, prompts_per_step=16, group_size=8, max_completion_length=24, max_prompt_length=16,
            learning_rate=1e-4, warmup_steps=5, lr_scheduler="constant", temperature=1.0, beta=0.0,
            micro_batch_size=128, logging_steps=1, eval_steps=25, samples_steps=0, save_steps=0,
            advantage_estimator="process", step_delimiter="\n", rewards=PROCESS_REWARDS,
            accuracy_reward="final_answer")


def tokens(expression: str) -> list[str]:
    return _TOKEN.findall(expression)


def _reduce_flat(ts: list[str]) -> list[str]:
    """One operation of a bracket-free expression: the first `*`, else the first `+` or `-`."""
    k = ts.index("*") if "*" in ts else next(i for i, t in enumerate(ts) if t in "+-")
    if not 0 < k < len(ts) - 1 or not (ts[k - 1].isdigit() and ts[k + 1].isdigit()):
        raise ValueError(f"no operation to reduce in {''.join(ts)!r}")
    a, op, b = int(ts[k - 1]), ts[k], int(ts[k + 1])
    value = a * b if op == "*" else a + b if op == "+" else a - b
    return ts[:k - 1] + [str(value)] + ts[k + 2:]


def reduce_once(expression: str) -> str:
    """The expression after its next reduction: inside the innermost (first) brackets when there
    are any, their brackets dropped once they hold one number."""
    ts = tokens(expression)
    if ")" in ts:
        close = ts.index(")")
        open_ = max(i for i in range(close) if ts[i] == "(")
        inner = _reduce_flat(ts[open_ + 1:close])
        ts = ts[:open_] + (inner if len(inner) == 1 else ["(", *inner, ")"]) + ts[close + 1:]
    else:
        ts = _reduce_flat(ts)
    return "".join(ts)


def chain(expression: str) -> list[str]:
    """The lines that evaluate `expression`, one reduction each; the last is its value."""
    out = [expression]
    while len(tokens(out[-1])) > 1:
        out.append(reduce_once(out[-1]))
    return out[1:]


def random_expression(rng: random.Random, operators: int = OPERATORS) -> str | None:
    """`operators` operations on digits 1-9, one pair of brackets half of the time; None when an
    intermediate value leaves [0, MAX_VALUE]."""
    digits = [str(rng.randint(1, 9)) for _ in range(operators + 1)]
    ops = [rng.choice("+-*") for _ in range(operators)]
    ts = [digits[0]]
    for op, d in zip(ops, digits[1:]):
        ts += [op, d]
    if rng.random() < 0.5:
        i = 2 * rng.randint(0, operators - 1)
        j = i + 2 * rng.randint(1, operators - i // 2)
        ts = ts[:i] + ["("] + ts[i:j + 1] + [")"] + ts[j + 1:]
    expression = "".join(ts)
    try:
        lines = chain(expression)
    except ValueError:  # a negative value on the way
        return None
    # A negative value shows as a minus with no number before it.
    if any(_UNARY_MINUS.search(line) or any(int(n) > MAX_VALUE for n in re.findall(r"\d+", line)) for line in lines):
        return None
    return expression


def problems(seed: int = 0, heldout: int = HELDOUT, total: int = 6000,
             operators: int = OPERATORS) -> tuple[list[dict], list[dict]]:
    """Distinct expressions of `operators` operations with their chains, split into train and a
    disjoint held-out set."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(total * 20):
        e = random_expression(rng, operators)
        if e is not None:
            seen[e] = None
        if len(seen) >= total:
            break
    expressions = list(seen)
    rng.shuffle(expressions)
    rows = [{"prompt": f"{e}=", "answer": chain(e)[-1], "chain": "\n".join(chain(e))} for e in expressions]
    return rows[heldout:], rows[:heldout]


def _lines(completion) -> list[str]:
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    return text.strip("\n").split("\n")


def _next_line(previous: str) -> str | None:
    """reduce_once(previous), or None when `previous` is not an expression it can reduce."""
    if "".join(tokens(previous)) != previous or len(tokens(previous)) < 3:
        return None
    try:
        return reduce_once(previous)
    except (ValueError, IndexError, StopIteration):
        return None


def final_answer(completions, answer, **_) -> list[float]:
    """The outcome: 1 when the last line is the expression's value, else 0."""
    return [float(_lines(c)[-1].strip() == str(a)) for c, a in zip(completions, answer)]


def step_verifier(prompts, completions, steps, **_) -> list[list[float]]:
    """The rule-based step reward: 1 for a line that is the next reduction of the line before it
    (of the prompt's expression for the first), 0 for a wrong one and for every line after a
    wrong one (its premise is wrong)."""
    out = []
    for prompt, texts in zip(prompts, steps):
        previous, scores = str(prompt).rstrip("="), []
        for text in texts:
            line = text.strip("\n")
            ok = bool(scores == [] or scores[-1]) and line == _next_line(previous)
            scores.append(float(ok))
            previous = line
        out.append(scores)
    return out


def corrupted_chain(lines: list[str], rng: random.Random) -> list[str]:
    """The chain with one line, from a random point on, made wrong (or, one time in four, left right):
    a number off by one, or a `*` written as `+`."""
    k = rng.randrange(len(lines) + len(lines) // 3 + 1)
    if k >= len(lines):
        return list(lines)
    line = lines[k]
    wrong = str(int(line) + 1) if line.isdigit() else line.replace("*", "+", 1) if "*" in line else \
        re.sub(r"\d+", lambda m: str(int(m.group()) + 1), line, count=1)
    return lines[:k] + [wrong] + lines[k + 1:]


def _labelled(prompt: str, lines: list[str]) -> dict:
    steps = [line + "\n" for line in lines[:-1]] + lines[-1:]
    labels = step_verifier([prompt], [None], [steps])[0]
    return {"prompt": prompt, "completions": lines, "labels": [bool(x) for x in labels]}


def prm_rows(rows: list[dict], seed: int = 0, copies: int = 1) -> list[dict]:
    """Step-labelled rows in TRL's PRM format (prompt, completions: the lines, labels) for a process
    reward model: each row's chain, corrupted at random `copies` times (`corrupted_chain`), labelled
    by `step_verifier`."""
    rng = random.Random(seed)
    return [_labelled(r["prompt"], corrupted_chain(r["chain"].split("\n"), rng)) for _ in range(copies) for r in rows]


@torch.no_grad()
def policy_prm_rows(model_dir, rows: list[dict], samples: int = 4, seed: int = 0, temperature: float = 1.0,
                    batch_size: int = 64, max_new_tokens: int | None = None) -> list[dict]:
    """PRM rows from the policy's own samples: `samples` completions of each row's prompt from the
    model in `model_dir` (the warm start), cut into lines and labelled by `step_verifier`. Its
    mistakes are the ones GRPO will ask the PRM to judge, which the corrupted chains of `prm_rows`
    (a number off by one, a `*` read as `+`) do not cover."""
    from grpo.engine.backend import LocalBackend
    from grpo.engine.models import load_causal_lm, load_tokenizer

    from .preferences import sample_texts

    tokenizer = load_tokenizer(str(model_dir))
    backend = LocalBackend(load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32, trainable=False),
                           tokenizer)
    texts = sample_texts(backend, tokenizer, [r["prompt"] for r in rows], samples,
                         max_prompt_length=GRPO["max_prompt_length"],
                         max_new_tokens=max_new_tokens or completion_tokens(rows), temperature=temperature,
                         generator=torch.Generator().manual_seed(seed), batch_size=batch_size)
    return [_labelled(rows[j // samples]["prompt"], _lines(t)) for j, t in enumerate(texts)]


def build_tokenizer():
    return build_char_tokenizer(CHARS, name="tiny-steps")


def completion_tokens(rows: list[dict]) -> int:
    """Completion tokens that hold the longest of these rows' chains and its EOS: the recipe's 24
    at three operations, more for longer expressions (rounded up to a multiple of 8)."""
    longest = max(len(r["chain"]) for r in rows) + 1
    return max(SFT["max_completion_length"], -(-longest // 8) * 8)


def warm_start(out: Path, seed: int, sft_overrides: dict | None = None, quiet: bool = True,
               operators: int = OPERATORS):
    """Tiny model, the task's data (train / held-out, disjoint) and the supervised warm start under `out`:
    returns (sft directory, train file, held-out file, held-out rows)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    train_rows, heldout_rows = problems(seed, operators=operators)
    train_file = write_jsonl([{**r, "completion": r["chain"]} for r in train_rows], out / "data" / "train.jsonl")
    heldout_file = write_jsonl(heldout_rows, out / "data" / "heldout.jsonl")
    sft_cfg = build(SFTConfig, {"model": str(out / "base"), "dataset": str(train_file),
                                "output_dir": str(out / "sft"), "seed": seed, **SFT,
                                "max_completion_length": completion_tokens(train_rows + heldout_rows),
                                **(sft_overrides or {})},
                    "steps demo sft")
    train_sft(sft_cfg, quiet=quiet)
    return out / "sft", train_file, heldout_file, heldout_rows


def run_steps_demo(output_dir: str = "runs/steps", seed: int = 0, quiet: bool = False,
                   grpo_overrides: dict | None = None, sft_overrides: dict | None = None,
                   overwrite: bool = False) -> dict:
    """Everything under `output_dir`: base/, data/, sft/ (the warm start), grpo/ (the GRPO run)
    and summary.json with held-out final-answer accuracy before and after GRPO."""
    out = Path(output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more threads
    try:
        with claim_recipe_dir(out, "steps demo", overwrite):
            start = time.time()
            say = (lambda *a: None) if quiet else print
            say(f"[steps] tiny model, expression chains and supervised warm start (grpo sft) under {out}")
            sft_dir, train_file, heldout_file, heldout_rows = warm_start(out, seed, sft_overrides, quiet)
            warm_seconds = time.time() - start
            settings = GRPO | (grpo_overrides or {})
            cfg = build(TrainConfig, {"model": str(sft_dir), "dataset": str(train_file),
                                      "eval_dataset": str(heldout_file), "eval_max_prompts": len(heldout_rows),
                                      "output_dir": str(out / "grpo"), "seed": seed, **settings}, "steps demo")
            say(f"[steps] GRPO, advantage_estimator {cfg.advantage_estimator} (grpo train)")
            train(cfg, quiet=quiet)
            run = json.loads((out / "grpo" / "summary.json").read_text())
            summary = {"accuracy_before": run["eval_before"]["eval_accuracy"],
                       "accuracy_after": run["eval_after"]["eval_accuracy"], "heldout_prompts": len(heldout_rows),
                       "warm_seconds": warm_seconds, "train_seconds": run["train_seconds"],
                       "total_seconds": time.time() - start, "model": str(out / "grpo"),
                       "sft": SFT | (sft_overrides or {}), "grpo": settings}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            say(f"[steps] held-out final-answer accuracy on {len(heldout_rows)} expressions: "
                f"{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
                f"(GRPO {summary['train_seconds']:.0f}s, total {summary['total_seconds']:.0f}s)")
            return summary
    finally:
        torch.set_num_threads(threads)
