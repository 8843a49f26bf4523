"""`grpo reward-model make-preferences`: preference pairs for a built-in task, from a policy's samples.

This is how the seed pipeline gets preference data without downloading any: sample completions
from a policy on the task's prompts, judge them with the task's verifier, and write pairs
  correct vs incorrect            ("kind": "correct")
  closer vs farther wrong answer  ("kind": "closer", where the task has a distance to the answer)
as JSONL rows {prompt, chosen, rejected, kind, answer} that `grpo reward-model train` reads; or,
with `rankings: K`, one ranking per prompt of up to K distinct samples, right answers first
(tied), then the wrong ones (tied, or `rank_by: distance` closer to farther;
grpo.rewards.rankings.ranking_from_samples), as
rows {prompt, completions, labels, kind: "ranking", answer}.

When no sample of a prompt is correct, the dataset's reference answer can stand in as the chosen
completion (`use_reference_answer`), as a human labeller would write the right answer; otherwise
such prompts give only closer/farther pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from grpo.config import PreferenceConfig
from grpo.data import decode_completions, format_prompt, load_rows, require_columns, tokenize_prompts
from grpo.engine.backend import LocalBackend, SamplingParams
from grpo.engine.models import check_model_source, load_causal_lm, load_tokenizer
from grpo.errors import ConfigError
from grpo.rewards.preferences import TASKS, pairs_for_prompt
from grpo.rewards.rankings import ranking_from_samples
from grpo.runs.run_dir import check_output_file
from grpo.runtime.setup import start_run


@torch.no_grad()
def sampling_setup(cfg, overwrite: bool, config_path: str | None):
    """What every command that labels a policy's own samples does first: claim the output file
    (never over an input), read and check the prompts, draw `num_prompts` of them (seeded), and
    load the tokenizer. Returns (run, rows, rng, tokenizer)."""
    check_output_file(Path(cfg.output_file), inputs={"dataset": cfg.dataset, "model": cfg.model,
                                                     "config": config_path or ""}, overwrite=overwrite)
    run = start_run(cfg)
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column, cfg.answer_column], cfg.dataset)
    rng = random.Random(cfg.seed)
    if cfg.num_prompts:
        rows = rng.sample(rows, min(cfg.num_prompts, len(rows)))
    check_model_source(cfg.model)
    return run, rows, rng, load_tokenizer(cfg.model)


def sample_texts(backend, tokenizer, texts: list[str], n: int, *, max_prompt_length: int, max_new_tokens: int,
                 temperature: float, generator: torch.Generator, batch_size: int) -> list[str]:
    """n sampled completions of each prompt text, decoded, in order (text 0's n first), generated
    `batch_size` prompts at a time: how every command that labels a policy's own samples draws them."""
    params = SamplingParams(group_size=n, max_new_tokens=max_new_tokens, strategy="sample",
                            temperature=temperature, top_p=1.0, top_k=0)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenize_prompts(tokenizer, texts[i:i + batch_size], max_prompt_length)
        g = backend.generate(ids, mask, params, generator)
        out += decode_completions(tokenizer, g.completion_ids, g.completion_mask,
                                  stop_ids=getattr(backend, "stop_token_ids", None))
    return out


def make_preferences(cfg: PreferenceConfig, quiet: bool = False, overwrite: bool = False,
                     config_path: str | None = None) -> dict:
    """Sample the policy on the task's prompts, write preference pairs as JSONL; returns counts."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task: {cfg.task!r} is not one of {', '.join(TASKS)}")
    task = TASKS[cfg.task]
    run, rows, rng, tokenizer = sampling_setup(cfg, overwrite, config_path)
    backend = LocalBackend(load_causal_lm(cfg.model, run.device, run.dtype, trainable=False), tokenizer)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    G = cfg.samples_per_prompt
    completions = sample_texts(backend, tokenizer,
                               [format_prompt(tokenizer, r[cfg.prompt_column], cfg.apply_chat_template) for r in rows],
                               G, max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_completion_length,
                               temperature=cfg.temperature, generator=generator, batch_size=cfg.batch_size)
    out_rows, sampled_correct = [], 0
    for p, row in enumerate(rows):
        group = completions[p * G:(p + 1) * G]
        answer = str(row[cfg.answer_column])
        sampled_correct += sum(task.is_correct(c, answer) for c in group)
        if cfg.rankings:
            ranked = ranking_from_samples(group, answer, task, cfg.rankings, cfg.use_reference_answer,
                                          cfg.rank_by)
            if ranked is not None:
                out_rows.append({"prompt": row[cfg.prompt_column], "completions": ranked[0], "labels": ranked[1],
                                 "kind": "ranking", "answer": answer})
            continue
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
    if cfg.rankings:
        stats = {"prompts": len(rows), "rankings": len(out_rows),
                 "ranked_completions": sum(len(r["labels"]) for r in out_rows),
                 "sample_accuracy": stats["sample_accuracy"], "output_file": str(path)}
        if not quiet:
            print(f"make-preferences: {stats['rankings']} rankings ({stats['ranked_completions']} completions) "
                  f"from {len(rows)} prompts x {G} samples (sample accuracy {stats['sample_accuracy']:.1%}) -> {path}")
        return stats
    if not quiet:
        print(f"make-preferences: {stats['pairs']} pairs ({stats['correct_pairs']} correct/incorrect, "
              f"{stats['closer_pairs']} closer/farther) from {len(rows)} prompts x {G} samples "
              f"(sample accuracy {stats['sample_accuracy']:.1%}) -> {path}")
    return stats
