"""`grpo reward-model train | eval | score`: Bradley-Terry reward models from preference pairs.

The seed's pipeline starts here: "train a reward model from preference data". A preference row is
  {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 0.5 (optional)}
with plain text or chat messages. The reward model is any causal LM with a one-label head,
`AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)` (for a Llama backbone
that is LlamaForSequenceClassification: the transformer plus a fresh linear `score` head read at
the last real token). It is trained so that r(prompt, chosen) > r(prompt, rejected):

    loss = -log sigmoid(r_chosen - r_rejected - margin)

the Bradley-Terry model of paired comparisons (Bradley & Terry 1952), as used for InstructGPT's
reward model (Ouyang et al. 2022, eq. 1); the optional margin is Llama 2's (Touvron et al. 2023).

The result is saved with `save_pretrained` next to its tokenizer, so plain
`AutoModelForSequenceClassification.from_pretrained(dir)` loads it and `grpo train` takes it as
`rewards: [{model: dir}]`. It reads the same text the policy sees: `grpo.rewards.reward_model_text`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import CommonConfig, ConfigError, load_config
from .data import DataError, PromptSampler, format_prompt, is_messages, load_rows, require_columns
from .modeling import Precision, load_tokenizer, make_optimizer, make_scheduler, pick_device, pick_dtype, seed_everything
from .rewards import (RewardError, completion_text, encode_for_scoring, prepare_for_scoring,
                      reward_model_text, sequence_scores)


# ----------------------------------------------------------------------------------------------
# The loss

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin).

    Bradley-Terry (1952): P(chosen preferred) = sigmoid(r_chosen - r_rejected); the loss is its
    negative log-likelihood (InstructGPT, Ouyang et al. 2022, eq. 1). A margin m > 0 asks for
    r_chosen to exceed r_rejected by at least about m (Llama 2, Touvron et al. 2023).
    logsigmoid is used instead of log(sigmoid(.)) so large negative differences do not give -inf.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


# ----------------------------------------------------------------------------------------------
# Configs

@dataclass
class RewardModelConfig(CommonConfig):
    """`grpo reward-model train`. `model` is the backbone: any causal LM directory or hub id."""
    output_dir: str = "runs/reward_model"
    eval_dataset: str = ""               # "": hold out eval_fraction of `dataset`
    eval_fraction: float = 0.1
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    margin_column: str = "margin"        # optional per row; missing means 0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    batch_size: int = 32                 # preference pairs per optimizer step
    micro_batch_size: int = 64           # pairs per forward/backward (2x that many sequences)
    max_steps: int = 300
    eval_steps: int = 50                 # 0: evaluate only at the end
    logging_steps: int = 10
    max_length: int = 512                # tokens of prompt + completion; longer texts lose their start


@dataclass
class RewardModelEvalConfig(CommonConfig):
    """`grpo reward-model eval` (a preference file) and `score` (prompt/completion rows)."""
    output_dir: str = ""                 # unused; kept so every command shares CommonConfig
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    margin_column: str = "margin"
    completion_column: str = "completion"
    output_file: str = ""                # score: where to write rows + score (.jsonl or .csv)
    batch_size: int = 64                 # sequences per forward
    max_length: int = 512


def _check(cfg) -> None:
    if isinstance(cfg, RewardModelConfig):
        if not 0 <= cfg.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
        if cfg.eval_steps < 0:
            raise ConfigError(f"eval_steps: must be >= 0, got {cfg.eval_steps}")
    if cfg.max_length < 1:
        raise ConfigError(f"max_length: must be >= 1, got {cfg.max_length}")


# ----------------------------------------------------------------------------------------------
# Preference data

@dataclass
class Pair:
    prompt: str      # formatted exactly as the policy sees it
    chosen: str
    rejected: str
    margin: float
    where: str       # file:line, for messages


def _bad_reason(row: dict, prompt_col: str, chosen_col: str, rejected_col: str, margin_col: str) -> str | None:
    """Why a preference row cannot be used, or None if it can."""
    for col in (prompt_col, chosen_col, rejected_col):
        if row.get(col) is None:
            return f"missing column {col!r}"
    prompt = row[prompt_col]
    if isinstance(prompt, str):
        if not prompt.strip():
            return f"empty {prompt_col!r}"
    elif not (is_messages(prompt) and prompt):
        return f"{prompt_col!r} must be text or a list of chat messages"
    texts = []
    for col in (chosen_col, rejected_col):
        try:
            texts.append(completion_text(row[col]))
        except TypeError as e:
            return f"{col!r}: {e}"
        if not texts[-1].strip():
            return f"empty {col!r}"
    if texts[0] == texts[1]:
        return f"{chosen_col!r} == {rejected_col!r} (the pair says nothing)"
    m = row.get(margin_col)
    if m not in (None, ""):
        try:
            if not math.isfinite(float(m)):
                return f"{margin_col!r} is not finite: {m!r}"
        except (TypeError, ValueError):
            return f"{margin_col!r} is not a number: {m!r}"
    return None


def load_preferences(path: str, tokenizer, *, prompt_column="prompt", chosen_column="chosen",
                     rejected_column="rejected", margin_column="margin", chat_template="auto",
                     log=print) -> list[Pair]:
    """Usable pairs of a preference file. Bad rows are reported with file:line and skipped; a file
    with no usable row stops the run."""
    rows = load_rows(path)
    pairs, bad = [], []
    for row in rows:
        where = f"{path}:{row.get('_line', '?')}"
        reason = _bad_reason(row, prompt_column, chosen_column, rejected_column, margin_column)
        if reason:
            bad.append(f"{where}: {reason}")
            continue
        try:
            prompt = format_prompt(tokenizer, row[prompt_column], chat_template)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        m = row.get(margin_column)
        pairs.append(Pair(prompt, completion_text(row[chosen_column]), completion_text(row[rejected_column]),
                          0.0 if m in (None, "") else float(m), where))
    for line in bad[:20]:
        log(f"skipping bad preference row {line}")
    if len(bad) > 20:
        log(f"... and {len(bad) - 20} more bad rows")
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs: all {len(rows)} rows are bad "
                        f"(first: {bad[0]}). Each row needs non-empty {prompt_column!r}, "
                        f"{chosen_column!r} and {rejected_column!r}, with chosen != rejected")
    if bad:
        log(f"{path}: using {len(pairs)} of {len(rows)} rows ({len(bad)} bad)")
    return pairs


# ----------------------------------------------------------------------------------------------
# Model

def load_reward_model(path: str, device: torch.device, dtype: torch.dtype, tokenizer):
    """A one-label sequence classifier from a causal LM (fresh head) or a saved reward model."""
    from transformers import AutoModelForSequenceClassification

    from transformers.utils import logging as hf_logging

    # From a causal LM, transformers reports the unused lm_head and the new `score` head at length;
    # both are expected here, so keep the console to our own messages.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise RewardError(f"model: cannot load {path!r} as AutoModelForSequenceClassification: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    prepare_for_scoring(model, tokenizer)
    return model.to(device)


def pair_scores(model, tokenizer, pairs: list[Pair], max_length: int, device):
    """(r_chosen [B], r_rejected [B]) in one forward over the 2B texts."""
    texts = ([reward_model_text(p.prompt, p.chosen) for p in pairs]
             + [reward_model_text(p.prompt, p.rejected) for p in pairs])
    ids, mask = encode_for_scoring(tokenizer, texts, max_length, device)
    scores = sequence_scores(model, ids, mask)
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs: list[Pair], max_length: int, device, batch_size: int = 64) -> dict:
    """Pairwise accuracy (a tie counts half), mean margin r_chosen - r_rejected and the BT loss."""
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_scores(model, tokenizer, pairs[i:i + batch_size], max_length, device)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
        margins += [p.margin for p in pairs[i:i + batch_size]]
    model.train(was_training)
    c, r, m = torch.cat(chosen), torch.cat(rejected), torch.tensor(margins)
    diff = c - r
    return {"accuracy": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item(),
            "margin": diff.mean().item(), "loss": bradley_terry_loss(c, r, m).item(), "pairs": len(pairs)}


# ----------------------------------------------------------------------------------------------
# `grpo reward-model train`

def train_reward_model(cfg: RewardModelConfig, log=print) -> dict:
    """Train, evaluate on held-out pairs during and after training, save. Returns the summary."""
    _check(cfg)
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.model)
    columns = dict(prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                   rejected_column=cfg.rejected_column, margin_column=cfg.margin_column,
                   chat_template=cfg.apply_chat_template, log=log)
    pairs = load_preferences(cfg.dataset, tokenizer, **columns)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.eval_dataset:
        eval_pairs = load_preferences(cfg.eval_dataset, tokenizer, **columns)
    else:
        order = torch.randperm(len(pairs), generator=g).tolist()
        n_eval = int(len(pairs) * cfg.eval_fraction)
        eval_pairs, pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
        if not pairs:
            raise DataError(f"{cfg.dataset}: nothing left to train on after holding out eval_fraction")
    log(f"reward model: {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs, backbone {cfg.model}")

    precision = Precision(device, dtype)
    model = load_reward_model(cfg.model, device, torch.float32, tokenizer)  # master weights (see Precision)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def run_eval(step: int) -> dict:
        if not eval_pairs:
            return {}
        with precision.autocast():
            e = evaluate_pairs(model, tokenizer, eval_pairs, cfg.max_length, device, cfg.micro_batch_size)
        record = {"step": step, "eval_accuracy": e["accuracy"], "eval_margin": e["margin"], "eval_loss": e["loss"]}
        log(f"rm step {step}/{cfg.max_steps} held-out pairwise accuracy {e['accuracy']:.3f} "
            f"margin {e['margin']:.3f} loss {e['loss']:.4f}")
        return record

    sampler = PromptSampler(len(pairs), cfg.seed)
    start = time.time()
    history = []
    with (out / "metrics.jsonl").open("w") as metrics:
        def write(record):
            record["seconds"] = round(time.time() - start, 3)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            history.append(record)

        write(run_eval(0) or {"step": 0})
        for step in range(1, cfg.max_steps + 1):
            batch = [pairs[i] for i in sampler.next(cfg.batch_size)]
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
            for i in range(0, len(batch), cfg.micro_batch_size):
                chunk = batch[i:i + cfg.micro_batch_size]
                with precision.autocast():
                    c, r = pair_scores(model, tokenizer, chunk, cfg.max_length, device)  # float32 head
                m = torch.tensor([p.margin for p in chunk], device=c.device)
                # Weight each chunk by its share so the gradient is that of the whole batch's mean.
                loss = bradley_terry_loss(c, r, m) * (len(chunk) / len(batch))
                precision.backward(loss)
                loss_sum += loss.item()
                correct += (c > r).float().sum().item()
                margin_sum += (c - r).sum().item()
            grad_norm = precision.step(optimizer, model.parameters(), cfg.max_grad_norm)
            scheduler.step()
            record = {}
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                record = {"step": step, "loss": loss_sum, "accuracy": correct / len(batch),
                          "margin": margin_sum / len(batch), "grad_norm": float(grad_norm),
                          "lr": scheduler.get_last_lr()[0]}
                log(f"rm step {step}/{cfg.max_steps} loss {loss_sum:.4f} acc {record['accuracy']:.3f} "
                    f"lr {record['lr']:.2e}")
            if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
                record.update(run_eval(step))
            if record:
                write(record)

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    final = next((h for h in reversed(history) if "eval_accuracy" in h), {})
    summary = {"model": str(out), "backbone": cfg.model, "train_pairs": len(pairs), "eval_pairs": len(eval_pairs),
               "eval_accuracy": final.get("eval_accuracy"), "eval_margin": final.get("eval_margin"),
               "eval_loss": final.get("eval_loss"), "train_seconds": time.time() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "reward_model_config.json").write_text(json.dumps(vars(cfg), indent=2))
    log(f"reward model saved to {out} (held-out pairwise accuracy {summary['eval_accuracy']})")
    return summary


# ----------------------------------------------------------------------------------------------
# `grpo reward-model eval` and `score`

def _load_for_use(cfg: RewardModelEvalConfig):
    from transformers import AutoTokenizer

    _check(cfg)
    device = pick_device(cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise RewardError(f"model: cannot load the tokenizer of {cfg.model!r}: {e}") from None
    model = load_reward_model(cfg.model, device, pick_dtype(cfg.dtype, device), tokenizer).eval()
    if model.config.num_labels != 1:
        raise RewardError(f"model {cfg.model!r}: expected a one-label reward model, found "
                          f"num_labels={model.config.num_labels}")
    return model, tokenizer, device


def eval_reward_model(cfg: RewardModelEvalConfig, log=print) -> dict:
    """Pairwise accuracy and mean margin of a saved reward model on a preference file."""
    model, tokenizer, device = _load_for_use(cfg)
    pairs = load_preferences(cfg.dataset, tokenizer, prompt_column=cfg.prompt_column,
                             chosen_column=cfg.chosen_column, rejected_column=cfg.rejected_column,
                             margin_column=cfg.margin_column, chat_template=cfg.apply_chat_template, log=log)
    result = evaluate_pairs(model, tokenizer, pairs, cfg.max_length, device, cfg.batch_size)
    log(f"{cfg.dataset}: {result['pairs']} pairs, pairwise accuracy {result['accuracy']:.4f}, "
        f"mean margin {result['margin']:.4f}, loss {result['loss']:.4f}")
    return result


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], max_length: int, device, batch_size: int = 64) -> list[float]:
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_for_scoring(tokenizer, texts[i:i + batch_size], max_length, device)
        out += sequence_scores(model, ids, mask).cpu().tolist()
    return out


def score_file(cfg: RewardModelEvalConfig, log=print) -> Path:
    """Score every prompt/completion row; write the rows with a `score` column (.jsonl or .csv)."""
    if not cfg.output_file:
        raise ConfigError("output_file: required for `reward-model score` (a .jsonl or .csv path)")
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column, cfg.completion_column], cfg.dataset)
    model, tokenizer, device = _load_for_use(cfg)
    texts = []
    for row in rows:
        try:
            texts.append(reward_model_text(format_prompt(tokenizer, row[cfg.prompt_column], cfg.apply_chat_template),
                                           row[cfg.completion_column]))
        except (DataError, TypeError) as e:
            raise DataError(f"{cfg.dataset}:{row['_line']}: {e}") from None
    scores = score_texts(model, tokenizer, texts, cfg.max_length, device, cfg.batch_size)
    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**{k: v for k, v in row.items() if k != "_line"}, "score": s} for row, s in zip(rows, scores)]
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    log(f"scored {len(rows)} rows (mean {sum(scores) / len(scores):.4f}) -> {path}")
    return path


# ----------------------------------------------------------------------------------------------

def cli_main(args) -> int:
    """Entry point of `grpo reward-model {train, eval, score, make-preferences}`."""
    log = (lambda *a: None) if args.quiet else print
    if args.rm_command == "train":
        train_reward_model(load_config(RewardModelConfig, args.config, args.set), log=log)
    elif args.rm_command == "eval":
        eval_reward_model(load_config(RewardModelEvalConfig, args.config, args.set), log=log)
    elif args.rm_command == "score":
        score_file(load_config(RewardModelEvalConfig, args.config, args.set), log=log)
    elif args.rm_command == "make-preferences":
        from .preferences import PreferenceConfig, make_preferences
        make_preferences(load_config(PreferenceConfig, args.config, args.set), log=log)
    else:
        raise ConfigError(f"unknown reward-model command {args.rm_command!r}")
    return 0
