"""What `grpo train` shows on the console while it runs.

On a terminal: one status line, rewritten in place at every logged step (a progress bar, elapsed
and ETA, and the numbers that reveal a quietly failing run: reward, accuracy, KL, completion
length, the fraction of groups with zero reward variance, throughput). Anything else (messages,
sample tables, eval results) is printed above it, so it never interleaves with the status line.

Not on a terminal (CI, nohup, a pipe into a file): the same numbers as one plain line per logged
step, with no carriage returns or escape codes that would litter a log file.

Everything printed is ASCII apart from the model's own text, which is escaped where the stream
cannot encode it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

# (logged metric name, console format) in display order; a key missing from a record is left out.
FIELDS = (("reward/mean", "reward {:.3f}"), ("reward/accuracy", "acc {:.3f}"), ("eval/accuracy", "eval_acc {:.3f}"),
          ("loss/kl", "kl {:.4f}"), ("rollout/completion_length_mean", "len {:.1f}"),
          ("rollout/zero_variance_frac", "zero_var {:.2f}"), ("time/tokens_per_second", "{:.0f} tok/s"))
# The supervised commands (sft, reward-model train).
SUPERVISED_FIELDS = (("loss/total", "loss {:.4f}"), ("loss/accuracy", "acc {:.3f}"), ("eval/loss", "eval_loss {:.4f}"),
                     ("eval/accuracy", "eval_acc {:.3f}"), ("loss/lr", "lr {:.2e}"))
HELD_OUT = ("eval/loss", "eval/reward", "eval/accuracy")  # printed above the status line when a step has them
BAR_WIDTH = 20


def format_numbers(values: dict, digits: int = 4) -> str:
    """Results as one aligned line of text, `eval_reward 0.1050  eval_accuracy 0.2260`, not a dict."""
    return "  ".join(f"{k} {v:.{digits}f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def is_live(stream) -> bool:
    """A rewritable status line only makes sense on an interactive terminal that understands \\r."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def safe_text(text: str, stream=None) -> str:
    """One line of model text fit for a console: newlines and tabs made visible, control characters
    escaped, and characters the stream cannot encode written as backslash escapes."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", " ")
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text


def fit(text: str, width: int, keep: str = "head") -> str:
    """Cut text to `width` characters, marking the cut with '...'; `keep` says which end survives
    (a prompt's tail holds the question, chat templates put boilerplate at its head)."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    return "..." + text[len(text) - width + 3:] if keep == "tail" else text[:width - 3] + "..."


class Progress:
    def __init__(self, total_steps: int, quiet: bool = False, start_step: int = 0, stream=None,
                 live: bool | None = None, fields=None):
        self.total_steps, self.quiet, self.start_step = total_steps, quiet, start_step
        self.fields = FIELDS if fields is None else fields
        self._stream = stream  # None: whatever sys.stdout is at print time (pytest swaps it)
        self.live = is_live(self.stream) if live is None else live
        self.start = time.time()
        self.status = ""  # the status line currently on screen (live mode)

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    def width(self) -> int:
        return shutil.get_terminal_size((120, 24)).columns

    def step_line(self, r: dict) -> str:
        step = r["step"]
        elapsed = r.get("time/elapsed", time.time() - self.start)
        # Steps done by this process: elapsed restarts with the process on resume.
        done = max(1, step - self.start_step)
        eta = elapsed / done * max(0, self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        if self.live:
            filled = int(BAR_WIDTH * step / max(1, self.total_steps))
            parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
        parts.append(f"{hms(elapsed)} eta {hms(eta)}")
        for key, fmt in self.fields:
            if r.get(key) is not None:
                parts.append(fmt.format(r[key]))
        return "  ".join(parts)

    def update(self, record: dict) -> None:
        """One logged step."""
        if self.quiet:
            return
        line = self.step_line(record)
        if not self.live:
            self._write(line + "\n")
            return
        self.status = fit(line, self.width() - 1)
        if any(k in record for k in HELD_OUT):
            # Eval results are rare and worth keeping on screen once the status line moves on.
            evals = format_numbers({k: record[k] for k in HELD_OUT if k in record}, 3)
            self.message(f"step {record['step']}: {evals}")  # prints it, then the new status line
        else:
            self._write("\r\x1b[2K" + self.status)

    def message(self, text: str) -> None:
        """Print a block of text (one or many lines) without breaking the status line."""
        if self.quiet:
            return
        if self.live and self.status:
            self._write("\r\x1b[2K" + text.rstrip("\n") + "\n" + self.status)
        else:
            self._write(text.rstrip("\n") + "\n")

    def close(self) -> None:
        # Leave the last status line on screen and move below it.
        if self.live and self.status and not self.quiet:
            self._write("\n")
        self.status = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def samples_table(step: int, rows: list[dict], stream=None, width: int = 120) -> str:
    """The sample completions of a step as an ASCII table, one line per completion.

    A group's prompt is shown once (its other rows say `"`); the full text is in samples.jsonl."""
    names = list(dict.fromkeys(k for r in rows for k in r["rewards"]))  # the config's order
    numbers = ["reward", "adv"] + [fit(n, 14) for n in names]
    num_width = [max(6, len(h)) for h in numbers]
    # Each column takes its width + 3 ("| " before, " " after), plus the closing "|".
    fixed = 1 + (3 + 3) + 3 + 3 + sum(w + 3 for w in num_width)
    text_width = max(20, width - fixed)
    prompt_width = max(10, text_width * 2 // 5)
    completion_width = max(10, text_width - prompt_width)

    def line(cells, widths, aligns):
        return "| " + " | ".join(c.ljust(w) if a == "<" else c.rjust(w)
                                 for c, w, a in zip(cells, widths, aligns)) + " |"

    widths = [3, prompt_width, completion_width] + num_width
    aligns = ["<", "<", "<"] + [">"] * len(num_width)
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [f"samples at step {step} (full text in samples.jsonl)", rule,
           line(["#", "prompt", "completion"] + numbers, widths, aligns), rule]
    previous_prompt = None
    for r in rows:
        prompt = '"' if r["prompt"] == previous_prompt else fit(safe_text(r["prompt"], stream), prompt_width, "tail")
        previous_prompt = r["prompt"]
        values = [r["reward"], r["advantage"]] + [r["rewards"].get(n) for n in names]
        cells = [str(r.get("index", "")), prompt, fit(safe_text(r["completion"], stream), completion_width)]
        cells += ["-" if v is None else f"{v:+.3f}" if i == 1 else f"{v:.3f}" for i, v in enumerate(values)]
        out.append(line(cells, widths, aligns))
    out.append(rule)
    return "\n".join(out)
