"""`grpo reward-model train --kind process`: a process reward model from step labels.

Data in TRL's `PRMTrainer` format, so existing PRM datasets load unchanged: each row has
`prompt` (text), `completions` (the steps, a list of texts) and `labels` (one bool per step,
True for a good step). The model is the backbone with a two-label token-classification head
(`AutoModelForTokenClassification`, num_labels 2), trained with cross-entropy on each step's last
token only (`grpo.rewards.process_model.encode`: prompt, then each step followed by
`step_separator`), as TRL's PRMTrainer and Lightman et al. 2023. Held-out step accuracy (the
argmax at each step end against its label) is evaluated every `eval_steps`. The directory saved
loads with `AutoModelForTokenClassification.from_pretrained` and scores steps in `grpo train` as
`rewards: [{model: DIR, per: step}]`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import torch

from grpo.config import RewardModelConfig, to_dict
from grpo.data import DataError, load_rows
from grpo.data.rows import where
from grpo.engine.models import check_model_source, load_tokenizer
from grpo.observe.metrics import SUPERVISED
from grpo.observe.progress import SUPERVISED_FIELDS
from grpo.observe.tracking import RunLogger
from grpo.rewards.process_model import SETTINGS_FILE, encode, right_pad
from grpo.runs.run_dir import check_output_dir, claim_output_dir, publish, staging_dir
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.runtime.setup import start_run


@dataclass
class StepExample:
    ids: list[int]
    ends: list[int]    # each step's last token (-1: cut off by max_length)
    labels: list[float]  # 1 a good step, 0 a bad one, in between a soft label (Math-Shepherd)


def load_step_rows(path: str, tokenizer, separator: str, max_length: int, prompt_column: str = "prompt"
                   ) -> list[StepExample]:
    """TRL's PRM rows as encoded examples; a row whose labels do not match its steps is a
    DataError naming the file and line."""
    rows = load_rows(path)
    out = []
    for row in rows:
        prompt, steps, labels = row.get(prompt_column), row.get("completions"), row.get("labels")
        if not isinstance(prompt, str):
            raise DataError(f"{where(path, row)}: {prompt_column!r} must be text, got {type(prompt).__name__}")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise DataError(f"{where(path, row)}: 'completions' must be a non-empty list of step texts")
        if not isinstance(labels, list) or len(labels) != len(steps):
            n = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise DataError(f"{where(path, row)}: 'labels' has {n} entries for {len(steps)} steps; expected one "
                            f"label (true / false) per step")
        if not all(isinstance(x, (bool, int, float)) and 0 <= x <= 1 for x in labels):
            raise DataError(f"{where(path, row)}: 'labels' must be true / false, or soft labels in [0, 1], "
                            f"got {labels}")
        ids, ends = encode(tokenizer, prompt, steps, separator, max_length)
        out.append(StepExample(ids, ends, [float(x) for x in labels]))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _batch(model, examples: list[StepExample], pad: int, device):
    """Logits [B, T, 2] and the step labels [B, T] (NaN off the step ends)."""
    ids, mask = right_pad([e.ids for e in examples], pad, device)
    labels = torch.full(ids.shape, float("nan"), device=device)
    for i, e in enumerate(examples):
        for end, label in zip(e.ends, e.labels):
            if end >= 0:
                labels[i, end] = label
    return model(input_ids=ids, attention_mask=mask).logits.float(), labels


def step_loss_sum(logits, labels):
    """Cross-entropy of the two-label head against each step's label y (soft or hard), summed
    over the step ends: -(y log p_good + (1 - y) log p_bad)."""
    on = ~labels.isnan()
    logp = logits[on].log_softmax(-1)
    y = labels[on]
    return -(y * logp[:, 1] + (1 - y) * logp[:, 0]).sum()


@torch.no_grad()
def step_accuracy(model, examples: list[StepExample], pad: int, device, batch_size: int = 64) -> dict:
    """Held-out step accuracy (the argmax at each step end against label >= 0.5), the same on the
    good steps and on the bad ones, and the share of steps labelled good (the mean label). Where
    most steps are bad, always answering "bad" scores high: the per-class accuracies tell such a
    model from one that separates the two."""
    model.eval()
    right, count = torch.zeros(2), torch.zeros(2)  # [bad, good]
    good = 0.0
    for i in range(0, len(examples), batch_size):
        logits, labels = _batch(model, examples[i:i + batch_size], pad, device)
        on = ~labels.isnan()
        truth = (labels[on] >= 0.5).long().cpu()
        hit = (logits.argmax(-1)[on].cpu() == truth).float()
        right.index_add_(0, truth, hit)
        count += torch.bincount(truth, minlength=2).float()
        good += float(labels[on].sum())
    model.train()
    total = max(float(count.sum()), 1.0)
    out = {"eval_step_accuracy": float(right.sum()) / total, "eval_good_fraction": good / total}
    for name, k in (("eval_bad_step_accuracy", 0), ("eval_good_step_accuracy", 1)):
        if count[k]:  # a class with no held-out steps has no accuracy
            out[name] = float(right[k] / count[k])
    return out


def start_reward_model_run(cfg: RewardModelConfig, overwrite: bool, config_path: str | None):
    """Claim the output directory (never over an input of the run), check the base model and load
    its tokenizer: what every kind of reward-model training does first. Returns (run, tokenizer,
    the run's inputs, which the later claim of the directory protects too)."""
    run = start_run(cfg)
    paths = {"config": config_path or "", "model": cfg.model, "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset}
    check_output_dir(run.out, inputs=paths, resume=False, overwrite=overwrite)
    check_model_source(cfg.model)
    return run, load_tokenizer(cfg.model), paths


def train_process_reward_model(cfg: RewardModelConfig, quiet: bool = False, overwrite: bool = False,
                               config_path: str | None = None) -> dict:
    """Train a PRM on `cfg.dataset` (TRL's PRM format), evaluate step accuracy, save. Returns the summary."""
    from transformers import AutoModelForTokenClassification

    log = (lambda *a: None) if quiet else print
    run, tokenizer, paths = start_reward_model_run(cfg, overwrite, config_path)
    out = run.out
    load = dict(tokenizer=tokenizer, separator=cfg.step_separator, max_length=cfg.max_length,
                prompt_column=cfg.prompt_column)
    examples = load_step_rows(cfg.dataset, **load)
    if cfg.eval_dataset:
        held_out = load_step_rows(cfg.eval_dataset, **load)
    else:
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = int(len(examples) * cfg.eval_fraction)
        held_out, examples = [examples[i] for i in order[:n_eval]], [examples[i] for i in order[n_eval:]]
    if not examples:
        raise DataError(f"{cfg.dataset}: nothing left to train on after holding out eval_fraction")
    log(f"process reward model: {len(examples)} training rows, {len(held_out)} held-out rows, backbone {cfg.model}")
    with claim_output_dir(out, "grpo reward-model train", inputs=paths, resume=False, overwrite=overwrite):
        device, precision = run.device, run.precision
        model = AutoModelForTokenClassification.from_pretrained(cfg.model, num_labels=2).to(device)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.train()
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        rng = random.Random(cfg.seed)
        logger = RunLogger(out, cfg.max_steps, quiet=quiet, config=to_dict(cfg), fields=SUPERVISED_FIELDS,
                           names=SUPERVISED)
        pad = tokenizer.pad_token_id

        def run_eval() -> dict:
            return step_accuracy(model, held_out, pad, device, cfg.micro_batch_size) if held_out else {}

        start = time.time()
        history = [{"step": 0, **run_eval(), "elapsed": 0.0}]
        logger.log(history[0])
        try:
            for step in range(1, cfg.max_steps + 1):
                batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in range(0, len(batch), cfg.micro_batch_size):
                    chunk = batch[i:i + cfg.micro_batch_size]
                    with precision.autocast():
                        logits, labels = _batch(model, chunk, pad, device)
                    # Summed over the chunk's step ends, divided by the whole batch's: the batch mean.
                    n_steps = max(sum(sum(e >= 0 for e in x.ends) for x in batch), 1)
                    loss = step_loss_sum(logits, labels) / n_steps
                    precision.backward(loss)
                    loss_sum += loss.item()
                grad_norm = precision.step(optimizer, model.parameters(), cfg.max_grad_norm)
                scheduler.step()
                record = {}
                if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                    record = {"loss": loss_sum, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
                if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
                    record.update(run_eval())
                if record:
                    history.append({"step": step, **record, "elapsed": time.time() - start})
                    logger.log(history[-1])
            final = staging_dir(out)
            model.save_pretrained(final)
            tokenizer.save_pretrained(final)
            (final / SETTINGS_FILE).write_text(json.dumps({"step_separator": cfg.step_separator}))
            last = next((h for h in reversed(history) if "eval_step_accuracy" in h), {})
            summary = {"model": str(out), "kind": "process", "backbone": cfg.model, "train_rows": len(examples),
                       "eval_rows": len(held_out), "eval_step_accuracy": last.get("eval_step_accuracy"),
                       "eval_good_step_accuracy": last.get("eval_good_step_accuracy"),
                       "eval_bad_step_accuracy": last.get("eval_bad_step_accuracy"),
                       "eval_good_fraction": last.get("eval_good_fraction"), "train_seconds": time.time() - start}
            (final / "summary.json").write_text(json.dumps(summary, indent=2))
            publish(final, out)
        finally:
            logger.close()
    log(f"process reward model saved to {out} (held-out step accuracy {summary['eval_step_accuracy']})")
    return summary

