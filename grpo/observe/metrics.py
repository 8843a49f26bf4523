"""The names a run's numbers are logged under: five namespaces, as CleanRL (`losses/`, `charts/`)
and verl (`actor/`, `timing_s/`) group theirs, so a dashboard sorts them into panels by itself.

- `loss/`: the update (the loss and its terms, KL, entropy, clipping, gradient norm, learning rate);
- `rollout/`: what was sampled (lengths, truncation, groups without signal, advantages, dynamic
  sampling, agent turns and tool calls);
- `reward/`: what the rewards said (the weighted total, each function, accuracy, the iterative
  reward model, and what reward functions logged with `log_metric`);
- `eval/`: held-out numbers;
- `time/`: seconds per phase, throughput and elapsed time.

The training code builds its records with plain names (`reward_mean`, `seconds_update`,
`eval_accuracy`), the names its summaries, `metric_for_best_model` and the recipes use; the
logger renames them on the way out (`metrics.jsonl`, TensorBoard, W&B, the console) with
`logged_name`. `grpo report` reads files written before the namespaces through `upgrade`, the
same table read the other way.
"""

from __future__ import annotations

NAMESPACES = ("loss", "rollout", "reward", "eval", "time")

# Plain name -> logged name, for `grpo train`'s records. Families are handled by `logged_name`:
# eval_* -> eval/*, seconds_* -> time/*, rewards/<fn>/* -> reward/<fn>/*, and any other plain name
# -> rollout/* (what the rollout measured: dynamic sampling's counts, agent metrics).
TRAIN = {
    "loss": "loss/total", "policy_loss": "loss/policy", "kl": "loss/kl", "entropy": "loss/entropy",
    "clip_frac_low": "loss/clip_frac_low", "clip_frac_high": "loss/clip_frac_high",
    "grad_norm": "loss/grad_norm", "nonfinite_grad_steps": "loss/nonfinite_grad_steps", "lr": "loss/lr",
    "optimizer_steps": "loss/optimizer_steps", "pg_token_frac": "loss/pg_token_frac",
    "router_aux_loss": "loss/router_aux", "is_weight_mean": "loss/is_weight_mean",
    "reward_mean": "reward/mean", "reward_std": "reward/std", "reward_kl": "reward/kl",
    "accuracy": "reward/accuracy",
    "seconds_step": "time/step", "tokens_per_second": "time/tokens_per_second", "elapsed": "time/elapsed",
}
# `sft` and `reward-model train`: their accuracy and margin are the training batch's, terms of the loss.
SUPERVISED = {
    "loss": "loss/total", "accuracy": "loss/accuracy", "margin": "loss/margin", "grad_norm": "loss/grad_norm",
    "lr": "loss/lr", "elapsed": "time/elapsed",
}
# Families the trainer already wrote with a slash before the namespaces, and where they live now.
FAMILIES = {"rewards/": "reward/", "iterative/": "reward/iterative/", "dynamic_sampling/": "rollout/dynamic_sampling/",
            "agent/": "rollout/agent/"}
# Logged as they are: the step, the record of a resume with changed settings, and anything whose
# name already starts with a namespace.
KEPT = ("step", "resumed_with_changes")


def in_namespace(key: str) -> bool:
    return "/" in key and key.split("/", 1)[0] in NAMESPACES


def logged_name(key: str, table: dict[str, str] = TRAIN) -> str:
    """The name a record's key is logged under (`table`: TRAIN or SUPERVISED)."""
    if key in KEPT or in_namespace(key):
        return key
    if key in table:
        return table[key]
    for old, new in FAMILIES.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith("seconds_"):
        return "time/" + key[len("seconds_"):]
    return "rollout/" + key


def namespaced(record: dict, table: dict[str, str] = TRAIN) -> dict:
    """A record with every key under its logged name."""
    return {logged_name(k, table): v for k, v in record.items()}


def upgrade(record: dict) -> dict:
    """A row of a `metrics.jsonl` written before the namespaces, under today's names; a row
    written since comes back as it is (its keys are already namespaced)."""
    if any(in_namespace(k) for k in record):
        return record
    return namespaced(record, TRAIN)


def plain_name(name: str) -> str:
    """The record key a logged eval name stands for (`eval/accuracy` -> `eval_accuracy`), so a
    setting may name a metric either way (`metric_for_best_model`)."""
    return "eval_" + name[len("eval/"):] if name.startswith("eval/") else name
