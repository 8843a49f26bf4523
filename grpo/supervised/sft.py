"""`grpo sft`: supervised warm start on prompt/completion pairs, as DeepSeek-R1's cold start.

The loss is the mean next-token cross-entropy over completion tokens only (the prompt is context,
not a target). The result is a Hugging Face model directory that `grpo train` takes as `model`.
With an `eval_dataset`, the held-out completion loss and greedy exact-match accuracy are
measured before, during (eval_steps) and after training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grpo.config import SFTConfig, to_dict
from grpo.data import (PromptSampler, check_prompts, content_of, decode_completions, encode_prompt, is_messages,
                       require_columns, where)
from grpo.data.prompts import left_pad
from grpo.engine.backend import LocalBackend, SamplingParams
from grpo.engine.models import check_model_source, load_causal_lm, load_tokenizer
from grpo.errors import DataError
from grpo.observe.metrics import SUPERVISED
from grpo.observe.progress import SUPERVISED_FIELDS, format_numbers
from grpo.observe.tracking import RunLogger
from grpo.runs.checkpoint import save_model
from grpo.runs.inputs import load_data
from grpo.runs.interrupts import Interrupted, StopRequests
from grpo.runs.model_card import write_model_card
from grpo.runs.run_dir import check_output_dir, claim_output_dir, publish, staging_dir
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.runtime.setup import start_run


def encode_pairs(tokenizer, rows, cfg: SFTConfig, label: str = "") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) for every row, with the prompt formatted as in training."""
    pairs = []
    for row in rows:
        completion = row[cfg.completion_column]
        if is_messages(completion):  # TRL's conversational prompt-completion rows
            completion = content_of(completion)
        if not isinstance(completion, str) or not completion:
            raise DataError(f"{where(label or str(cfg.dataset), row)}: {cfg.completion_column!r} must be non-empty "
                            f"text (or assistant messages)")
        _, p = encode_prompt(tokenizer, row[cfg.prompt_column], cfg.apply_chat_template, cfg.chat_template_kwargs)
        c = tokenizer(completion, add_special_tokens=False)["input_ids"][: cfg.max_completion_length - 1]
        pairs.append((p[-cfg.max_prompt_length:], c + [tokenizer.eos_token_id]))
    return pairs


@torch.no_grad()
def heldout(model, tokenizer, pairs, cfg: SFTConfig, precision) -> dict[str, float]:
    """The held-out completion loss (mean over all completion tokens) and the greedy exact-match
    accuracy: the fraction of prompts whose greedy completion is the target (both stripped)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, tokens, right = 0.0, 0, 0
    backend, greedy = LocalBackend(model, tokenizer), SamplingParams.greedy(cfg.max_completion_length)
    try:
        for i in range(0, len(pairs), cfg.eval_batch_size):
            chunk = pairs[i:i + cfg.eval_batch_size]
            n = sum(len(c) for _, c in chunk)
            with precision.autocast():
                loss_sum += completion_loss(model, *collate(chunk, tokenizer.pad_token_id, device)).item() * n
                ids, mask = left_pad(tokenizer, [p for p, _ in chunk], cfg.max_prompt_length, device)
                out = backend.generate(ids, mask, greedy)
            tokens += n
            texts = decode_completions(tokenizer, out.completion_ids, out.completion_mask,
                                       stop_ids=backend.stop_token_ids)
            targets = decode_completions(tokenizer, [c for _, c in chunk])
            right += sum(a.strip() == b.strip() for a, b in zip(texts, targets))
    finally:
        model.train(was_training)
    return {"eval_loss": loss_sum / max(tokens, 1), "eval_accuracy": right / len(pairs)}


def collate(pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
    return ids.to(device), mask.to(device), labels.to(device)


def completion_loss(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


def train_sft(cfg: SFTConfig, quiet: bool = False, overwrite: bool = False, config_path: str | None = None) -> Path:
    """Check every input, claim the output directory (runs.run_dir: locked, emptied under
    `overwrite` when grpo wrote all it holds), train. `config_path`: the config file the run was
    loaded from, an input no overwrite may delete."""
    run = start_run(cfg)
    out = run.out
    data, eval_data = load_data(cfg, "dataset"), load_data(cfg, "eval_dataset")
    for source in (data, eval_data):
        if source is not None:
            require_columns(source.rows, [cfg.prompt_column, cfg.completion_column], source.label)
    paths = {k: v for k, v in (("config", config_path or ""), ("model", cfg.model), ("dataset", cfg.dataset),
                               ("eval_dataset", cfg.eval_dataset)) if isinstance(v, str) and v}
    check_output_dir(out, inputs=paths, resume=False, overwrite=overwrite)
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    for source, rows in ((data, data.rows), (eval_data, eval_data.rows[:cfg.eval_max_prompts] if eval_data else [])):
        if rows:  # every prompt formatted before any model: a bad row stops with its file and line
            check_prompts(tokenizer, rows, cfg.prompt_column, source.label, cfg.apply_chat_template,
                          cfg.chat_template_kwargs, max_length=cfg.max_prompt_length)
    pairs = encode_pairs(tokenizer, data.rows, cfg, data.label)
    eval_pairs = (encode_pairs(tokenizer, eval_data.rows[:cfg.eval_max_prompts], cfg, eval_data.label)
                  if eval_data else [])
    with claim_output_dir(out, "grpo sft", inputs=paths, resume=False, overwrite=overwrite):
        return run_sft(cfg, run, tokenizer, pairs, eval_pairs, quiet)


def run_sft(cfg: SFTConfig, run, tokenizer, pairs, eval_pairs, quiet: bool) -> Path:
    """The training itself, once the inputs are checked and the output directory claimed."""
    device, precision, out = run.device, run.precision, run.out
    model = load_causal_lm(cfg.model, device, precision.dtype)  # float32 master weights
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = PromptSampler(len(pairs), cfg.seed, shuffle=cfg.shuffle_dataset)
    logger = RunLogger(out, cfg.max_steps, quiet=quiet, config=to_dict(cfg), fields=SUPERVISED_FIELDS,
                       names=SUPERVISED)
    results = {}
    if eval_pairs:
        results["before"] = heldout(model, tokenizer, eval_pairs, cfg, precision)
        logger.info(f"held-out before training: {format_numbers(results['before'])}")
        logger.log({"step": 0, **results["before"], "elapsed": 0.0})
    start = time.time()
    try:
        with StopRequests() as stop:
            for step in range(1, cfg.max_steps + 1):
                batch = [pairs[i] for i in sampler.next(cfg.batch_size)]
                # Gradient accumulation: the mean over the batch is the mean of equal-sized chunks' means
                # only when chunks carry equal token counts, so weight each chunk by its token share.
                n_tokens = sum(len(c) for _, c in batch)
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for i in range(0, len(batch), cfg.micro_batch_size):
                    chunk = batch[i:i + cfg.micro_batch_size]
                    ids, mask, labels = collate(chunk, tokenizer.pad_token_id, device)
                    with precision.autocast():
                        loss = completion_loss(model, ids, mask, labels) * (sum(len(c) for _, c in chunk) / n_tokens)
                    precision.backward(loss)
                    total += loss.item()
                grad_norm = precision.step(optimizer, model.parameters(), cfg.max_grad_norm)
                scheduler.step()
                record = {"step": step, "loss": total, "grad_norm": float(grad_norm),
                          "lr": scheduler.get_last_lr()[0], "elapsed": time.time() - start}
                if eval_pairs and cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
                    record.update(heldout(model, tokenizer, eval_pairs, cfg, precision))
                if step % cfg.logging_steps == 0 or step == cfg.max_steps or "eval_loss" in record:
                    logger.log(record)
                stopping = stop.requested and step < cfg.max_steps
                if (cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps) or \
                        (stopping and cfg.save_on_interrupt):
                    save_model(out / f"checkpoint-{step}", model, tokenizer)
                if stopping:
                    kept = f"saved the model to {out / f'checkpoint-{step}'}" if cfg.save_on_interrupt \
                        else "not saved (save_on_interrupt is off)"
                    raise Interrupted(f"interrupted by {stop.name()} at step {step}: {kept}", stop.signum)
            # Every step is trained: from here a signal abandons the final evaluation, never the
            # trained model, which is saved (whole: runs.run_dir.publish) before the run stops.
            with stop.deferred():
                skipped = False
                if eval_pairs:
                    after = stop.unless_stopped(lambda: heldout(model, tokenizer, eval_pairs, cfg, precision))
                    skipped = after is None
                    if not skipped:
                        results["after"] = after
                        logger.info(f"held-out after training: {format_numbers(results['after'])}")
                final = staging_dir(out)
                save_model(final, model, tokenizer)
                if results:
                    (final / "summary.json").write_text(json.dumps({f"eval_{k}": v for k, v in results.items()},
                                                                   indent=2))
                if cfg.model_card:
                    write_model_card(final, to_dict(cfg), results, command="grpo sft", shown_as=out)
                publish(final, out)
            if stop.requested:
                raise Interrupted(f"interrupted by {stop.name()} after the last step ({cfg.max_steps}): "
                                  f"{'the final evaluation was skipped; ' if skipped else ''}the trained model is "
                                  f"saved in {out}", stop.signum)
    finally:
        logger.close()
    return out
