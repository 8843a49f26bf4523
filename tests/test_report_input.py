"""`grpo report` on run directories it did not write itself: every string from a run is text in the
page (never markup, never a formula in a plot), and files cut short or holding lines that are not
JSON objects are read around with one warning per file naming the lines, never a traceback."""

import json
import subprocess
from html.parser import HTMLParser

import pytest

from conftest import chromium
from grpo.cli import main
from grpo.errors import GrpoError
from grpo.observe.report import ReportError, load_run, write_report

# Runs only if some of it reaches the page as markup: the title then holds the joined word, which
# appears nowhere in the files (they hold 'pwn'+'ed').
MARKER = "pwned"
SET_TITLE = "document.title='pwn'+'ed'"
HOSTILE = (f"</title></style></td></table>'\"><script>{SET_TITLE}</script>"
           f"<img src=x onerror=\"{SET_TITLE}\"><svg onload={SET_TITLE}>\u2028&amp;")
# A directory name holds no '/', so no closing tags.
HOSTILE_DIR = f"run'\"><img src=x onerror={SET_TITLE}>"
# An even number of '$' makes matplotlib parse a label as math; this formula does not parse.
FORMULA = r"$\frac{$"

# The tags and attributes the report itself writes; anything else came from data.
REPORT_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "p", "code", "table",
               "tr", "th", "td", "span", "b", "div", "figure", "img", "figcaption", "details", "summary"}
REPORT_ATTRS = {"lang", "charset", "name", "content", "class", "style", "id", "src", "alt"}


def write_lines(path, lines, end="\n"):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines[:-1])
                     + (lines[-1] if isinstance(lines[-1], bytes) else lines[-1].encode()) + end.encode())


def hostile_run(root):
    """A run directory with a hostile string in every field the report reads."""
    run = root / HOSTILE_DIR
    run.mkdir(parents=True)
    metrics = []
    for step in range(1, 5):
        metrics.append({"step": step, "elapsed": float(step), "reward_mean": 0.1 * step, "accuracy": 0.2,
                        "kl": HOSTILE, "entropy": HOSTILE, "zero_variance_frac": 0.5,
                        f"rewards/{HOSTILE}/mean": 0.3, f"rewards/{FORMULA}/mean": 0.4,
                        HOSTILE: HOSTILE, "wall_clock": HOSTILE, "seconds_generate": 0.1})
    metrics.append({"step": HOSTILE, "reward_mean": 1.0})  # last, where the step is printed
    write_lines(run / "metrics.jsonl", [json.dumps(m) for m in metrics])
    (run / "train_config.json").write_text(json.dumps(
        {"max_steps": HOSTILE, HOSTILE: HOSTILE, "rewards": [{"function": HOSTILE}], "nested": {HOSTILE: [HOSTILE]}}))
    (run / "config.json").write_text(json.dumps({"model_type": HOSTILE, HOSTILE: HOSTILE}))
    (run / "summary.json").write_text(json.dumps(
        {"eval_before": {"eval_accuracy": HOSTILE}, "eval_after": {"eval_accuracy": 0.5}, "train_seconds": HOSTILE,
         HOSTILE: {HOSTILE: HOSTILE}}))
    samples = [{"step": step, "index": HOSTILE, "group": HOSTILE, "prompt": HOSTILE, "completion": HOSTILE + str(i),
                "reward": HOSTILE, "advantage": HOSTILE, "rewards": {HOSTILE: HOSTILE, FORMULA: 1.0},
                "length": HOSTILE, "truncated": HOSTILE}
               for step in (1, 4) for i in range(3)]
    samples.append({"step": HOSTILE, "prompt": HOSTILE})
    samples.append({"step": 4, "rewards": HOSTILE, "completion": [HOSTILE]})
    write_lines(run / "samples.jsonl", [json.dumps(s) for s in samples])
    return run


class Markup(HTMLParser):
    """The tags, attributes and text of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, name, value) for name, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    run = hostile_run(tmp_path_factory.mktemp("hostile"))
    warnings = []
    return write_report([run], warn=warnings.append), warnings


def test_every_string_from_a_run_is_text_in_the_page(hostile_report):
    report, warnings = hostile_report
    page = report.read_text()
    markup = Markup()
    markup.feed(page)
    assert set(markup.tags) <= REPORT_TAGS, set(markup.tags) - REPORT_TAGS
    assert {name for _, name, _ in markup.attrs} <= REPORT_ATTRS
    assert all(value.startswith("data:image/png;base64,") for tag, name, value in markup.attrs if name == "src")
    assert all(value.startswith("background:#") and "<" not in value and "'" not in value
               for _, name, value in markup.attrs if name == "style")
    assert "<script" not in page.lower() and "<svg" not in page.lower() and MARKER not in page
    text = "".join(markup.text)
    # Shown as written: the run's name, its config, model config, summary, sample texts, reward names.
    assert text.count(HOSTILE) >= 10 and HOSTILE_DIR in text
    assert f"GRPO report: {HOSTILE_DIR}" in text
    # The last row's step is not a number: it is left out, and said so.
    assert any("metrics.jsonl: skipped 1 of 5 lines: line 5 (its step is a string, not a number)" in w
               for w in warnings)
    assert "4 / " + HOSTILE in text  # the last numeric step, out of the config's (hostile) max_steps


def test_plots_with_dollar_signs_in_names_are_drawn(hostile_report):
    report, _ = hostile_report
    # A reward named like a broken formula gets its own panel instead of failing the plot.
    assert (report.parent / "plots" / "reward_vs_step.png").stat().st_size > 8000
    run = load_run(report.parent, "run")
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    assert all("wall_clock" not in m or isinstance(m["wall_clock"], float) for m in run.metrics)


# Appended to a copy of the report: proof that this browser runs scripts and error handlers here,
# so a payload that did not set the title was not run (rather than not given the chance).
CONTROL = ("<script>document.body.setAttribute('data-script', 'r' + 'an');</script>"
           "<img src=missing.png onerror=\"document.body.setAttribute('data-onerror', 'r' + 'an')\">")


def test_hostile_report_runs_nothing_in_headless_chromium(hostile_report, tmp_path):
    report, _ = hostile_report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom"]
    checked = report.parent / "checked.html"
    checked.write_text(report.read_text().replace("</body>", CONTROL + "</body>"))
    dom = subprocess.run([chromium(), *flags, checked.as_uri()], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    assert 'data-script="ran"' in dom and 'data-onerror="ran"' in dom, dom[:300]
    assert MARKER not in dom
    title = dom[dom.index("<title>") + 7:dom.index("</title>")]
    assert title.startswith("GRPO report: run") and MARKER not in title


# --------------------------------------------------------------------------------------------
# Files cut short or holding lines that are not JSON objects

STEP = {"reward_mean": 0.5, "accuracy": 0.25, "kl": 0.01, "elapsed": 1.0}


def plain_run(root, metrics_lines, end="\n"):
    run = root / "run"
    run.mkdir()
    write_lines(run / "metrics.jsonl", metrics_lines, end)
    return run


def test_a_last_line_cut_short_is_skipped_and_said(tmp_path, capsys):
    lines = [json.dumps({"step": s, **STEP}) for s in (1, 2, 3)] + ['{"step": 4, "reward_me']
    run = plain_run(tmp_path, lines, end="")  # the disk filled in the middle of the last line
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"grpo report: warning: {run / 'metrics.jsonl'}: skipped 1 of 4 lines: "
                                "line 4 (cut short, the last line)"]
    assert [m["step"] for m in load_run(run, "run").metrics] == [1, 2, 3]
    page = (run / "report.html").read_text()
    assert "cut short, the last line" in page  # said on the page as well


def test_lines_that_are_not_objects_are_skipped_with_one_warning_naming_them(tmp_path, capsys):
    lines = [json.dumps({"step": 1, **STEP}), "null", "[1, 2]", '"text"', "garbage {", b"\xff\xfe not utf-8",
             json.dumps({"step": 2, **STEP}), "", "3", json.dumps({"step": 3, **STEP}), "[" * 100_000,
             json.dumps({"no step": True})]
    run = plain_run(tmp_path, lines)
    (run / "samples.jsonl").write_text('null\n{"step": 1, "prompt": "p", "completion": "c", "reward": 1.0}\n'
                                       '{"step": 1, "prompt"')
    (run / "train_config.json").write_text('{"max_steps": 3,\n "group_size": ')
    (run / "summary.json").write_text("null")
    (run / "config.json").write_text("[]")
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err == [
        f"grpo report: warning: {run / 'metrics.jsonl'}: skipped 7 of 11 lines: line 2 (null, not an object), "
        "line 3 (a list, not an object), line 4 (a string, not an object), line 5 (not JSON), "
        "line 6 (not JSON), and 2 more",
        f"grpo report: warning: {run / 'train_config.json'}: line 2: not JSON (Expecting value); ignored",
        f"grpo report: warning: {run / 'config.json'}: a list, not an object; ignored",
        f"grpo report: warning: {run / 'summary.json'}: null, not an object; ignored",
        f"grpo report: warning: {run / 'samples.jsonl'}: skipped 2 of 3 lines: line 1 (null, not an object), "
        "line 3 (cut short, the last line)"]
    loaded = load_run(run, "run")
    assert [m["step"] for m in loaded.metrics] == [1, 2, 3] and len(loaded.samples) == 1
    assert loaded.config == {} and loaded.summary == {}


def test_a_run_with_no_readable_step_is_one_error_line(tmp_path, capsys):
    run = plain_run(tmp_path, ["null", "garbage", '{"step": "one"}'])
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("grpo report: error: ")
    assert "no metrics.jsonl with logged steps" in err[0]
    assert "line 1 (null, not an object)" in err[0] and "line 3 (its step is a string, not a number)" in err[0]
    assert not (run / "report.html").exists()


def test_report_error_is_an_input_error():
    assert issubclass(ReportError, GrpoError)
    with pytest.raises(GrpoError, match="give at least one run directory"):
        write_report([])


def test_an_unreadable_metrics_file_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)  # not a file
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "metrics.jsonl: cannot be read" in err[0]


def test_an_old_run_directory_still_loads(tmp_path, capsys):
    # As older trainers wrote it: the accuracies at the top of summary.json, the trainer's config in
    # config.json (no train_config.json), no samples.
    run = plain_run(tmp_path, [json.dumps({"step": s, **STEP, "rewards/exact/mean": 0.5}) for s in (1, 2)])
    (run / "config.json").write_text(json.dumps({"max_steps": 2, "group_size": 4}))
    (run / "summary.json").write_text(json.dumps({"accuracy_before": 0.25, "accuracy_after": 0.5,
                                                  "train_seconds": 12.0}))
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().err == ""
    page = (run / "report.html").read_text()
    assert "25.0% &rarr; 50.0%" in page and "2 / 2" in page and "12 s" in page
