"""Every config's keys grouped by topic: each key under exactly one topic, `grpo config` printing
them under headings in that order, and the classes' source in the same order."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from grpo.cli import main
from grpo.config import COMMANDS
from grpo.config.loading import TOPIC_ORDER, defaults, topics

FAMILIES = list(COMMANDS)
HEADING = re.compile(r"^# ---- (.+) ----$")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_key_has_exactly_one_topic(family):
    cls, _ = COMMANDS[family]
    by_topic = topics(cls)
    listed = [key for keys in by_topic.values() for key in keys]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(cls))   # each key once
    assert list(by_topic) == [t for t in TOPIC_ORDER if t in by_topic]         # topics in order


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_config_prints_keys_under_their_topic_headings(family, capsys):
    cls, _ = COMMANDS[family]
    assert main(["config", family]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == defaults(cls)
    printed: dict[str, list[str]] = {}
    topic = None
    for line in text.split("\n"):
        heading = HEADING.match(line)
        if heading:
            topic = heading.group(1)
            assert topic not in printed, f"heading {topic!r} twice"
            printed[topic] = []
        elif line and not line.startswith("#"):
            assert topic is not None, f"{line!r} before the first heading"
            printed[topic].append(line.split(":", 1)[0])
    assert printed == topics(cls)
    assert list(printed) == [t for t in TOPIC_ORDER if t in printed]


def own_fields(cls) -> list[tuple[str, str | None]]:
    """(key, the `# ---- topic` comment above it) for each field a class defines, in source order."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.split("\n")
    out = []
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and "ClassVar" not in ast.unparse(node.annotation):
            above = [m.group(1) for line in lines[:node.lineno - 1]
                     if (m := re.match(r"^\s*# ---- (.+)$", line))]
            out.append((node.target.id, above[-1] if above else None))
    return out


def config_classes():
    seen = []
    for cls, _ in COMMANDS.values():
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass) and klass not in seen:
                seen.append(klass)
    return seen


@pytest.mark.parametrize("klass", config_classes(), ids=lambda k: k.__name__)
def test_the_source_is_in_topic_order(klass):
    """Each class's fields are written in its TOPICS table's order, under a `# ---- topic` comment
    naming their topic (a redefined default under the topic of the key it redefines)."""
    table = vars(klass).get("TOPICS", {})
    assert set(table) <= set(TOPIC_ORDER)
    inherited = {f.name for base in klass.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    fields = own_fields(klass)
    topic_of = {key: topic for topic, keys in topics(klass).items() for key in keys}
    for key, comment in fields:
        assert comment == topic_of[key], f"{klass.__name__}.{key}: under `# ---- {comment}`, its topic: {topic_of[key]}"
    new = [key for key, _ in fields if key not in inherited]
    assert new == [key for topic in TOPIC_ORDER for key in table.get(topic, ()) if key not in inherited]
    assert len({key for keys in table.values() for key in keys}) == sum(len(keys) for keys in table.values())


def test_a_key_in_no_topic_is_an_error():
    @dataclasses.dataclass
    class Partial:
        TOPICS = {"model": ("model",)}
        model: str = ""
        stray: int = 0

    with pytest.raises(ValueError, match=r"keys in no TOPICS table: \['stray'\]"):
        topics(Partial)


def test_a_subclass_may_move_an_inherited_key():
    cls, _ = COMMANDS["make-preferences"]
    assert "seed" in topics(cls)["generation"] and "seed" in topics(COMMANDS["train"][0])["optimisation"]


def test_no_history_in_the_config_modules():
    for path in Path(inspect.getfile(COMMANDS["train"][0])).parent.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bissues? \d+|end of (issue|the)", text, re.IGNORECASE), path
