"""`grpo report RUN_DIR [RUN_DIR ...]`: the curves that say whether (and why) a run learned.

Writes `report.html`, one self-contained file (plots embedded as base64 PNG, inline CSS, no
scripts, nothing fetched) that opens offline, and the same plots as PNG files in `plots/` beside
it. Several runs are overlaid, one colour per run, to compare e.g. beam vs sample or grpo vs dapo.

Reads from each run directory: metrics.jsonl (required), train_config.json (the run's config),
config.json (the model's), summary.json and samples.jsonl (each optional). Plotting needs
matplotlib (the `report` extra), imported only here.

Everything read from a run is data, never markup: text is HTML-escaped where it lands in the page
and `$` is escaped where it lands in a plot (matplotlib would parse it as math). Lines of a JSONL
file that are not JSON objects (a last line cut short by a run killed or out of disk while writing
it, a `null`, garbage) and values of the wrong type are skipped, with one warning per file naming
the lines, on stderr and in the page.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpo.errors import GrpoError

from .metrics import upgrade

# A step's phases as the loop times them (runs written before advantages and the weight sync had
# their own phase show those inside scoring and the update).
PHASES = (("time/generate", "generation"), ("time/score", "scoring"), ("time/logprobs", "log-probs"),
          ("time/advantages", "advantages"), ("time/update", "update"), ("time/sync_weights", "weight sync"))


class ReportError(GrpoError):
    """Bad input (no such run, no metrics) or matplotlib missing: one clear message."""


@dataclass
class Run:
    path: Path
    label: str
    metrics: list[dict]
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    model_config: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what was skipped while reading, in words


# --------------------------------------------------------------------------------------------
# Reading runs


def number(value) -> float | None:
    """A finite real number from the data as a float, or None: strings, booleans, null, NaN,
    infinities and integers too large for a float are not numbers to plot or format."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def kind(value) -> str:
    """What a JSON value is, for a message: `null`, `a list`, `a string`..."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return names.get(type(value), "a " + type(value).__name__)


def skipped_lines(path: Path, lines: list[tuple[int, str]], total: int) -> str:
    """One warning for a file: how many lines were skipped and which (the first few, by number)."""
    shown = ", ".join(f"line {n} ({why})" for n, why in lines[:5])
    more = f", and {len(lines) - 5} more" if len(lines) > 5 else ""
    return f"{path}: skipped {len(lines)} of {total} line{'s' if total != 1 else ''}: {shown}{more}"


def read_jsonl(path: Path, warnings: list[str] | None = None, check=None) -> list[dict]:
    """The JSON objects of a JSONL file, one a line; [] when the file does not exist.

    A line that is not a JSON object, or an object that `check` finds fault with (it returns why,
    or None), is skipped and named in one warning appended to `warnings`: the rest of a run is
    still worth plotting. A last line with no newline that does not parse was cut short while being
    written (the run was killed or the disk filled), and is said so. A file that exists but cannot
    be read raises ReportError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ReportError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = data.split(b"\n")
    rows, bad, total = [], [], 0
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        total += 1
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
            last = line_no == len(lines)  # nothing after it: the file does not end with a newline
            bad.append((line_no, "cut short, the last line" if last else "not JSON"))
            continue
        why = f"{kind(row)}, not an object" if not isinstance(row, dict) else check(row) if check else None
        if why:
            bad.append((line_no, why))
            continue
        rows.append(row)
    if bad and warnings is not None:
        warnings.append(skipped_lines(path, bad, total))
    return rows


def read_json(path: Path, warnings: list[str] | None = None) -> dict:
    """A JSON object from a file; {} when the file does not exist, and {} with a warning when it
    cannot be read or is not a JSON object."""
    problem = None
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    except json.JSONDecodeError as e:
        problem = f"line {e.lineno}: not JSON ({e.msg})"
    except (ValueError, RecursionError):
        problem = "not JSON"
    else:
        if isinstance(value, dict):
            return value
        problem = f"{kind(value)}, not an object"
    if warnings is not None:
        warnings.append(f"{path}: {problem}; ignored")
    return {}


def load_run(path: Path, label: str) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    warnings: list[str] = []
    # An object without a step is no step's record: nothing to place on the axis, and no sign of damage.
    # Files written before the metric namespaces are read under today's names (metrics.upgrade).
    metrics = [upgrade(r) for r in read_jsonl(path / "metrics.jsonl", warnings, check_step) if "step" in r]
    if not metrics:
        raise ReportError(f"{path}: no metrics.jsonl with logged steps (is this a `grpo train` output_dir?)"
                          + "".join(f"; {w}" for w in warnings))
    add_wall_clock(metrics)
    # config.json in a run directory is normally the saved model's (it overwrites the trainer's);
    # the training config is kept in train_config.json.
    config = read_json(path / "train_config.json", warnings)
    model_config = read_json(path / "config.json", warnings)
    if not config and "model_type" not in model_config:
        config, model_config = model_config, {}
    summary = read_json(path / "summary.json", warnings)
    try:
        samples = read_jsonl(path / "samples.jsonl", warnings, check_step)
    except ReportError as e:  # optional: the curves do not need it
        warnings.append(f"{e}; ignored")
        samples = []
    for sample in samples:
        sample.setdefault("step", 0)
        if not isinstance(sample.get("rewards"), dict):
            sample["rewards"] = {}
    return Run(path, label, metrics, config, summary, samples, model_config, warnings)


def check_step(row: dict) -> str | None:
    """Why a row cannot be placed on the step axis, or None (a row without a step is let through)."""
    if "step" not in row or number(row["step"]) is not None:
        return None
    if kind(row["step"]) == "a number":
        return "its step is not a finite number"
    return f"its step is {kind(row['step'])}, not a number"


def add_wall_clock(metrics: list[dict]) -> None:
    """`wall_clock`: seconds of training up to each step, continuing across resumes (the trainer's
    `elapsed` restarts from zero in a resumed process)."""
    offset = previous = 0.0
    for r in metrics:
        elapsed = number(r.get("time/elapsed"))
        if elapsed is None:
            r.pop("wall_clock", None)  # derived here only: a logged value of that name is not time
            continue
        if elapsed < previous:
            offset += previous
        previous = elapsed
        r["wall_clock"] = offset + elapsed


def run_labels(paths: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (runs/beam vs runs/sample -> beam,
    sample; a/out vs b/out -> a/out, b/out)."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{l} ({i + 1})" for i, l in enumerate("/".join(p) for p in parts)]


# --------------------------------------------------------------------------------------------
# Plots


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the report needs matplotlib: pip install 'grpo[report]'") from None
    matplotlib.use("Agg")  # files only; never open a window or need a display
    from matplotlib.figure import Figure
    return Figure


def plain(text) -> str:
    """Text from a run as matplotlib draws it literally: an unescaped pair of `$` would be parsed
    as math (and a malformed formula fails the whole plot)."""
    return str(text).replace("$", r"\$")


def series(run: Run, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The (x, y) points of one metric, skipping steps where it is absent or not a finite number."""
    xs, ys = [], []
    for r in run.metrics:
        value, where = number(r.get(key)), number(r.get(x))
        if value is not None and where is not None:
            xs.append(where)
            ys.append(value)
    return xs, ys


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's debiased exponential moving average: RL curves are too noisy to read raw."""
    out, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** i))
    return out


def draw(ax, xs, ys, color, style, label, marker=False) -> None:
    if len(xs) >= 20:
        # Raw points faint, the trend on top: both honest and readable.
        ax.plot(xs, ys, color=color, linestyle=style, alpha=0.25, linewidth=1)
        ax.plot(xs, smooth(ys), color=color, linestyle=style, linewidth=1.8, label=label)
    else:
        ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.8, label=label,
                marker="o" if marker or len(xs) < 8 else None, markersize=4)


def time_axis(runs: list[Run]) -> tuple[float, str]:
    longest = max((number(r.get("wall_clock")) or 0 for run in runs for r in run.metrics), default=0)
    if longest > 2 * 3600:
        return 3600.0, "wall-clock time (h)"
    if longest > 300:
        return 60.0, "wall-clock time (min)"
    return 1.0, "wall-clock time (s)"


def line_panel(ax, runs, colors, lines, x="step", title="", ylabel="", scale=1.0, fraction=False) -> None:
    """One axes: for every run (a colour) every line (key, name, linestyle); a note when no run
    recorded any of them, so a missing metric shows as such instead of as an empty box."""
    drawn = 0
    for run, color in zip(runs, colors):
        for key, name, style in lines:
            xs, ys = series(run, key, x)
            if not xs:
                continue
            if x == "wall_clock":
                xs = [v / scale for v in xs]
            parts = [run.label] if len(runs) > 1 else []
            parts += [name] if len(lines) > 1 else []
            draw(ax, xs, ys, color, style, plain(" - ".join(parts)) or None, marker=key.startswith("eval/"))
            drawn += 1
    ax.set_title(plain(title), fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if x == "step":
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if fraction:
        # A fraction read on its full range: a flat 0 must not look like noise around 0.
        ax.set_ylim(-0.03, 1.03)
    if not drawn:
        ax.text(0.5, 0.5, "not recorded in " + ("these runs" if len(runs) > 1 else "this run"),
                ha="center", va="center", transform=ax.transAxes, color="#888", fontsize=10)
    elif any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize=7, loc="best", framealpha=0.8)


def reward_functions(runs: list[Run]) -> list[str]:
    names = []
    for run in runs:
        for r in run.metrics:
            for k in r:
                name = k[len("reward/"):-len("/mean")]
                if k.startswith("reward/") and k.endswith("/mean") and name and name not in names:
                    names.append(name)
    return names


def plot_reward(fig, runs, colors, x, scale, xlabel) -> None:
    names = reward_functions(runs)
    # The overall reward, then one panel per reward function (their scales differ).
    panels = [("reward (weighted total)", [("reward/mean", "train", "-"), ("eval/reward", "held-out", "--")])]
    panels += [(f"reward: {n}", [(f"reward/{n}/mean", n, "-")]) for n in names]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig.set_size_inches(4.2 * cols, 3.2 * rows)
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        line_panel(ax, runs, colors, lines, x, title, "mean reward", scale)
        ax.set_xlabel(xlabel, fontsize=9)


def plot_time_split(fig, runs, colors, x, scale, xlabel) -> None:
    """Where a step's time goes: mean seconds per phase for each run (stacked), and per step."""
    fig.set_size_inches(11, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    phase_colors = ["#4c72b0", "#dd8452", "#8172b3", "#c44e52", "#55a868", "#937860"]
    left = [0.0] * len(runs)
    for (key, name), color in zip(PHASES, phase_colors):
        means = []
        for run in runs:
            _, ys = series(run, key)
            means.append(sum(ys) / len(ys) if ys else 0.0)
        ax.barh(range(len(runs)), means, left=left, color=color, label=name, height=0.4)
        left = [a + b for a, b in zip(left, means)]
    ax.set_yticks(range(len(runs)), [plain(r.label) for r in runs], fontsize=8)
    ax.set_xlabel("mean seconds per step", fontsize=9)
    ax.set_title("time per step by phase", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(PHASES), frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_ylim(len(runs) - 0.5, -0.5)
    ax.tick_params(labelsize=8)

    ax = fig.add_subplot(1, 2, 2)
    if len(runs) == 1:
        xs, stack = None, []
        for key, _ in PHASES:
            px, ys = series(runs[0], key)
            xs = xs or px
            stack.append(ys if len(ys) == len(xs) else [0.0] * len(xs))
        if xs:
            ax.stackplot(xs, *stack, labels=[n for _, n in PHASES], colors=phase_colors, alpha=0.85)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(PHASES),
                      frameon=False)
        ax.set_title("seconds per step, by phase", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("seconds", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        line_panel(ax, runs, colors, [("time/step", "step", "-")], "step", "seconds per step", "seconds")
        ax.set_xlabel("step", fontsize=9)


def simple(title, ylabel, lines, x="step", fraction=False):
    """A plot of one panel: `lines` against step (or wall-clock time)."""
    def plot(fig, runs, colors, _x, scale, xlabel):
        fig.set_size_inches(6, 3.6)
        ax = fig.add_subplot(1, 1, 1)
        line_panel(ax, runs, colors, lines, x, title, ylabel, scale, fraction)
        ax.set_xlabel(xlabel if x == "wall_clock" else "step", fontsize=9)
    return plot


ACCURACY = [("reward/accuracy", "train", "-"), ("eval/accuracy", "held-out", "--")]
# (file stem, caption, plot function, x axis). The order is the page's order.
PLOTS = [
    ("reward_vs_step", "Reward against step, overall and per reward function",
     lambda *a: plot_reward(*a), "step"),
    ("reward_vs_time", "Reward against wall-clock time", lambda *a: plot_reward(*a), "wall_clock"),
    ("accuracy_vs_step", "Accuracy (train completions, greedy held-out) against step",
     simple("accuracy", "fraction correct", ACCURACY, fraction=True), "step"),
    ("accuracy_vs_time", "Accuracy against wall-clock time",
     simple("accuracy", "fraction correct", ACCURACY, "wall_clock", fraction=True), "wall_clock"),
    ("kl", "KL divergence to the reference policy", simple("KL to reference", "KL", [("loss/kl", "kl", "-")]), "step"),
    ("entropy", "Token entropy of the policy", simple("entropy", "nats / token", [("loss/entropy", "entropy", "-")]),
     "step"),
    ("completion_length", "Completion length in tokens, mean and max",
     simple("completion length", "tokens", [("rollout/completion_length_mean", "mean", "-"),
                                             ("rollout/completion_length_max", "max", "--")]), "step"),
    ("truncated_frac", "Fraction of completions cut at max_completion_length",
     simple("truncated fraction", "fraction", [("rollout/truncated_frac", "truncated", "-")], fraction=True), "step"),
    ("clip_fraction", "Fraction of tokens whose ratio was clipped, below and above",
     simple("clip fraction", "fraction of tokens", [("loss/clip_frac_low", "low (1 - eps_low)", "-"),
                                                     ("loss/clip_frac_high", "high (1 + eps_high)", "--")]), "step"),
    ("zero_variance_frac", "Fraction of groups whose rewards were all equal (no learning signal)",
     simple("zero-variance groups", "fraction of groups", [("rollout/zero_variance_frac", "zero variance", "-")],
            fraction=True), "step"),
    ("time_per_step", "Time per step split into generation, scoring, log-probs and update",
     lambda *a: plot_time_split(*a), "step"),
]


def run_colors(n: int) -> list[str]:
    """One colour per run as `#rrggbb`: the page's swatches use them as CSS, and matplotlib's
    palette may hold RGB tuples, which CSS does not read."""
    import matplotlib
    from matplotlib.colors import to_hex
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return [to_hex(palette[i % len(palette)]) for i in range(n)]


def render_plots(runs: list[Run], plot_dir: Path) -> list[tuple[str, str, bytes]]:
    """Every plot as PNG bytes, also written to plot_dir: [(stem, caption, png)]."""
    Figure = require_matplotlib()
    colors = run_colors(len(runs))
    scale, time_label = time_axis(runs)
    plot_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for stem, caption, plot, x in PLOTS:
        fig = Figure(dpi=100)
        plot(fig, runs, colors, x, scale, time_label if x == "wall_clock" else "step")
        fig.tight_layout()
        path = plot_dir / f"{stem}.png"
        fig.savefig(path, format="png", dpi=100)
        out.append((stem, caption, path.read_bytes()))
    return out


# --------------------------------------------------------------------------------------------
# Health checks: signs of a run that runs without error but does not learn, said in words


def tail(run: Run, key: str, fraction: float = 0.25) -> list[float]:
    _, ys = series(run, key)
    return ys[-max(1, int(len(ys) * fraction)):] if ys else []


def checks(run: Run) -> list[str]:
    notes = []
    zero = tail(run, "rollout/zero_variance_frac")
    if zero and sum(zero) / len(zero) >= 0.8:
        notes.append(f"{sum(zero) / len(zero):.0%} of groups had equal rewards late in training: almost no "
                     "learning signal (sample at temperature ~1, use larger groups or a denser reward).")
    truncated = tail(run, "rollout/truncated_frac")
    if truncated and sum(truncated) / len(truncated) >= 0.5:
        notes.append(f"{sum(truncated) / len(truncated):.0%} of completions hit max_completion_length late in "
                     "training: raise it or reward shorter answers.")
    kl = tail(run, "loss/kl")
    if kl and max(kl) > 1.0:
        notes.append(f"KL to the reference reached {max(kl):.2f}: the policy is drifting far (lower the "
                     "learning rate or raise beta).")
    last = [s for s in run.samples if s["step"] == max((x["step"] for x in run.samples), default=0)]
    if len(last) >= 3 and len({str(s.get("completion")) for s in last}) == 1:
        notes.append("every sample completion of the last sampled step is the same string: the policy may "
                     "have collapsed.")
    return notes


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 28px 60px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 34px 0 10px;
border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 8px; }
.meta { color: #666; font-size: 13px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid #dde; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef0f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; }
.plot { background: #fff; border: 1px solid #dde; border-radius: 6px; padding: 10px; margin: 0; }
.plot.wide { grid-column: 1 / -1; }
.plot img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; margin-top: 6px; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all;
        max-width: 460px; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 6px 10px; margin: 6px 0; font-size: 14px; }
.ok { color: #2a7a2a; font-size: 14px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; font-size: 14px; }
.grid { columns: 3 300px; column-gap: 28px; background: #fff; border: 1px solid #dde; padding: 8px 12px;
        font-size: 12.5px; font-family: ui-monospace, Menlo, Consolas, monospace; }
.grid div { break-inside: avoid; padding: 1px 0; overflow-wrap: anywhere; } .k { color: #666; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def key_value_table(d: dict) -> str:
    if not d:
        return "<p class='meta'>(not found)</p>"
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in flatten(d).items())
    return f"<table>{rows}</table>"


def key_value_grid(d: dict) -> str:
    """A long config as compact key/value pairs flowing in columns."""
    if not d:
        return "<p class='meta'>(not found)</p>"
    items = "".join(f"<div><span class='k'>{esc(k)}</span> {esc(fmt(v))}</div>" for k, v in flatten(d).items())
    return f"<div class='grid'>{items}</div>"


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested summaries (eval_before: {...}) as dotted keys, one row each."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def num(value, spec: str) -> str:
    """A number from a run formatted for a cell, the escaped text of anything else, `-` for none."""
    x = number(value)
    if x is not None:
        return format(x, spec)
    return "-" if value is None else esc(fmt(value))


def accuracy_in_summary(summary: dict, key: str, old_key: str) -> float | None:
    """Held-out accuracy before/after training: summary[key]["eval_accuracy"], or summary[old_key]
    as older runs wrote it."""
    nested = summary.get(key)
    if isinstance(nested, dict) and "eval_accuracy" in nested:
        return number(nested["eval_accuracy"])
    return number(summary.get(old_key))


def last_value(run: Run, key: str):
    _, ys = series(run, key)
    return ys[-1] if ys else None


def overview(runs: list[Run], colors: list[str]) -> str:
    head = ("<tr><th>run</th><th>steps logged</th><th>last step</th><th>reward first &rarr; last</th>"
            "<th>accuracy (last)</th><th>held-out accuracy before &rarr; after</th><th>KL (last)</th>"
            "<th>training time</th></tr>")
    rows = []
    for run, color in zip(runs, colors):
        _, reward = series(run, "reward/mean")
        accuracy = last_value(run, "reward/accuracy")
        before = accuracy_in_summary(run.summary, "eval_before", "accuracy_before")
        after = accuracy_in_summary(run.summary, "eval_after", "accuracy_after")
        seconds = number(run.summary.get("train_seconds", run.metrics[-1].get("wall_clock")))
        kl = last_value(run, "loss/kl")
        total = run.config.get("max_steps", "?")
        cells = [f"<span class='swatch' style='background:{esc(color)}'></span>{esc(run.label)}",
                 str(len(run.metrics)), f"{esc(run.metrics[-1]['step'])} / {esc(fmt(total))}",
                 f"{reward[0]:.3f} &rarr; {reward[-1]:.3f}" if reward else "-",
                 f"{accuracy:.1%}" if accuracy is not None else "-",
                 f"{before:.1%} &rarr; {after:.1%}" if before is not None and after is not None else "-",
                 f"{kl:.4f}" if kl is not None else "-",
                 f"{seconds:.0f} s" if seconds is not None else "-"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def samples_html(samples: list[dict]) -> str:
    if not samples:
        return "<p class='meta'>(no samples.jsonl: set samples_steps to log sample completions)</p>"
    steps = sorted({s.get("step", 0) for s in samples})
    shown = [steps[0]] + ([steps[-1]] if steps[-1] != steps[0] else [])
    parts = []
    for step in shown:
        rows = [s for s in samples if s.get("step") == step]
        names = list(dict.fromkeys(k for s in rows for k in s["rewards"]))
        head = ("<tr><th>#</th><th>prompt</th><th>completion</th><th>reward</th><th>advantage</th>"
                + "".join(f"<th>{esc(n)}</th>" for n in names) + "<th>tokens</th></tr>")
        body = []
        for s in rows:
            length = fmt(s["length"]) if "length" in s else "-"
            if "length" in s and s.get("truncated") is True:
                length += " (truncated)"
            body.append(
                f"<tr><td>{esc(fmt(s.get('index', '')))}</td><td class='text'>{esc(fmt(s.get('prompt', '')))}</td>"
                f"<td class='text'>{esc(fmt(s.get('completion', '')))}</td>"
                f"<td class='num'>{num(s.get('reward', 0), '.3f')}</td>"
                f"<td class='num'>{num(s.get('advantage', 0), '+.3f')}</td>"
                + "".join(f"<td class='num'>{num(s['rewards'].get(n, 0), '.3f')}</td>" for n in names)
                + f"<td class='num'>{esc(length)}</td></tr>")
        label = "first" if step == steps[0] else "last"
        parts.append(f"<h3>Samples at step {esc(fmt(step))} ({label} sampled step)</h3>"
                     f"<table>{head}{''.join(body)}</table>")
    return "".join(parts)


def render_html(runs: list[Run], plots: list[tuple[str, str, bytes]], colors: list[str]) -> str:
    title = "GRPO report: " + ", ".join(r.label for r in runs)
    figures = []
    for stem, caption, png in plots:
        data = base64.b64encode(png).decode("ascii")
        wide = " wide" if stem.startswith("reward") or stem == "time_per_step" else ""
        figures.append(f"<figure class='plot{wide}' id='{stem}'><img src='data:image/png;base64,{data}' "
                       f"alt='{esc(caption)}'><figcaption>{esc(caption)} &middot; plots/{stem}.png"
                       f"</figcaption></figure>")
    health, unread = [], []
    for run in runs:
        prefix = f"<b>{esc(run.label)}</b>: " if len(runs) > 1 else ""
        health += [f"<div class='warn'>{prefix}{esc(n)}</div>" for n in checks(run)]
        unread += [f"<div class='warn'>{prefix}{esc(w)}</div>" for w in run.warnings]
    if not health:
        health = ["<p class='ok'>No warning signs found (reward variance, truncation, KL, collapse).</p>"]
    if unread:
        # Said on the page too: whoever reads the report later did not see the command's stderr.
        health += ["<h3>What could not be read from the run's files</h3>"] + unread
    details = []
    for run in runs:
        details.append(
            f"<h2>Run {esc(run.label)}</h2><p class='meta'>{esc(run.path)}</p>"
            f"<h3>Summary (summary.json)</h3>{key_value_table(run.summary)}"
            f"<h3>Training config</h3>{key_value_grid(run.config)}"
            + (f"<details><summary>Model config (config.json)</summary>{key_value_grid(run.model_config)}"
               "</details>" if run.model_config else "")
            + samples_html(run.samples))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>GRPO training report</h1>
<p class="meta">{len(runs)} run{'s' if len(runs) > 1 else ''} &middot; written {esc(time.strftime('%Y-%m-%d %H:%M'))}
 by <code>grpo report</code></p>
{overview(runs, colors)}
<h2>Checks</h2>{''.join(health)}
<h2>Curves</h2>
<div class="plots">{''.join(figures)}</div>
{''.join(details)}
</main></body></html>
"""


# --------------------------------------------------------------------------------------------
# Entry points


def write_report(run_dirs: list[Path], output: Path | None = None, warn=None) -> Path:
    """Write report.html (default: in the first run directory) and its plots as PNG files in
    plots/ beside it; return the path of report.html. Raises ReportError on bad input or when
    matplotlib is missing. `warn` is called with each warning about a run's files, one per file
    naming the lines skipped and why (default: printed to stderr)."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    if warn is None:
        def warn(message):
            print(f"grpo report: warning: {message}", file=sys.stderr)
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, run_labels(paths))]
    for run in runs:
        for message in run.warnings:
            warn(message)
    output = Path(output) if output is not None else paths[0] / "report.html"
    if output.is_dir() or output.suffix.lower() not in (".html", ".htm"):
        output = output / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    plots = render_plots(runs, output.parent / "plots")
    output.write_text(render_html(runs, plots, run_colors(len(runs))), encoding="utf-8")
    return output


def cli_main(args) -> int:
    try:
        path = write_report(args.run_dirs, args.output)
    except ReportError as e:
        print(f"grpo report: error: {e}", file=sys.stderr)
        return 2
    print(f"report written to {path} (plots in {path.parent / 'plots'})")
    return 0
