"""From a YAML file and `--set key=value` overrides to a validated config object.

A config is a dataclass whose fields are the keys; under each field a docstring says what it means
(CleanRL's habit), and `field_docs` reads those docstrings back, so `grpo config <command>`
and the docs' configuration page come from the same lines as the defaults. Validation happens before
any model is loaded: an unknown key, a wrong type or an impossible value stops the run with one
message that names the key, the file it came from (or the `--set` flag) and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import errno
import inspect
import itertools
import json
import math
import os
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml

from grpo.errors import ConfigError


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) a value against a field's annotation."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), None)
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; everyone writes learning rates that way.
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if kind is str:
        return isinstance(value, str), value
    if kind in (list, dict):
        return isinstance(value, kind), value
    return True, value


def type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


# A config is a page of keys, not a data set: a file above this size is refused before it is
# read, and a document whose aliases (`*name`) would repeat more values than this is refused
# before any Python object is built from it ("billion laughs").
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"{key!r} given twice (first at line {first})")
        self.key, self.line, self.first = key, line, first


class ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently). Merge keys (`<<: *base`) may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
        return super().construct_mapping(node, deep)


def _expanded_size(root) -> int:
    """How many values the document holds once every alias is replaced by what it points to,
    counted without expanding anything (each node's size once); a recursive alias raises."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            open_.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_CONFIG_VALUES + 1)
            continue
        if id(node) in open_:
            raise yaml.YAMLError(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it")
        open_.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_:
                raise yaml.YAMLError(f"line {child.start_mark.line + 1}: an alias refers to a value that contains it")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def parse_yaml(text: str, name: str):
    """One YAML document as Python values, and its composed node (for line numbers), or a
    ConfigError naming `name` (a file, or `--set key`): not YAML, a key given twice, too large."""
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        size = _expanded_size(node)
        if size > MAX_CONFIG_VALUES:
            raise ConfigError(f"{name}: expands to more than {MAX_CONFIG_VALUES:,} values (its aliases repeat "
                              f"what they point to); a config holds keys, data belongs in a dataset file")
        return loader.construct_document(node), node
    except _DuplicateKey as e:
        raise ConfigError(f"{name}:{e.line}: {e.key} is given twice (first at line {e.first}); keep one") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        what = ", ".join(" ".join(str(part).split()) for part in (e.context, e.problem) if part)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are parsed as YAML so `beta=0`, `rewards=[...]` work."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = parse_yaml(raw, f"--set {key.strip()}")[0]
    return out


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The top-level mapping of a YAML config file, and the line of each key (1-based)."""
    path = Path(path)
    problem = path_problem(str(path))
    if problem:
        raise ConfigError(f"config file {problem}")
    try:
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes; a config file holds at most {MAX_CONFIG_BYTES:,} "
                              f"(data belongs in a dataset file)")
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    data, node = parse_yaml(text, str(path))
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    lines = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        if key_node.tag != "tag:yaml.org,2002:str":
            raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: a key must be a name, got "
                              f"{key_node.value!r}")
        lines[key_node.value] = key_node.start_mark.line + 1
    return data, lines


def aliases(cls) -> dict[str, str]:
    """Other names for keys (TRL's, Hugging Face's), merged over the class hierarchy (`ALIASES`)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("ALIASES", {}))
    return out


def choices(cls) -> dict[str, tuple]:
    """Allowed values per key, merged over the class hierarchy (`CHOICES` class attributes)."""
    out: dict[str, tuple] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("CHOICES", {}))
    return {k: tuple(v() if callable(v) else v) for k, v in out.items()}


def build(cls, values: dict[str, Any], source: str = "config", origins: dict[str, str] | None = None):
    """Make a `cls` from a dict: unknown keys, wrong types and bad choices raise ConfigError.

    `source` names where the values came from, for the message; `origins` says, per key, more
    precisely (`my.yaml:12`, `--set beta`). A class may define `ALIASES` (another name for a key)
    and `expand(values, source)` (e.g. a preset's bundle under the user's keys); then each key is
    checked and `validate(bad)` checks the combinations.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    allowed = choices(cls)
    origins = dict(origins or {})
    values = dict(values)

    def where(key: str) -> str:
        return origins.get(key.split("[")[0].split(".")[0], source)

    for alias, key in aliases(cls).items():
        if alias in values:
            if key in values:
                raise ConfigError(f"{where(alias)}: {alias} and {key} are the same key; give one")
            values[key] = values.pop(alias)
            if alias in origins:
                origins[key] = origins[alias]
    if hasattr(cls, "expand"):
        values = cls.expand(values, where("preset"))
    values = resolve_paths(cls, values, None)  # `~` in paths given from Python or --set
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: a key must be a name, got {key!r}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where(key)}: unknown key {key!r}{hint}")
        ok, value = _type_ok(value, hints[key])
        if not ok:
            got = "no value" if value is None else f"{type(value).__name__} {_short(value)}"
            raise ConfigError(f"{where(key)}: {key}: expected {type_name(hints[key])}, got {got}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where(key)}: {key}: expected a finite number, got {value}")
        if key in allowed and value not in allowed[key]:
            raise ConfigError(f"{where(key)}: {key}: {value!r} is not one of {', '.join(map(str, allowed[key]))}")
        kwargs[key] = value
    cfg = cls(**kwargs)

    def bad(key: str, msg: str):
        raise ConfigError(f"{where(key)}: {key}: {msg}")

    check_paths(cls, cfg, bad)
    cfg.validate(bad)
    return cfg


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def at_least(cfg, bad, minimum, *keys: str) -> None:
    """`bad(key, ...)` for the first of `keys` whose value is below `minimum`."""
    for key in keys:
        value = getattr(cfg, key)
        if value < minimum:
            bad(key, f"must be >= {minimum}, got {value}")


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """A YAML file (optional) with `--set key=value` overrides on top; each key's errors name
    where it came from: the file and line, or the --set flag."""
    values, origins = {}, {}
    if path:
        values, lines = load_yaml(path)
        origins = {k: f"{path}:{lines[k]}" if k in lines else str(path) for k in values}
        values = resolve_paths(cls, values, Path(path).resolve().parent)
    for key, value in parse_overrides(overrides or []).items():
        values[key] = value
        origins[key] = f"--set {key}"
    return build(cls, values, str(path) if path else "config", origins)


def path_kinds(cls) -> dict[str, str]:
    """{key: kind} of the keys holding paths, merged over the class hierarchy (`PATHS`)."""
    kinds: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        kinds.update(vars(klass).get("PATHS", {}))
    return kinds


def home(value: str) -> str:
    """`~` or `~user` at the start of a path is that home directory; nothing else is expanded
    (no environment variables: `$HOME` in a config is a directory named `$HOME`)."""
    return os.path.expanduser(value) if value.startswith("~") else value


def resolve_paths(cls, values: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """The keys `cls.PATHS` lists (see CommonConfig), as paths: a leading `~` is the home
    directory everywhere (`home`), and with `base` (the config file's directory) a relative path
    of a config file is made relative to it instead of the working directory. A value that is
    not there and does not look like a file (a hub id) is left as it is; `--set` values get no
    `base` (on the command line a path is the shell's), nor do the `out` keys (output_dir,
    output_file: relative to the working directory, as Hugging Face's Trainer)."""
    from grpo.data.sources import DATA_SUFFIXES

    kinds = path_kinds(cls)
    names = {f.name for f in dataclasses.fields(cls)} | {a for a, k in aliases(cls).items() if k == "rewards"}

    def local(value, data: bool = False):
        if not isinstance(value, str) or not value:
            return value
        value = home(value)
        if base is None or Path(value).is_absolute():
            return value
        candidate = base / value
        if os.path.lexists(candidate) or (data and Path(value).suffix.lower() in DATA_SUFFIXES):
            return str(candidate)
        return value

    def reward(entry):
        if isinstance(entry, str) and ":" in entry and entry.rsplit(":", 1)[0].endswith(".py"):
            target, fn = entry.rsplit(":", 1)
            target = home(target)
            return f"{target if base is None or Path(target).is_absolute() else base / target}:{fn}"
        if isinstance(entry, dict):
            entry = dict(entry)
            if "function" in entry:
                entry["function"] = reward(entry["function"])
            if isinstance(entry.get("model"), list):
                entry["model"] = [local(m) for m in entry["model"]]
            elif "model" in entry:
                entry["model"] = local(entry["model"])
        return entry

    out = dict(values)
    for key, value in values.items():
        kind = kinds.get(aliases(cls).get(key, key))
        if key not in names or kind is None:
            continue
        if kind == "rewards" and isinstance(value, list):
            out[key] = [reward(e) for e in value]
        elif kind in ("dir", "data"):
            out[key] = local(value, data=kind == "data")
        elif kind == "function":  # file.py:fn, as a reward's
            out[key] = reward(value)
        elif kind == "out" and isinstance(value, str):
            out[key] = home(value)
        elif kind == "iterative" and isinstance(value, dict):
            out[key] = {**value, **({"replay_dataset": local(value["replay_dataset"], data=True)}
                                    if "replay_dataset" in value else {}),
                        **({"labeler": reward(value["labeler"])} if "labeler" in value else {})}
    return out


def path_problem(value: str) -> str | None:
    """What makes a path unusable whatever the command does with it, or None: a symbolic link
    loop on the way (resolving it raises), a NUL character."""
    try:
        os.stat(value)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{value} is, or passes through, a symbolic link loop"
    except ValueError:
        return f"{value!r} contains a NUL character"
    return None


def check_paths(cls, cfg, bad) -> None:
    """`bad(key, ...)` for a path-valued key (`PATHS`) whose path is unusable (`path_problem`)."""
    for key, kind in path_kinds(cls).items():
        value = getattr(cfg, key, None)
        if kind == "rewards" and isinstance(value, list):
            for i, entry in enumerate(value):
                models = entry.get("model") if isinstance(entry, dict) else None
                for model in models if isinstance(models, list) else [models]:
                    problem = isinstance(model, str) and model and path_problem(model)
                    if problem:
                        bad(f"{key}[{i}].model", problem)
        elif kind != "rewards" and isinstance(value, str) and value:
            problem = path_problem(value)
            if problem:
                bad(key, problem)


def to_dict(cfg) -> dict[str, Any]:
    """The config as JSON-safe values (train_config.json, checkpoints, the resume check): a
    reward given as a Python function is its qualified name, an in-memory dataset a description."""
    return {f.name: jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if type(value).__module__.split(".")[0] == "datasets":  # before dict: a DatasetDict is one
        fingerprint = getattr(value, "_fingerprint", None)
        return f"<datasets.{type(value).__name__}" + (f" {fingerprint}>" if fingerprint else ">")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value) and not _is_reward_list(value):
            return f"<{len(value)} rows given in Python>"
        return [jsonable(v) for v in value]
    if callable(value):
        return qualified_name(value)
    return repr(value)


def _is_reward_list(value: list) -> bool:
    return all(("function" in v or "model" in v) for v in value)


def qualified_name(fn) -> str:
    """`python:module.qualname` of a function given from Python (what train_config.json records)."""
    target = getattr(fn, "func", fn)  # functools.partial
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"python:{getattr(target, '__module__', None) or type(target).__module__}.{name}"


# ----------------------------------------------------------------------------------------------
# The reference: every key, its default and its docstring.

def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass (and of its bases), by key."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


# The topics every config's keys are grouped under, in the order `grpo config` prints them.
TOPIC_ORDER = ("model", "data", "generation", "rewards", "agents", "algorithm", "optimisation", "evaluation", "scale",
               "logging and saving")


def topics(cls) -> dict[str, list[str]]:
    """Every key of `cls` by topic, the topics in TOPIC_ORDER (those with keys): each class of the
    hierarchy lists the keys it adds in its `TOPICS` table, {topic: (key, ...)}, a base class's
    keys before a subclass's; a subclass may also list an inherited key, which moves it there
    (e.g. `seed` to generation where nothing is optimised). Redefining a key's default keeps it
    where it was."""
    placed: dict[str, tuple[str, int]] = {}  # key: (topic, rank), a later listing after every earlier one
    rank = itertools.count()
    for klass in reversed(cls.__mro__):
        for topic, keys in vars(klass).get("TOPICS", {}).items():
            if topic not in TOPIC_ORDER:
                raise ValueError(f"{klass.__name__}.TOPICS: {topic!r} is not one of {TOPIC_ORDER}")
            for key in keys:
                placed[key] = (topic, next(rank))
    fields = [f.name for f in dataclasses.fields(cls)]
    if set(placed) != set(fields):
        raise ValueError(f"{cls.__name__}: keys in no TOPICS table: {sorted(set(fields) - set(placed))}; "
                         f"in a TOPICS table but not keys: {sorted(set(placed) - set(fields))}")
    out: dict[str, list[str]] = {topic: [] for topic in TOPIC_ORDER}
    for key, (topic, _) in sorted(placed.items(), key=lambda item: item[1][1]):
        out[topic].append(key)
    return {topic: keys for topic, keys in out.items() if keys}


def defaults(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def describe(cls, title: str, width: int = 100) -> str:
    """Every key of `cls` as a commented YAML file: the doc, the allowed values, the default.
    Its output is a valid config (`grpo config train > my.yaml`) that says what each key means."""
    docs, allowed, values = field_docs(cls), choices(cls), defaults(cls)
    names = {}
    for alias, key in aliases(cls).items():
        names.setdefault(key, []).append(alias)
    lines = [f"# {title}", "# Every key with its default, by topic. Any of them can go in the YAML file or in "
                           "--set key=value.", ""]
    heading = {keys[0]: topic for topic, keys in topics(cls).items()}
    for key, value in ((k, values[k]) for keys in topics(cls).values() for k in keys):
        if key in heading:
            lines += [f"# ---- {heading[key]} ----", ""]
        doc = docs.get(key, "")
        if key in allowed:
            doc += f" One of: {', '.join(map(str, allowed[key]))}."
        if key in names:
            doc += " Also accepted as " + ", ".join(f"`{a}`" for a in names[key]) + "."
        for paragraph in doc.split("\n"):
            lines += textwrap.wrap(paragraph, width - 2, initial_indent="# ", subsequent_indent="# ") or ["#"]
        if isinstance(value, str) and "\n" in value:  # one line, double-quoted with its escapes (JSON is YAML)
            lines.append(f"{key}: {json.dumps(value)}")
        else:
            lines.append(yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1])  # {key: v}
        nested = getattr(cls, "NESTED", {}).get(key)
        if nested is not None:  # the fields of each entry of a list-valued key
            lines.append(f"#   each entry of {key}:")
            for name, doc in field_docs(nested).items():
                default = defaults(nested)[name]
                lines += textwrap.wrap(f"{name} (default {default!r}): {doc}", width - 6,
                                       initial_indent="#     ", subsequent_indent="#       ")
        lines.append("")
    translated = getattr(cls, "TRL_KEYS", {})
    if translated:
        lines.append("# TRL's names that map onto the keys above (accepted in the file and in --set):")
        for name, doc in translated.items():
            lines += textwrap.wrap(f"{name}: {doc}", width - 4, initial_indent="#   ", subsequent_indent="#     ")
        lines.append("")
    return "\n".join(lines)
