"""The model card (README.md) written beside a trained model, as `push_to_hub` would write one,
without uploading anything: Hugging Face metadata (base model, library, tags, datasets), how to
load it, the settings that define the run, and its held-out results."""

from __future__ import annotations

from pathlib import Path

import yaml

from grpo import __version__

# The keys that say what a GRPO run did, in this order (the whole config is in train_config.json).
CARD_KEYS = ("preset", "learning_rate", "max_steps", "prompts_per_step", "group_size", "generation",
             "max_completion_length", "temperature", "advantage_estimator", "policy_loss", "loss_aggregation",
             "epsilon_low", "epsilon_high", "delta", "beta", "kl_estimator", "sync_ref_model", "num_iterations")


def hub_id(value) -> str | None:
    """`value` when it names something on the Hub rather than a local path."""
    return value if isinstance(value, str) and value and not Path(value).expanduser().exists() else None


def write_model_card(out: Path, config: dict, results: dict, command: str = "grpo train",
                     shown_as: Path | None = None) -> Path:
    """README.md in `out`: `config` is the run's to_dict, `results` {name: {metric: value}}.
    `shown_as`: the directory the card names, when `out` is where it is written before it is
    moved there (runs.run_dir.publish)."""
    where = Path(shown_as) if shown_as is not None else out
    base = hub_id(config.get("model"))
    datasets = [d for d in (hub_id(config.get("dataset")), hub_id(config.get("eval_dataset"))) if d]
    meta = {"library_name": "transformers", "tags": ["grpo", command.split()[-1], "generated_from_trainer"]}
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    name = where.resolve().name
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{config.get('model')}`"
    lines = ["---", yaml.safe_dump(meta, sort_keys=True).strip(), "---", "", f"# {name}", "",
             f"Fine-tuned from {origin} with `{command}` (grpo {__version__}) on `{config.get('dataset')}`.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{where}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "", "## Training", "",
             "| key | value |", "|---|---|"]
    lines += [f"| {k} | {config[k]} |" for k in CARD_KEYS if k in config]
    rewards = [str(r.get("function") or r.get("model")) if isinstance(r, dict) else str(r)
               for r in config.get("rewards") or []]
    if rewards:
        lines.append(f"| rewards | {', '.join(rewards)} |")
    lines += ["", "Every setting is in `train_config.json`, the curves in `metrics.jsonl`."]
    if results:
        metrics = list(dict.fromkeys(k for r in results.values() for k in r))
        lines += ["", "## Held-out results", "", "| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for when, values in results.items():
            lines.append(f"| {when} | " + " | ".join(f"{values[m]:.4f}" if m in values else "" for m in metrics) + " |")
    lines += ["", "## Citation", "", "GRPO: Shao et al. 2024, *DeepSeekMath: Pushing the Limits of Mathematical "
              "Reasoning in Open Language Models*, arXiv:2402.03300.", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path
