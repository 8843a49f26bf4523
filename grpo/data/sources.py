"""Where a run's rows come from: every dataset form a Hugging Face user has, read into dicts.

`load_source(source, ...)` takes
  - a JSONL, CSV or Parquet file: read by `rows.load_rows`, each row remembering its line, so a
    bad row is reported as `file:line`;
  - any other file the `datasets` library reads (a JSON array, `.arrow`, `.tsv`, `.txt`, ...);
  - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a directory of
    data files;
  - a Hugging Face Hub id (`openai/gsm8k`), with `config_name` for a dataset with configs;
  - from Python: a `datasets.Dataset` or `DatasetDict`, a list of dicts, or a dict of columns.
A source with several splits is cut to `split` (TRL's `dataset_train_split` /
`dataset_test_split`); a source with one split is that split. Rows read without lines remember
their row number (`_row`), and `where(label, row)` names a row either way.

`datasets` is imported only for the forms that need it (the tiny demo never does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.errors import DataError

from .rows import file_fingerprint, load_rows, where

# Read here with line numbers; everything else in DATASETS_FORMATS goes through `datasets`.
LINE_FORMATS = (".jsonl", ".csv", ".parquet", ".pq")
# The text-data builders of `datasets`, by file suffix (images and audio are not for a text LM).
DATASETS_FORMATS = {".json": ("json", {}), ".ndjson": ("json", {}), ".arrow": ("arrow", {}),
                    ".tsv": ("csv", {"sep": "\t"}), ".txt": ("text", {})}
DATA_SUFFIXES = (*LINE_FORMATS, *DATASETS_FORMATS)
META_COLUMNS = ("_line", "_row")  # what we add to a row; never passed to reward functions


@dataclass
class Source:
    rows: list[dict[str, Any]]
    label: str          # how messages name the source: a path, a hub id, "dataset (a Python list)"
    fingerprint: str    # what a resumed run checks it is reading the same data by


def load_source(source: Any, *, key: str = "dataset", split: str = "", config_name: str = "",
                rename: dict[str, str] | None = None) -> Source:
    """The rows of `source` (see the module docstring), renamed by `rename` ({old: new})."""
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str):
        loaded = _from_string(source, key, split, config_name)
    elif type(source).__module__.split(".")[0] == "datasets":  # before dict: a DatasetDict is one
        loaded = _from_datasets_object(source, key, split)
    elif isinstance(source, (list, tuple)):
        loaded = _from_list(list(source), f"{key} (a Python list)", key)
    elif isinstance(source, dict):
        loaded = _from_columns(source, key)
    else:
        raise DataError(f"{key}: expected a file, a directory, a hub id, a datasets.Dataset or a list of "
                        f"dicts, got {type(source).__name__}")
    if not loaded.rows:
        raise DataError(f"{loaded.label}: the dataset has no rows")
    if rename:
        _rename(loaded, rename, key)
    return loaded


# ----------------------------------------------------------------------------------------------
# From Python

def _from_list(rows: list, label: str, key: str) -> Source:
    """Rows given as dicts; their fingerprint hashes their content (row by row), so the same data
    given again, in another process or another session, is recognised as the same."""
    out, digest = [], hashlib.sha256()
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{label} row {i}: expected a dict of column values, got {type(row).__name__}")
        out.append({**row, "_row": i})
        try:
            digest.update(json.dumps(row, sort_keys=True, default=repr).encode())
        except RecursionError:
            raise DataError(f"{label} row {i}: the row's values are nested too deeply to be read "
                            f"(lists and dicts hundreds of levels deep); flatten them") from None
    return Source(out, label, f"sha256:{digest.hexdigest()}")


def _from_columns(columns: dict, key: str) -> Source:
    lengths = {k: len(v) for k, v in columns.items() if isinstance(v, (list, tuple))}
    if len(lengths) != len(columns) or len(set(lengths.values())) > 1:
        raise DataError(f"{key}: a dict dataset must map each column name to a list, all of one length; "
                        f"got lengths {lengths}")
    n = next(iter(lengths.values()), 0)
    return _from_list([{k: v[i] for k, v in columns.items()} for i in range(n)], f"{key} (a dict of columns)", key)


def _from_datasets_object(obj, key: str, split: str, label: str | None = None) -> Source:
    import datasets

    label = label or f"{key} (a datasets.{type(obj).__name__})"
    if isinstance(obj, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(f"{label}: a streaming dataset has no length to draw prompts from; materialise "
                        f"the part you train on, e.g. Dataset.from_list(list(ds.take(10000)))")
    if isinstance(obj, datasets.DatasetDict):
        obj = _pick_split(obj, split, label, key)
    # The content's hash, not the Dataset's own _fingerprint: that one is random for a Dataset
    # built in memory, so a resumed run could not tell the same data from other data.
    return _from_list(obj.to_list(), label, key)


def _pick_split(splits, split: str, label: str, key: str):
    names = list(splits)
    if len(names) == 1:
        return splits[names[0]]
    if split in splits:
        return splits[split]
    which = "dataset_test_split" if key == "eval_dataset" else "dataset_train_split"
    raise DataError(f"{label}: has splits {names} and {which} is {split!r}; set {which} to one of them")


def _rename(loaded: Source, rename: dict[str, str], key: str) -> None:
    first = loaded.rows[0]
    for old, new in rename.items():
        if old not in first:
            have = sorted(k for k in first if k not in META_COLUMNS)
            raise DataError(f"{where(loaded.label, first)}: rename_columns: no column {old!r} to rename "
                            f"(the row has {have})")
        if new in first and new not in rename:
            raise DataError(f"{loaded.label}: rename_columns: {old!r} -> {new!r}, but the dataset already has "
                            f"a column {new!r}")
    for row in loaded.rows:
        values = {old: row.pop(old) for old in rename if old in row}
        row.update({rename[old]: v for old, v in values.items()})


# ----------------------------------------------------------------------------------------------
# From a path or a hub id

def _from_string(source: str, key: str, split: str, config_name: str) -> Source:
    path = Path(source).expanduser()
    if path.is_file():
        return _from_file(path, key, split)
    if path.is_dir():
        return _from_directory(path, key, split)
    if path.suffix.lower() in DATA_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(f"{key} {source} does not exist (looked for {path.resolve()})")
    return _from_hub(source, key, split, config_name, path)


def _from_file(path: Path, key: str, split: str) -> Source:
    suffix = path.suffix.lower()
    if suffix in LINE_FORMATS or (suffix == ".json" and _is_json_lines(path)):
        return Source(load_rows(path), str(path), file_fingerprint(path))
    if suffix not in DATASETS_FORMATS:
        raise DataError(f"{path}: unknown dataset format {suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}, "
                        f"a save_to_disk directory or a hub id")
    builder, options = DATASETS_FORMATS[suffix]
    loaded = _call_datasets(lambda d: d.load_dataset(builder, data_files=str(path), **options), str(path))
    return _with_fingerprint(_from_datasets_object(loaded, key, split, str(path)), file_fingerprint(path))


def _is_json_lines(path: Path) -> bool:
    """A .json file holding one object per line (read with lines), not one array or object."""
    with path.open("rb") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith(b"{"):
        return False
    first = head.split(b"\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    except RecursionError:  # a first line nested too deeply: read as lines, which says so with its line
        return True


def _from_directory(path: Path, key: str, split: str) -> Source:
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if saved:  # written by save_to_disk
        loaded = _call_datasets(lambda d: d.load_from_disk(str(path)), str(path))
    else:  # a folder of data files
        files = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in DATA_SUFFIXES]
        if not files:
            raise DataError(f"{key} {path} is a directory without a dataset: no save_to_disk files "
                            f"(dataset_info.json, state.json) and no data files ({', '.join(DATA_SUFFIXES)})")
        loaded = _call_datasets(lambda d: d.load_dataset(str(path)), str(path))
    return _with_fingerprint(_from_datasets_object(loaded, key, split, str(path)), _directory_fingerprint(path))


def _from_hub(source: str, key: str, split: str, config_name: str, path: Path) -> Source:
    def load(d):
        return d.load_dataset(source, config_name or None)

    try:
        loaded = _call_datasets(load, source, reraise=True)
    except Exception as e:  # offline, not found, gated: the library's own reason, in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{key} {source!r} is not a file or directory here (looked for {path.resolve()}) and "
                        f"could not be loaded from the Hugging Face Hub: {type(e).__name__}: {reason}. "
                        f"Without network, save it where there is one (datasets.load_dataset(...)"
                        f".save_to_disk(DIR)) and set {key} to DIR") from None
    return _from_datasets_object(loaded, key, split, source)


def _call_datasets(load, label: str, reraise: bool = False):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: reading this dataset needs the `datasets` library: pip install datasets") from None
    try:
        return load(datasets)
    except DataError:
        raise
    except Exception as e:
        if reraise:
            raise
        raise DataError(f"{label}: the datasets library cannot read it: {_reasons(e)}") from None


def _reasons(e: BaseException) -> str:
    """An exception and the ones it was raised from, one line each, joined: `datasets` wraps the
    reader's own error (a JSON nested too deeply, a corrupt Arrow file) in a generic one."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen and len(parts) < 4:
        seen.add(id(e))
        text = str(e).strip()
        parts.append(f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return " <- ".join(parts)


def _with_fingerprint(loaded: Source, fingerprint: str) -> Source:
    loaded.fingerprint = fingerprint
    return loaded


def _directory_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(path)).encode())
            digest.update(file_fingerprint(p).encode())
    return f"sha256:{digest.hexdigest()}"
