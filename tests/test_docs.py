"""The user's manual: the README reads as one, and the docs site builds without a warning.

`mkdocs build --strict` fails on a broken link or anchor and on a page missing from the nav
(mkdocs.yml's `validation`); the configuration page is generated from the config docstrings by
docs/hooks.py, so every key must appear in the built page.
"""

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.config import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# A commit hash: 7 to 40 hex digits with at least one letter and one digit ("1048576" is a number).
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
TIMESTAMP = re.compile(r"\bUTC\b|\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}:\d{2}(:\d{2})?\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def page_text(site: Path, name: str) -> str:
    raw = (site / name / "index.html").read_text()
    return html.unescape(re.sub(r"<[^>]+>", "", raw))


def test_the_site_builds_strictly(site):
    assert (site / "index.html").is_file()


def test_every_markdown_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {p.name for p in DOCS.glob("*.md")}


def test_the_configuration_page_has_every_key_of_every_command(site):
    text = page_text(site, "configuration")
    assert "<!-- config:" not in (site / "configuration" / "index.html").read_text()
    for family, (cls, command) in COMMANDS.items():
        assert f"# {command}" in text, family
        missing = [f.name for f in dataclasses.fields(cls) if not re.search(rf"^{f.name}:", text, re.MULTILINE)]
        assert not missing, f"{cls.__name__}: {missing}"


def test_the_configuration_page_marks_every_command_family():
    page = (DOCS / "configuration.md").read_text()
    assert set(re.findall(r"<!-- config:([a-z-]+) -->", page)) == set(COMMANDS)


def readme_lines() -> list[str]:
    return README.read_text().splitlines()


def test_the_readme_is_short():
    assert len(readme_lines()) <= 250


def test_the_readme_starts_with_the_two_commands():
    lines = readme_lines()
    assert lines[0].startswith("# ")
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    prose = [line for line in lines[1:fence] if line.strip()]
    assert len(prose) <= 3, "at most a short paragraph before the commands"
    block = lines[fence + 1:lines.index("```", fence + 1)]
    commands = [line.split("#")[0].strip() for line in block]
    assert commands[:2] == ["python3 dev.py demo", "python3 dev.py test"]


def test_the_readme_is_no_lab_notebook():
    text = README.read_text()
    assert not TIMESTAMP.search(text), TIMESTAMP.search(text)
    assert not HASH.search(text), HASH.search(text)
    assert not re.search(r"\bissues?\b", text, re.IGNORECASE)
    first_person = re.compile(r"\bI\b|(?i:\b(we|our|ours|us)\b)")
    assert not first_person.search(text), first_person.search(text)


def test_every_relative_link_in_the_readme_exists():
    targets = [t for t in LINK.findall(README.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing
