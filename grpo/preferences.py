"""`grpo reward-model make-preferences`: preference pairs for a built-in task, from a policy's samples.

This is how the seed pipeline gets preference data without downloading any: sample completions
from a policy on the task's prompts, judge them with the task's verifier, and write pairs
  correct vs incorrect            ("kind": "correct")
  closer vs farther wrong answer  ("kind": "closer", where the task has a distance to the answer)
as JSONL rows {prompt, chosen, rejected, kind, answer} that `grpo reward-model train` reads.

When no sample of a prompt is correct, the dataset's reference answer can stand in as the chosen
completion (`use_reference_answer`), as a human labeller would write the right answer; otherwise
such prompts give only closer/farther pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import CommonConfig, ConfigError
from .data import format_prompt, load_rows, require_columns, tokenize_prompts
from .generation import generate_groups
from .modeling import load_causal_lm, load_tokenizer, pick_device, pick_dtype, seed_everything
from .rewards import _first_number


@dataclass
class PreferenceConfig(CommonConfig):
    """`model` is the policy that is sampled; `dataset` holds the task's prompts and answers."""
    output_dir: str = ""                 # unused; the pairs go to output_file
    task: str = "addition"
    answer_column: str = "answer"
    output_file: str = "preferences.jsonl"
    num_prompts: int = 0                 # 0: every row of the dataset
    samples_per_prompt: int = 8
    temperature: float = 1.0
    max_completion_length: int = 8
    max_prompt_length: int = 64
    batch_size: int = 64                 # prompts per generation batch
    correct_pairs_per_prompt: int = 2    # correct vs incorrect pairs per prompt, at most
    closer_pairs_per_prompt: int = 1     # closer vs farther wrong answer pairs per prompt, at most
    use_reference_answer: bool = True    # no correct sample: the reference answer is the chosen one


# ----------------------------------------------------------------------------------------------
# Tasks: a verifier (is this completion right?) and, where it makes sense, a distance to the answer.

@dataclass
class Task:
    is_correct: Callable[[str, str], bool]
    distance: Callable[[str, str], float] | None   # smaller is closer; inf when unparsable


def _numeric_distance(completion: str, answer: str) -> float:
    x = _first_number(completion)
    return float("inf") if x is None else abs(x - float(answer))


TASKS = {
    # The exact-answer verifier of grpo.rewards.exact_answer, and |number - answer| as distance.
    "addition": Task(is_correct=lambda c, a: c.strip() == str(a).strip(), distance=_numeric_distance),
}


def pairs_for_prompt(completions: list[str], answer: str, task: Task, rng: random.Random,
                     correct_pairs: int, closer_pairs: int, use_reference: bool) -> list[dict]:
    """Preference pairs from one prompt's samples (duplicates removed, empty completions dropped)."""
    unique = list(dict.fromkeys(c.strip() for c in completions if c.strip()))
    right = [c for c in unique if task.is_correct(c, answer)]
    wrong = [c for c in unique if not task.is_correct(c, answer)]
    if not right and use_reference:
        right = [str(answer).strip()]
    pairs = []
    for rejected in rng.sample(wrong, min(correct_pairs, len(wrong))) if right else []:
        pairs.append({"chosen": rng.choice(right), "rejected": rejected, "kind": "correct"})
    if task.distance is not None and closer_pairs and len(wrong) >= 2:
        candidates = [(a, b) for i, a in enumerate(wrong) for b in wrong[i + 1:]
                      if task.distance(a, answer) != task.distance(b, answer)]
        for a, b in rng.sample(candidates, min(closer_pairs, len(candidates))):
            closer, farther = (a, b) if task.distance(a, answer) < task.distance(b, answer) else (b, a)
            pairs.append({"chosen": closer, "rejected": farther, "kind": "closer"})
    return pairs


@torch.no_grad()
def make_preferences(cfg: PreferenceConfig, log=print) -> dict:
    """Sample the policy on the task's prompts, write preference pairs as JSONL; returns counts."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task: {cfg.task!r} is not one of {', '.join(TASKS)}")
    for key in ("samples_per_prompt", "max_completion_length", "max_prompt_length"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature: must be > 0, got {cfg.temperature}")
    task = TASKS[cfg.task]
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column, cfg.answer_column], cfg.dataset)
    rng = random.Random(cfg.seed)
    if cfg.num_prompts:
        rows = rng.sample(rows, min(cfg.num_prompts, len(rows)))

    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, device, pick_dtype(cfg.dtype, device), trainable=False)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    G = cfg.samples_per_prompt
    out_rows, sampled_correct = [], 0
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i:i + cfg.batch_size]
        texts = [format_prompt(tokenizer, r[cfg.prompt_column], cfg.apply_chat_template) for r in chunk]
        ids, mask = tokenize_prompts(tokenizer, texts, cfg.max_prompt_length, device)
        gen = generate_groups(policy, ids, mask, group_size=G, max_new_tokens=cfg.max_completion_length,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              strategy="sample", temperature=cfg.temperature, generator=generator)
        completions = tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
        for p, row in enumerate(chunk):
            group = completions[p * G:(p + 1) * G]
            answer = str(row[cfg.answer_column])
            sampled_correct += sum(task.is_correct(c, answer) for c in group)
            for pair in pairs_for_prompt(group, answer, task, rng, cfg.correct_pairs_per_prompt,
                                         cfg.closer_pairs_per_prompt, cfg.use_reference_answer):
                # The prompt is written as given (not formatted): training formats it like the policy.
                out_rows.append({"prompt": row[cfg.prompt_column], **pair, "answer": answer})

    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in out_rows:
            f.write(json.dumps(r) + "\n")
    stats = {"prompts": len(rows), "pairs": len(out_rows),
             "correct_pairs": sum(r["kind"] == "correct" for r in out_rows),
             "closer_pairs": sum(r["kind"] == "closer" for r in out_rows),
             "sample_accuracy": sampled_correct / max(1, len(rows) * G), "output_file": str(path)}
    log(f"make-preferences: {stats['pairs']} pairs ({stats['correct_pairs']} correct/incorrect, "
        f"{stats['closer_pairs']} closer/farther) from {len(rows)} prompts x {G} samples "
        f"(sample accuracy {stats['sample_accuracy']:.1%}) -> {path}")
    return stats
