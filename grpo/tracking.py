"""Where a run's numbers go: `metrics.jsonl` (one JSON object per step) and the console.

Kept apart from the trainer so the algorithm never does I/O and richer views (progress displays,
dashboards, reports) can be added here without touching the loop.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, output_dir: Path, total_steps: int, enabled: bool = True, quiet: bool = False,
                 resume_step: int = 0, config: dict | None = None):
        self.output_dir, self.total_steps = Path(output_dir), total_steps
        self.enabled, self.quiet = enabled, quiet
        self.start = time.time()
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        if resume_step and path.exists():
            # Drop lines written after the checkpoint we resume from: they will be written again.
            keep = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in keep))
        elif path.exists():
            path.unlink()
        self.metrics = path.open("a")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if not self.quiet:
            self.console(record)

    def console(self, r: dict) -> None:
        parts = [f"step {r['step']}/{self.total_steps}"]
        for key, fmt in (("reward_mean", "reward {:.3f}"), ("accuracy", "acc {:.3f}"),
                         ("eval_accuracy", "eval_acc {:.3f}"), ("kl", "kl {:.4f}"),
                         ("completion_length_mean", "len {:.1f}"), ("zero_variance_frac", "zero_var {:.2f}"),
                         ("tokens_per_second", "{:.0f} tok/s")):
            if key in r and r[key] is not None:
                parts.append(fmt.format(r[key]))
        print("  ".join(parts), file=sys.stdout, flush=True)

    def samples(self, step: int, rollout, n: int = 4) -> None:
        """A few completions of the step with their prompt, rewards and advantage -> samples.jsonl."""
        if not self.enabled:
            return
        with (self.output_dir / "samples.jsonl").open("a") as f:
            for i in range(min(n, len(rollout))):
                f.write(json.dumps({
                    "step": step, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
                    "reward": rollout.rewards[i].item(), "advantage": rollout.advantages[i].item(),
                    "rewards": {k: v[i].item() for k, v in rollout.rewards_per_function.items()}}) + "\n")

    def info(self, message: str) -> None:
        if self.enabled and not self.quiet:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
