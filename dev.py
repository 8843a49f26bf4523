#!/usr/bin/env python3
"""Set up `.venv` from nothing but Python, then run the demo or the test suite.

    python3 dev.py demo [grpo demo args...]   # install, then the built-in demo
    python3 dev.py test [pytest args...]      # install with test extras, then the whole suite

torch is pinned to 2.13.0 because that CPU build is what these machines carry locally; an unpinned
torch pulls a several-GB CUDA build. On a GPU machine set GRPO_TORCH (e.g. GRPO_TORCH="torch")
to let pip choose a CUDA build instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = os.environ.get("GRPO_TORCH", "torch==2.13.0")
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def run(*cmd, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip_quiet() -> list[str]:
    return ["-q", "--disable-pip-version-check"]


def setup(extras: str) -> None:
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    # torch first and pinned, so nothing later lets pip choose a different build.
    run(PY, "-m", "pip", "install", *pip_quiet(), TORCH)
    run(PY, "-m", "pip", "install", *pip_quiet(), "-e", f"{ROOT}[{extras}]" if extras else str(ROOT))


def install_chromium() -> None:
    """Headless Chromium for the report tests, from Debian's packages where we are root on Debian."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    run("apt-get", "update", "-qq")
    run("apt-get", "install", "-y", "-qq", "chromium", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    what, rest = sys.argv[1], sys.argv[2:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if what == "demo":
        setup("report")
        run(BIN / "grpo", "demo", *rest, env=env)
    elif what == "setup":
        setup("test")
    else:
        setup("test")
        install_chromium()
        run(PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *rest, cwd=ROOT, env=env)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
