"""Where a run's numbers go: `metrics.jsonl`, `samples.jsonl`, the console, and optionally
TensorBoard and Weights & Biases.

Kept apart from the trainer so the algorithm never does I/O. Files in the run directory:

- `metrics.jsonl`: one JSON object per logged step, the trainer's record under the namespaced
  names of `metrics.py` (`loss/kl`, `reward/mean`, `eval/accuracy`, `time/step`).
- `train_config.json`: the run's training config (config.json in a run directory is the model's).
- `samples.jsonl`: a few completions of some steps, one JSON object each, with the fields
  step, index (row in the step's rollout), group (which prompt's group), prompt, completion,
  reward (weighted total), advantage, rewards ({reward name: value}), length (generated tokens),
  truncated (no EOS within max_completion_length) and, when reward functions logged columns with
  TRL's `log_extra`, extra ({column: value}).
- `tensorboard/`: event files with every numeric metric of metrics.jsonl under the same names,
  when `tensorboard` is in `report_to` and the tensorboard package is installed.
- `wandb/`: a Weights & Biases run when `wandb` is in `report_to` (offline without an API key).

On resume, rows of metrics.jsonl and samples.jsonl after the resumed step are dropped (they will
be written again), and so is a last line cut short while it was being written; every other line
is kept. A fresh run starts these files anew.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import sys
import time
from pathlib import Path

from .metrics import TRAIN, namespaced
from .progress import Progress, samples_table

TRAIN_CONFIG = "train_config.json"
SAMPLE_FIELDS = ("step", "index", "group", "prompt", "completion", "reward", "advantage", "rewards",
                 "length", "truncated")


class RunLogger:
    """The metrics writer of every training command (`grpo train`, `sft`, `reward-model train`).

    `enabled` is False on every process but rank 0 under torchrun; `fields` picks what the console
    line shows (see `progress.FIELDS`); `names` is the table that gives each record key its logged
    name (`metrics.TRAIN` or `metrics.SUPERVISED`)."""

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool = True, quiet: bool = False,
                 resume_step: int = 0, config: dict | None = None, stream=None, fields=None,
                 names: dict[str, str] = TRAIN):
        self.output_dir, self.total_steps, self.names = Path(output_dir), total_steps, names
        self.enabled, self.quiet = enabled, quiet
        self.config = config or {}
        self.start = time.time()
        self.progress = Progress(total_steps, quiet=quiet or not enabled, start_step=resume_step, stream=stream,
                                 fields=fields)
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            restart_jsonl(self.output_dir / name, resume_step)
        self.metrics = (self.output_dir / "metrics.jsonl").open("a")
        if config:
            # The trainer's config.json is overwritten by the model's own config.json when the model
            # is saved into the same directory; this copy is the one `grpo report` reads.
            (self.output_dir / TRAIN_CONFIG).write_text(json.dumps(config, indent=2))
        report_to = self.config.get("report_to", ["tensorboard"])
        if "tensorboard" in report_to:
            self.tensorboard = open_tensorboard(self.output_dir / "tensorboard", resume_step)
        if "wandb" in report_to:
            self.wandb = open_wandb(self.output_dir, self.config, resume_step, self.info)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = namespaced(record, self.names)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()  # so a TensorBoard watching the run sees each step as it lands
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        self.progress.update(record)

    def samples(self, step: int, rollout, n: int | None = None) -> None:
        """A few completions of the step with their prompt, rewards and advantage: appended to
        samples.jsonl and printed as a table (unless quiet)."""
        if not self.enabled:
            return
        n = self.config.get("num_samples", 4) if n is None else n
        rows = sample_rows(step, rollout, pick_rows(len(rollout), self.config.get("group_size", 1), n),
                           self.config.get("group_size", 1))
        with (self.output_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.add_text("samples", samples_markdown(rows), step)
        if self.wandb is not None:
            self.wandb.log({"samples": wandb_table(rows)}, step=step)
        width = min(160, self.progress.width()) if self.progress.live else 120
        self.progress.message(samples_table(step, rows, self.progress.stream, width))

    def info(self, message: str) -> None:
        if self.enabled and not self.quiet:
            self.progress.message(message)

    def close(self) -> None:
        self.progress.close()
        if not self.enabled:
            return
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def restart_jsonl(path: Path, resume_step: int) -> None:
    """On resume keep the rows up to the checkpoint's step (later ones will be written again);
    on a fresh run start the file anew.

    A last line with no newline that does not parse was cut short while being written (the run was
    killed or the disk filled): it is dropped, so the rows appended next start on a line of their
    own. Any other line that is not a row with a numeric step (garbage, `null`, a row without a
    step) is kept as it is: nothing but the rows the resumed run writes again is removed, and
    `grpo report` skips such lines with a warning."""
    if not path.exists():
        return
    if not resume_step:
        path.unlink()
        return
    lines = path.read_bytes().split(b"\n")
    last = lines.pop()  # what follows the last newline: empty unless the file ends mid-line
    if last.strip() and parses(last):
        lines.append(last)
    keep = [l for l in lines if l.strip() and not (logged_step(l) or 0) > resume_step]
    # Written beside the file and renamed over it: a crash while rewriting leaves the old file whole.
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(b"".join(l + b"\n" for l in keep))
    os.replace(partial, path)


def parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


def logged_step(line: bytes) -> float | None:
    """The step of a JSONL row, or None when the line is not an object with a numeric step."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def pick_rows(total: int, group_size: int, n: int) -> list[int]:
    """Up to n row indices spread over the groups (first completion of each group, then second...)
    so the table shows several prompts and, within a group, how its rewards differ."""
    group_size = max(1, group_size)
    groups = max(1, total // group_size)
    order = [g * group_size + m for m in range(group_size) for g in range(groups)]
    return sorted(i for i in order[:n] if i < total)


def _first_token(advantage) -> float:
    # Per-token advantages (process supervision): the first token's, the sum over every step.
    return float(advantage.reshape(-1)[0]) if advantage.dim() else float(advantage)


def sample_rows(step: int, rollout, indices: list[int], group_size: int) -> list[dict]:
    per_function = rollout.rewards_per_function
    log = getattr(rollout, "reward_log", None)
    extra = {k: v for k, v in (log.extra if log is not None else {}).items() if len(v) == len(rollout)}
    rows = [{"step": step, "index": i, "group": i // max(1, group_size),
             "prompt": rollout.prompts[i], "completion": rollout.completions[i],
             "reward": float(rollout.rewards[i]), "advantage": _first_token(rollout.advantages[i]),
             "rewards": {k: float(v[i]) for k, v in per_function.items()},
             "length": int(rollout.lengths[i]), "truncated": bool(rollout.truncated[i])}
            for i in indices]
    if extra:
        for row in rows:
            row["extra"] = {k: _plain(v[row["index"]]) for k, v in extra.items()}
    messages = getattr(rollout, "messages", None)
    if messages is not None:  # agent runs: the whole conversation, tool calls and results visible
        for row in rows:
            row["messages"] = messages[row["index"]]
    return rows


def _plain(value):
    """A logged value as JSON can hold it."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def samples_markdown(rows: list[dict]) -> str:
    """Sample completions as a Markdown table for TensorBoard's text tab."""
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    names = list(dict.fromkeys(k for r in rows for k in r["rewards"]))
    extra = list(dict.fromkeys(k for r in rows for k in r.get("extra", {})))
    lines = ["| # | prompt | completion | reward | advantage | " + " | ".join(names + extra) + " |",
             "|---" * (5 + len(names) + len(extra)) + "|"]
    for r in rows:
        lines.append(f"| {r['index']} | {cell(r['prompt'])} | {cell(r['completion'])} | {r['reward']:.3f} | "
                     f"{r['advantage']:+.3f} | " + " | ".join(f"{r['rewards'].get(n, 0.0):.3f}" for n in names)
                     + "".join(f" | {cell(r.get('extra', {}).get(c, ''))}" for c in extra) + " |")
    return "\n".join(lines)


def open_tensorboard(log_dir: Path, resume_step: int):
    """A SummaryWriter when TensorBoard is installed (the `tensorboard` extra); None otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None  # optional: the run's numbers are in metrics.jsonl regardless
    if not resume_step and log_dir.exists():
        # A fresh run in a reused directory: old curves would be drawn over the new ones.
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
    # purge_step hides the steps of earlier event files that this resumed run writes again.
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def open_wandb(output_dir: Path, config: dict, resume_step: int, say):
    """A Weights & Biases run, asked for with `report_to: [wandb]`. Without an API key it runs in
    offline mode (sync later with `wandb sync`), so it never needs the network to train."""
    try:
        import wandb
    except ImportError:
        print("grpo: report_to includes wandb but wandb is not installed (pip install 'grpo[wandb]'); "
              "skipping it", file=sys.stderr)
        return None
    if not has_wandb_key() and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        say("wandb: no API key found, logging offline (sync later with `wandb sync`)")
    # The run id is kept in the run directory so a resumed run continues the same W&B run.
    id_file = output_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if resume_step and id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=config.get("wandb_project", "grpo"), name=output_dir.name, id=run_id,
                      resume="allow", dir=str(output_dir), config=config)


def wandb_table(rows: list[dict]):
    import wandb
    names = list(dict.fromkeys(k for r in rows for k in r["rewards"]))
    table = wandb.Table(columns=["step", "index", "prompt", "completion", "reward", "advantage", *names])
    for r in rows:
        table.add_data(r["step"], r["index"], r["prompt"], r["completion"], r["reward"], r["advantage"],
                       *[r["rewards"].get(n) for n in names])
    return table
