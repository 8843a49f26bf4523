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
        for lineno, line in enumerate(_text_lines(path), 1):
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
        reader = csv.DictReader(_text_lines(path, keepends=True))
        end = 1 if reader.fieldnames else 0  # the header's line
        for row in reader:  # a row starts on the line after the previous one ended
            rows.append({**row, "_line": end + 1})
            end = reader.line_num
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


def _text_lines(path: Path, keepends: bool = False) -> list[str]:
    """The file's lines as text; a line that is not UTF-8 stops with its line and column."""
    lines = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        try:
            lines.append(raw.decode("utf-8") if keepends else raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            f"save the file as UTF-8") from None
    return lines


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a dataset file's bytes: a resumed run checks it is reading the same data."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def where(label: str, row: dict) -> str:
    """A row's place for a message: `file:line`, or `label row N` where the source has no lines
    (rows read through `datasets`, or given from Python, remember `_row`)."""
    if "_line" in row:
        return f"{label}:{row['_line']}"
    if "_row" in row:
        return f"{label} row {row['_row']}"
    return f"{label}:?"


def require_columns(rows: list[dict], columns: list[str], path: str | Path) -> None:
    """Stop at the first row missing a column the run needs."""
    for row in rows:
        for col in columns:
            if col not in row or row[col] is None:
                have = sorted(k for k in row if k not in ("_line", "_row"))
                raise DataError(f"{where(str(path), row)}: missing column {col!r} (the row has {have})")
