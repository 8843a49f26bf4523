"""`grpo sft`: supervised warm start on prompt/completion pairs, as DeepSeek-R1's cold start.

The loss is the mean next-token cross-entropy over completion tokens only (the prompt is context,
not a target). The result is a Hugging Face model directory that `grpo train` takes as `model`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grpo.config import SFTConfig, to_dict
from grpo.data import PromptSampler, format_prompt, load_rows, require_columns
from grpo.engine.models import check_model_source, load_causal_lm, load_tokenizer
from grpo.errors import DataError
from grpo.observe.progress import SUPERVISED_FIELDS
from grpo.observe.tracking import RunLogger

from .checkpoint import save_model
from .interrupts import Interrupted, StopRequests
from .optim import make_optimizer, make_scheduler
from .run_dir import check_output_dir, clear_output_dir
from .setup import start_run


def encode_pairs(tokenizer, rows, cfg: SFTConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) for every row, with the prompt formatted as in training."""
    pairs = []
    for row in rows:
        completion = row[cfg.completion_column]
        if not isinstance(completion, str) or not completion:
            raise DataError(f"{cfg.dataset}:{row['_line']}: {cfg.completion_column!r} must be non-empty text")
        prompt = format_prompt(tokenizer, row[cfg.prompt_column], cfg.apply_chat_template)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-cfg.max_prompt_length:]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"][: cfg.max_completion_length - 1]
        pairs.append((p, c + [tokenizer.eos_token_id]))
    return pairs


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


def train_sft(cfg: SFTConfig, quiet: bool = False, overwrite: bool = False) -> Path:
    run = start_run(cfg)
    device, precision, out = run.device, run.precision, run.out
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column, cfg.completion_column], cfg.dataset)
    check_output_dir(out, inputs={"model": cfg.model, "dataset": cfg.dataset}, resume=False, overwrite=overwrite)
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    pairs = encode_pairs(tokenizer, rows, cfg)
    if overwrite:
        clear_output_dir(out)
    model = load_causal_lm(cfg.model, device, precision.dtype)  # float32 master weights
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = PromptSampler(len(pairs), cfg.seed)
    logger = RunLogger(out, cfg.max_steps, quiet=quiet, config=to_dict(cfg), fields=SUPERVISED_FIELDS)
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
                if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                    logger.log({"step": step, "loss": total, "grad_norm": float(grad_norm),
                                "lr": scheduler.get_last_lr()[0], "elapsed": time.time() - start})
                stopping = stop.requested and step < cfg.max_steps
                if (cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps) or \
                        (stopping and cfg.save_on_interrupt):
                    save_model(out / f"checkpoint-{step}", model, tokenizer)
                if stopping:
                    where = f"saved the model to {out / f'checkpoint-{step}'}" if cfg.save_on_interrupt \
                        else "not saved (save_on_interrupt is off)"
                    raise Interrupted(f"interrupted by {stop.name()} at step {step}: {where}", stop.signum)
    finally:
        logger.close()
    save_model(out, model, tokenizer)
    return out
