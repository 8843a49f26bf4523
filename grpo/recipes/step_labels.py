"""`grpo reward-model make-step-labels`: step labels from the policy's own samples (Math-Shepherd).

Math-Shepherd (Wang et al. 2023, arXiv:2312.08935, section 3.3): the quality of a step is its
potential to reach the right answer. For each sampled completion, cut into steps at
`step_delimiter`, N continuations are sampled from the end of every step (prompt + steps 1..j),
and each whole completion is judged by the verifier:

    hard:  y_j = 1 if any of the N continuations is right, else 0
    soft:  y_j = (number of right continuations) / N

The last step needs no continuation: its label is the verifier's verdict on the completion. The
rows are written in TRL's PRM format (prompt, completions: the steps without their delimiter,
labels), which `grpo reward-model train --kind process` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grpo.config import StepLabelConfig
from grpo.data import format_prompt
from grpo.data.steps import delimiter_ends, step_texts
from grpo.engine.backend import LocalBackend
from grpo.engine.models import load_causal_lm
from grpo.rewards.functions import load_function

from .preferences import sample_texts, sampling_setup


def step_label(verdicts: list[float], estimate: str) -> float | bool:
    """Math-Shepherd's estimate from the verdicts (1 right, 0 wrong) of a step's continuations."""
    return any(v == 1 for v in verdicts) if estimate == "hard" else sum(v == 1 for v in verdicts) / len(verdicts)


@torch.no_grad()
def make_step_labels(cfg: StepLabelConfig, quiet: bool = False, overwrite: bool = False,
                     config_path: str | None = None, backend=None) -> dict:
    """Sample, cut into steps, roll out from every step, write labelled rows; returns counts.
    `backend` (tests) generates in place of the model's local engine."""
    verifier = load_function(cfg.verifier)
    run, rows, rng, tokenizer = sampling_setup(cfg, overwrite, config_path)
    if backend is None:
        backend = LocalBackend(load_causal_lm(cfg.model, run.device, run.dtype, trainable=False), tokenizer)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)

    def sample(texts: list[str], n: int) -> list[str]:
        # A prompt here may carry a step prefix: room for the prompt and a whole completion.
        return sample_texts(backend, tokenizer, texts, n, max_prompt_length=cfg.max_prompt_length +
                            cfg.max_completion_length, max_new_tokens=cfg.max_completion_length,
                            temperature=cfg.temperature, generator=generator, batch_size=cfg.batch_size)

    def verdicts(row: dict, completions: list[str]) -> list[float]:
        columns = {k: [v] * len(completions) for k, v in row.items() if k not in (cfg.prompt_column, "_line", "_row")}
        columns["answer"] = [row[cfg.answer_column]] * len(completions)
        return [float(v or 0) for v in verifier(prompts=[row[cfg.prompt_column]] * len(completions),
                                                completions=completions, **columns)]

    out_rows, good = [], 0
    texts = [format_prompt(tokenizer, r[cfg.prompt_column], cfg.apply_chat_template) for r in rows]
    samples = sample(texts, cfg.samples_per_prompt)
    for p, row in enumerate(rows):
        for completion in samples[p * cfg.samples_per_prompt:(p + 1) * cfg.samples_per_prompt]:
            steps = step_texts(completion, delimiter_ends(completion, cfg.step_delimiter))
            prefixes = ["".join(steps[:j + 1]) for j in range(len(steps) - 1)]
            rollouts = sample([texts[p] + prefix for prefix in prefixes], cfg.rollouts_per_step) if prefixes else []
            labels = []
            for j, prefix in enumerate(prefixes):
                continued = [prefix + c for c in rollouts[j * cfg.rollouts_per_step:(j + 1) * cfg.rollouts_per_step]]
                labels.append(step_label(verdicts(row, continued), cfg.estimate))
            labels.append(step_label(verdicts(row, [completion]), cfg.estimate))  # the last step: the answer
            good += sum(float(x) for x in labels)
            out_rows.append({"prompt": row[cfg.prompt_column], "completions": [s.removesuffix(cfg.step_delimiter)
                                                                              for s in steps], "labels": labels})
    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    steps_total = sum(len(r["labels"]) for r in out_rows)
    stats = {"prompts": len(rows), "rows": len(out_rows), "steps": steps_total,
             "good_step_fraction": good / max(steps_total, 1), "output_file": str(path)}
    if not quiet:
        print(f"make-step-labels: {stats['steps']} steps of {stats['rows']} samples labelled ({cfg.estimate}, "
              f"{cfg.rollouts_per_step} rollouts a step; {stats['good_step_fraction']:.1%} good) -> {path}")
    return stats
