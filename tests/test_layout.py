"""The package's shape: layers whose imports point only downward, no import cycle, every config
key documented, and `grpo config` printing all of them from that one source."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from grpo.cli import main
from grpo.config import COMMANDS, PRESETS, TrainConfig, field_docs
from grpo.config.loading import defaults

ROOT = Path(__file__).resolve().parent.parent / "grpo"
# Bottom to top: a module may import from its own layer and the layers before it.
LAYERS = ["errors", "algorithm", "engine", "data", "config", "rewards", "agents", "observe",
          "runtime", "runs", "train", "supervised", "recipes", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """Every grpo module -> the grpo modules it imports (at the top or inside a function)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("grpo")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if not module.startswith("grpo"):
                    continue
                for alias in node.names:  # `from grpo.engine import packed` imports a module
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if is_module(sub) else module)
        graph[name] = targets - {name}
    return graph


def layer(name: str) -> int:
    parts = name.split(".")
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    for name in import_graph():
        if name != "grpo":
            assert name.split(".")[1] in LAYERS, f"{name} is in no layer of {LAYERS}"


def test_imports_point_only_downward():
    upward = [f"{source} -> {target}" for source, targets in import_graph().items() for target in targets
              if layer(target) > layer(source)]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_known_edges():
    """The checker itself: it finds relative, absolute and `from package import module` edges."""
    graph = import_graph()
    assert "grpo.engine.packed" in graph["grpo.engine.logprobs"]            # from . import packed
    assert "grpo.algorithm" in graph["grpo.train.rollout"]                 # from grpo import algorithm
    assert "grpo.engine.decoders" in graph["grpo.engine.generation"]        # from .decoders import start
    assert layer("grpo.train.loop") > layer("grpo.engine.models") > layer("grpo.algorithm.advantages")


@pytest.mark.parametrize("family", list(COMMANDS))
def test_every_config_key_has_a_docstring(family):
    cls, _ = COMMANDS[family]
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: keys without a docstring: {missing}"


@pytest.mark.parametrize("family", list(COMMANDS))
def test_grpo_config_prints_every_key_as_a_loadable_yaml(family, capsys):
    cls, command = COMMANDS[family]
    assert main(["config", family]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# {command}")
    assert yaml.safe_load(text) == defaults(cls)          # every key, with its default
    for key, doc in field_docs(cls).items():              # and its docstring above it
        assert doc.split()[0] in text


def test_config_reference_shows_allowed_values_from_the_registries(capsys):
    main(["config", "train"])
    text = " ".join(capsys.readouterr().out.replace("\n#", " ").split())  # comments unwrapped
    assert "One of: ppo_clip, cispo" in text and "One of: group, batch, none" in text
    assert "Also accepted as `scale_rewards`" in text


def test_presets_only_name_real_keys():
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, bundle in PRESETS.items():
        assert set(bundle) <= keys, name


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("grpo 0.")
