"""Dataset rows: local JSONL, CSV or Parquet files read as dicts, each remembering its line.

Every column of a row travels with it to the reward functions (e.g. `answer` for a verifier).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from grpo.errors import DataError


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read every row of a JSONL, CSV or Parquet file as a dict. Each row remembers its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".jsonl", ".json"):
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                rows.append({**row, "_line": lineno})
    elif suffix == ".csv":
        with path.open(newline="") as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                rows.append({**row, "_line": lineno})
    elif suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'grpo[parquet]'") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            rows.append({**row, "_line": i})
    else:
        raise DataError(f"{path}: unknown dataset format {suffix!r}; expected .jsonl, .csv or .parquet")
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return rows


def require_columns(rows: list[dict], columns: list[str], path: str | Path) -> None:
    """Stop at the first row missing a column the run needs."""
    for row in rows:
        for col in columns:
            if col not in row or row[col] is None:
                have = sorted(k for k in row if k != "_line")
                raise DataError(f"{path}:{row.get('_line', '?')}: missing column {col!r} "
                                f"(the row has {have})")
