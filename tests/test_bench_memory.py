"""The benchmarks' peak memory belongs to the worker process alone, not to the driver that started it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_worker_reports_its_own_peak_not_its_parents():
    # This process holds torch and a 256 MiB buffer; a worker it starts allocates almost nothing.
    import torch

    held = torch.ones(64 * 2**20)  # 256 MiB, touched
    code = "from bench.common import peak_rss_mib; print(peak_rss_mib())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    child = float(out.stdout.strip())
    assert 1 < child < 128, child  # Python and the stdlib only; ru_maxrss would read this process's memory
    assert held.sum() > 0
