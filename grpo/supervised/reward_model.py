"""`grpo reward-model train | eval | score`: reward models from preference pairs (Bradley-Terry)
or from rankings (Plackett-Luce).

The seed's pipeline starts here: "train a reward model from preference data". The reward model
is any causal LM with a one-label head, `AutoModelForSequenceClassification.from_pretrained(
backbone, num_labels=1)` (for a Llama backbone: the transformer plus a fresh linear `score` head
read at the last real token), trained so that r(prompt, chosen) > r(prompt, rejected):

    loss = -log sigmoid(r_chosen - r_rejected - margin)          (grpo.algorithm.bradley_terry_loss)

or, from a file of rankings (`prompt`, `completions` best to worst, tie groups allowed;
grpo.rewards.rankings), listwise over the K completions of each (Plackett 1975; Luce 1959):

    loss = -sum_k [ r_(k) - log sum_{j >= k} exp r_(j) ]          (grpo.algorithm.plackett_luce_loss)

which at K = 2 is the Bradley-Terry loss. The NLL term of the likelihood kinds is on the chosen
completion, or on the first tie group of a ranking.

The result is saved with `save_pretrained` next to its tokenizer, so plain
`AutoModelForSequenceClassification.from_pretrained(dir)` loads it and `grpo train` takes it as
`rewards: [{model: dir}]`. It reads the same text the policy sees (`grpo.rewards.reward_model_text`).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from grpo.algorithm import bradley_terry_loss, plackett_luce_loss
from grpo.config import RewardModelConfig, RewardModelEvalConfig, to_dict
from grpo.data import DataError, PromptSampler, format_prompt, load_rows, require_columns
from grpo.engine.models import check_model_source
from grpo.errors import ConfigError, RewardError, RunError
from grpo.observe.metrics import SUPERVISED
from grpo.observe.progress import SUPERVISED_FIELDS
from grpo.observe.tracking import RunLogger
from grpo.rewards.models import completion_text, load_reward_model, score_batches
from grpo.rewards.preferences import evaluate_pairs, load_preferences, pair_scores
from grpo.rewards.rankings import evaluate_rankings, is_ranking_file, load_rankings, ranking_scores
from grpo.runs.interrupts import Interrupted, StopRequests
from grpo.runs.run_dir import check_output_file, claim_output_dir, publish, staging_dir
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.runtime.setup import start_run

from .process_reward_model import start_reward_model_run


def save_reward_model(rm, out: Path) -> None:
    """The reward model of its kind, as a directory transformers loads (a failed write names it)."""
    try:
        rm.save(out)
    except OSError as e:
        raise RunError(f"could not save the reward model to {out}: {e.strerror or e}") from None


def _preference_columns(cfg, log) -> dict:
    return dict(prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                rejected_column=cfg.rejected_column, margin_column=cfg.margin_column,
                chat_template=cfg.apply_chat_template, log=log)


def _ranking_columns(cfg, log) -> dict:
    return dict(prompt_column=cfg.prompt_column, completions_column=cfg.completions_column,
                labels_column=cfg.labels_column, chat_template=cfg.apply_chat_template, log=log)


def load_feedback(cfg, path: str, tokenizer, log) -> list:
    """Preference pairs, or rankings when the file's rows have `completions_column`."""
    if is_ranking_file(path, cfg.completions_column):
        return load_rankings(path, tokenizer, **_ranking_columns(cfg, log))
    return load_preferences(path, tokenizer, **_preference_columns(cfg, log))


def is_rankings(items: list) -> bool:
    return bool(items) and hasattr(items[0], "tiers")


def pair_loss(rm, chunk, nll_coef: float) -> tuple[torch.Tensor, float, float]:
    """The Bradley-Terry loss of a chunk of pairs (+ NLL of the chosen), and the chunk's count of
    pairs ranked right and sum of margins."""
    c, r = pair_scores(rm, chunk)  # float32 scores
    nll = rm.nll([p.prompt for p in chunk], [p.chosen for p in chunk]) if nll_coef else 0.0
    m = torch.tensor([p.margin for p in chunk], device=c.device)
    return (bradley_terry_loss(c, r, m) + nll_coef * nll, (c > r).float().sum().item(),
            (c - r).sum().item())


def ranking_loss(rm, chunk, nll_coef: float) -> tuple[torch.Tensor, float, float]:
    """The Plackett-Luce loss of a chunk of rankings (+ NLL of each first tie group), and the
    chunk's count of rankings whose top score is in the first tie group and sum of margins
    (mean score of the first tie group minus the mean of the rest)."""
    scores, tiers, mask = ranking_scores(rm, chunk)
    best = [(r.prompt, c) for r in chunk for c, t in zip(r.completions, r.tiers) if t == 0]
    nll = rm.nll([p for p, _ in best], [c for _, c in best]) if nll_coef else 0.0
    top = scores.detach().masked_fill(~mask, float("-inf")).argmax(dim=1)
    first = (tiers == 0) & mask
    rest = (tiers > 0) & mask
    s = scores.detach()
    margins = (s * first).sum(1) / first.sum(1) - (s * rest).sum(1) / rest.sum(1)
    return (plackett_luce_loss(scores, tiers, mask) + nll_coef * nll,
            first.gather(1, top[:, None]).float().sum().item(), margins.sum().item())


def evaluate_feedback(rm, items: list, batch_size: int) -> dict:
    """Held-out metrics of pairs (accuracy, margin, loss) or rankings (pairwise accuracy,
    Kendall's tau, top-1 and correct-vs-wrong accuracy, loss), under `eval_` names."""
    if is_rankings(items):
        e = evaluate_rankings(rm, items, batch_size)
        return {"eval_accuracy": e["accuracy"], "eval_kendall_tau": e["kendall_tau"],
                "eval_top1_accuracy": e["top1_accuracy"], "eval_loss": e["loss"],
                **({"eval_correct_vs_wrong_accuracy": e["correct_vs_wrong_accuracy"]}
                   if e["correct_vs_wrong_accuracy"] is not None else {})}
    e = evaluate_pairs(rm, items, batch_size)
    return {"eval_accuracy": e["accuracy"], "eval_margin": e["margin"], "eval_loss": e["loss"]}


def train_reward_model(cfg: RewardModelConfig, quiet: bool = False, overwrite: bool = False,
                       config_path: str | None = None) -> dict:
    """Train, evaluate on held-out pairs during and after training, save. Returns the summary.
    The output directory is claimed as every run's (runs.run_dir); `config_path`: the config file
    the run was loaded from, an input no overwrite may delete. `kind: process` trains a process
    reward model instead (grpo.supervised.process_reward_model)."""
    if cfg.kind == "process":
        from .process_reward_model import train_process_reward_model
        return train_process_reward_model(cfg, quiet, overwrite, config_path)
    log = (lambda *a: None) if quiet else print
    run, tokenizer, paths = start_reward_model_run(cfg, overwrite, config_path)
    out = run.out
    pairs = load_feedback(cfg, cfg.dataset, tokenizer, log)
    if cfg.eval_dataset:
        eval_pairs = load_feedback(cfg, cfg.eval_dataset, tokenizer, log)
    else:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = int(len(pairs) * cfg.eval_fraction)
        eval_pairs, pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
        if not pairs:
            raise DataError(f"{cfg.dataset}: nothing left to train on after holding out eval_fraction")
    what = "rankings" if is_rankings(pairs) else "pairs"
    log(f"reward model: {len(pairs)} training {what}, {len(eval_pairs)} held-out {what}, backbone {cfg.model}")
    with claim_output_dir(out, "grpo reward-model train", inputs=paths, resume=False, overwrite=overwrite):
        return run_reward_model(cfg, run, tokenizer, pairs, eval_pairs, quiet)


def run_reward_model(cfg: RewardModelConfig, run, tokenizer, pairs, eval_pairs, quiet: bool) -> dict:
    """The training itself, once the inputs are checked and the output directory claimed."""
    log = (lambda *a: None) if quiet else print
    device, precision, out = run.device, run.precision, run.out
    # float32 master weights (runtime.precision): a new reward model of the configured kind.
    rm = load_reward_model(cfg.model, device, torch.float32, tokenizer, max_length=cfg.max_length, fresh=cfg.kind,
                           settings={"score_reduction": cfg.score_reduction, "beta": cfg.dpo_beta})
    model = rm.model
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = PromptSampler(len(pairs), cfg.seed)
    logger = RunLogger(out, cfg.max_steps, quiet=quiet, config=to_dict(cfg), fields=SUPERVISED_FIELDS,
                       names=SUPERVISED)

    rankings = is_rankings(pairs)
    batch_loss = ranking_loss if rankings else pair_loss
    # Sequences per forward: a pair is 2, a ranking its K.
    width = max(len(p.completions) for p in pairs) if rankings else 2
    micro = max(1, 2 * cfg.micro_batch_size // width)

    def run_eval() -> dict:
        if not eval_pairs:
            return {}
        with precision.autocast():
            return evaluate_feedback(rm, eval_pairs, 2 * cfg.micro_batch_size if rankings else cfg.micro_batch_size)

    start = time.time()
    history = [{"step": 0, **run_eval(), "elapsed": 0.0}]
    logger.log(history[0])
    try:
        with StopRequests() as stop:
            for step in range(1, cfg.max_steps + 1):
                batch = [pairs[i] for i in sampler.next(cfg.batch_size)]
                optimizer.zero_grad(set_to_none=True)
                loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
                for i in range(0, len(batch), micro):
                    chunk = batch[i:i + micro]
                    with precision.autocast():
                        loss, right, margins = batch_loss(rm, chunk, cfg.nll_coef)
                    # Weight each chunk by its share so the gradient is that of the whole batch's mean.
                    loss = loss * (len(chunk) / len(batch))
                    precision.backward(loss)
                    loss_sum += loss.item()
                    correct += right
                    margin_sum += margins
                grad_norm = precision.step(optimizer, model.parameters(), cfg.max_grad_norm)
                scheduler.step()
                record = {}
                if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                    record = {"loss": loss_sum, "accuracy": correct / len(batch), "margin": margin_sum / len(batch),
                              "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
                if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
                    record.update(run_eval())
                if record:
                    history.append({"step": step, **record, "elapsed": time.time() - start})
                    logger.log(history[-1])
                if stop.requested and step < cfg.max_steps:
                    where = "not saved (save_on_interrupt is off)"
                    if cfg.save_on_interrupt:
                        rm.save(out / f"checkpoint-{step}")
                        where = f"saved the reward model to {out / f'checkpoint-{step}'}"
                    raise Interrupted(f"interrupted by {stop.name()} at step {step}: {where}", stop.signum)
            # Every step is trained (the last one evaluated): a signal now waits for the save,
            # written whole (runs.run_dir.publish), then stops the run.
            with stop.deferred():
                final = staging_dir(out)
                save_reward_model(rm, final)
                last = next((h for h in reversed(history) if "eval_accuracy" in h), {})
                summary = {"model": str(out), "kind": cfg.kind, "backbone": cfg.model,
                           "loss": "plackett_luce" if rankings else "bradley_terry", "train_pairs": len(pairs),
                           "eval_pairs": len(eval_pairs),
                           **{k: last.get(k) for k in ("eval_accuracy", "eval_margin", "eval_loss", "eval_kendall_tau",
                                                       "eval_top1_accuracy", "eval_correct_vs_wrong_accuracy")},
                           "train_seconds": time.time() - start}
                (final / "summary.json").write_text(json.dumps(summary, indent=2))
                publish(final, out)
            if stop.requested:
                raise Interrupted(f"interrupted by {stop.name()} after the last step ({cfg.max_steps}): the trained "
                                  f"reward model is saved in {out}", stop.signum)
    finally:
        logger.close()
    log(f"reward model saved to {out} (held-out pairwise accuracy {summary['eval_accuracy']})")
    return summary


# ----------------------------------------------------------------------------------------------
# `grpo reward-model eval` and `score`

def _load_for_use(cfg: RewardModelEvalConfig):
    from transformers import AutoTokenizer

    run = start_run(cfg)
    check_model_source(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise RewardError(f"model: cannot load the tokenizer of {cfg.model!r}: {e}") from None
    rm = load_reward_model(cfg.model, run.device, run.dtype, tokenizer, max_length=cfg.max_length)
    rm.model.eval()
    return rm, tokenizer


def eval_reward_model(cfg: RewardModelEvalConfig, quiet: bool = False) -> dict:
    """Pairwise accuracy and mean margin of a saved reward model on a preference file; on a file of
    rankings, Kendall's tau, top-1 accuracy, pairwise and correct-vs-wrong accuracy."""
    log = (lambda *a: None) if quiet else print
    rm, tokenizer = _load_for_use(cfg)
    items = load_feedback(cfg, cfg.dataset, tokenizer, log)
    if is_rankings(items):
        result = evaluate_rankings(rm, items, cfg.batch_size)
        cvw = result["correct_vs_wrong_accuracy"]
        tau = result["kendall_tau"]
        log(f"{cfg.dataset}: {result['rankings']} rankings, Kendall's tau "
            f"{'-' if tau is None else f'{tau:.4f}'}, top-1 accuracy {result['top1_accuracy']:.4f}, pairwise "
            f"accuracy {result['accuracy']:.4f}, correct vs wrong {'-' if cvw is None else f'{cvw:.4f}'}, "
            f"loss {result['loss']:.4f}")
        return result
    result = evaluate_pairs(rm, items, cfg.batch_size)
    log(f"{cfg.dataset}: {result['pairs']} pairs, pairwise accuracy {result['accuracy']:.4f}, "
        f"mean margin {result['margin']:.4f}, loss {result['loss']:.4f}")
    return result


def score_file(cfg: RewardModelEvalConfig, quiet: bool = False, overwrite: bool = False,
               config_path: str | None = None) -> Path:
    """Score every prompt/completion row; write the rows with a `score` column (.jsonl or .csv).
    The output file never lands on an input, nor inside the reward model's directory
    (runs.run_dir.check_output_file); it is written whole, through a temporary file beside it."""
    if not cfg.output_file:
        raise ConfigError("output_file: required for `reward-model score` (a .jsonl or .csv path)")
    path = Path(cfg.output_file)
    check_output_file(path, inputs={"dataset": cfg.dataset, "model": cfg.model, "config": config_path or ""},
                      overwrite=overwrite)
    rows = load_rows(cfg.dataset)
    require_columns(rows, [cfg.prompt_column, cfg.completion_column], cfg.dataset)
    rm, tokenizer = _load_for_use(cfg)
    prompts, completions = [], []
    for row in rows:
        try:
            prompts.append(format_prompt(tokenizer, row[cfg.prompt_column], cfg.apply_chat_template))
            completions.append(completion_text(row[cfg.completion_column]))
        except (DataError, TypeError) as e:
            raise DataError(f"{cfg.dataset}:{row['_line']}: {e}") from None
    scores = score_batches(rm, prompts, completions, cfg.batch_size).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**{k: v for k, v in row.items() if k != "_line"}, "score": s} for row, s in zip(rows, scores)]
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # a name nobody has
    tmp = Path(name)
    try:
        if path.suffix.lower() == ".csv":
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            with os.fdopen(fd, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; an output file is as any other
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    if not quiet:
        print(f"scored {len(rows)} rows (mean {sum(scores) / len(scores):.4f}) -> {path}")
    return path
