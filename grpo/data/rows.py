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
            except RecursionError:
                raise DataError(f"{path}:{lineno}: the JSON is nested too deeply for Python's JSON parser "
                                f"(arrays and objects hundreds of levels deep); flatten it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append({**row, "_line": lineno})
    elif suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix in (".parquet", ".pq"):
        rows = _parquet_rows(path)
    else:
        raise DataError(f"{path}: unknown dataset format {suffix!r}; expected .jsonl, .csv or .parquet")
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return rows


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file, each with the line it starts on.

    A field may be as long as the file: the csv module's default field size limit (128 Ki
    characters) would refuse a long document as a prompt, and it protects nothing here, since the
    whole file is already in memory (`_text_lines`) and no field can be longer than the file. So
    the limit is raised to the file's size while it is read (and restored after: it is global to
    the process), which keeps memory bounded by the file's size. What the csv module still refuses
    is reported as `file:line`. A quote that is opened and never closed swallows the rest of the
    file into one field; that too is reported, at the line where the quote opens.
    """
    lines = _text_lines(path, keepends=True)
    rows: list[dict[str, Any]] = []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, path.stat().st_size + 1))
    try:
        reader = csv.DictReader(lines)
        end = 0
        try:
            end = 1 if reader.fieldnames else 0  # the header's line
            for row in reader:  # a row starts on the line after the previous one ended
                rows.append({**row, "_line": end + 1})
                end = reader.line_num
        except csv.Error as e:
            raise DataError(f"{path}:{end + 1}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)
    if rows and end == len(lines) and _quote_left_open(lines[rows[-1]["_line"] - 1:]):
        raise DataError(f"{path}:{rows[-1]['_line']}: not valid CSV (a quoted field opened in this row is never "
                        f"closed, so the rest of the file became one field)")
    return rows


def _quote_left_open(lines: list[str]) -> bool:
    """Whether these lines (the file's last row) end inside a quoted field: the lenient reader
    takes that as the end of the field, a strict one sees the data end too early."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, sum(map(len, lines)) + 1))
    try:
        for _ in csv.reader(lines, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    finally:
        csv.field_size_limit(limit)
    return False


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file, numbered from 1 as its `line`s; a file pyarrow cannot read
    (truncated, corrupt, not Parquet at all) is one DataError naming it."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'grpo[parquet]'") from None
    try:
        table = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable Parquet file (corrupt or truncated?): {reason}") from None
    return [{**row, "_line": i} for i, row in enumerate(table, 1)]


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
