"""`grpo report` on a real short run: every plot, valid PNGs, a self-contained HTML page that renders
in headless Chromium with no broken image, several runs overlaid, and the CLI's exit statuses."""

import json
import re
import shutil
import struct
import subprocess

import pytest

from conftest import chromium
from grpo.cli import main
from grpo.config import TrainConfig, build
from grpo.observe.report import PLOTS, add_wall_clock, load_run, run_labels, write_report
from grpo.observe.tracking import SAMPLE_FIELDS
from grpo.train.loop import train

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]

# Appended to a copy of the report (the report itself has no scripts): once every image has loaded
# or failed, it writes which ones have no pixels into the DOM that --dump-dom prints.
IMAGE_CHECK = """<script>window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                   .map(function (i) { return i.alt || i.src.slice(0, 40); });
  var out = document.createElement('pre'); out.id = 'image-check';
  out.textContent = JSON.stringify({total: imgs.length, broken: broken});
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, addition_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sample"
    cfg = build(TrainConfig, dict(
        model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(out),
        eval_dataset=addition_files["heldout"], eval_max_prompts=8, eval_steps=2,
        rewards=[{"function": "exact_answer"}, {"function": "answer_distance"}], prompts_per_step=2,
        group_size=4, max_completion_length=4, max_steps=4, learning_rate=1e-3, max_prompt_length=16,
        samples_steps=1, report_to=[]))
    train(cfg, quiet=True)
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report([run_dir])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_has_every_plot_as_a_valid_png(report):
    assert report.name == "report.html" and report.parent.name == "sample"
    html = report.read_text()
    for stem, caption, _, _ in PLOTS:
        png = report.parent / "plots" / f"{stem}.png"
        data = png.read_bytes()
        width, height = png_size(data)
        assert width >= 400 and height >= 250 and len(data) > 8000, stem
        assert f"id='{stem}'" in html and f"plots/{stem}.png" in html
    from PIL import Image
    for png in (report.parent / "plots").glob("*.png"):
        Image.open(png).verify()
    # Self-contained: images inline, no scripts, nothing loaded from anywhere else.
    assert html.count("src='data:image/png;base64,") == len(PLOTS)
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", html)


def test_report_lists_every_metric_plot_and_the_run_details(report, run_dir):
    stems = {stem for stem, *_ in PLOTS}
    assert stems == {"reward_vs_step", "reward_vs_time", "accuracy_vs_step", "accuracy_vs_time", "kl",
                     "entropy", "completion_length", "truncated_frac", "clip_fraction", "zero_variance_frac",
                     "time_per_step"}
    html = report.read_text()
    # The config, the final summary, and the samples of the first and last sampled steps.
    assert "Training config" in html and "group_size" in html and "exact_answer" in html
    assert "Summary (summary.json)" in html and "eval_after.eval_accuracy" in html
    assert "Samples at step 1 (first sampled step)" in html and "Samples at step 4 (last sampled step)" in html
    # A run the trainer wrote reads without a skipped line; the run's swatch is a colour CSS reads.
    assert load_run(run_dir, "sample").warnings == [] and "could not be read" not in html
    assert re.search(r"class='swatch' style='background:#[0-9a-f]{6}'", html)


def test_samples_jsonl_rows_from_a_real_run(run_dir):
    rows = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
    assert len(rows) == 4 * 4  # num_samples (4) per step
    for r in rows:
        assert set(r) == set(SAMPLE_FIELDS)
        assert set(r["rewards"]) == {"exact_answer", "answer_distance"}
        assert isinstance(r["prompt"], str) and isinstance(r["completion"], str)
        assert abs(r["reward"] - sum(r["rewards"].values())) < 1e-6  # weights are 1
        assert 0 <= r["length"] <= 4 and isinstance(r["truncated"], bool)


def test_report_renders_in_headless_chromium_without_broken_images(report, tmp_path):
    browser = chromium()
    shot = tmp_path / "report.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}",
                    "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
                   check=True, capture_output=True, timeout=60)
    width, height = png_size(shot.read_bytes())
    assert (width, height) == (1280, 2400) and shot.stat().st_size > 50_000  # a page, not a blank

    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                          "--dump-dom", checked.as_uri()],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom)
    assert found, dom[-500:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result == {"total": len(PLOTS), "broken": []}


def test_several_runs_are_overlaid(run_dir, tmp_path):
    # A second run: the same files under another name (what matters is two labelled runs).
    other = tmp_path / "beam"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("*.safetensors", "plots", "report.html"))
    out = write_report([run_dir, other], tmp_path / "compare" / "report.html")
    html = out.read_text()
    assert "2 runs" in html and "Run sample" in html and "Run beam" in html
    assert len(list((tmp_path / "compare" / "plots").glob("*.png"))) == len(PLOTS)


def test_cli_report(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--output", str(tmp_path / "out.html")]) == 0
    assert (tmp_path / "out.html").exists() and "out.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_wall_clock_continues_across_a_resume():
    metrics = [{"step": 1, "time/elapsed": 1.0}, {"step": 2, "time/elapsed": 2.0}, {"step": 3, "time/elapsed": 0.5},
               {"step": 4, "time/elapsed": 1.5}]
    add_wall_clock(metrics)
    assert [m["wall_clock"] for m in metrics] == [1.0, 2.0, 2.5, 3.5]


def test_run_labels_are_the_shortest_distinct_suffixes(tmp_path):
    assert run_labels([tmp_path / "beam", tmp_path / "sample"]) == ["beam", "sample"]
    assert run_labels([tmp_path / "a" / "out", tmp_path / "b" / "out"]) == ["a/out", "b/out"]
