"""docs/design.md's worked examples (adding a policy loss, an advantage estimator, a reward, a
rollout backend, a tool, an environment, a rollout_func) run as written."""

import re
from pathlib import Path

import pytest

from conftest import single_thread
from grpo.algorithm import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from grpo.engine.backend import ROLLOUT_BACKENDS

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DESIGN.read_text(), re.DOTALL)


def test_the_design_has_its_examples():
    assert len(BLOCKS) == 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_design_example_runs(index):
    registries = [POLICY_LOSSES, ADVANTAGE_ESTIMATORS, ROLLOUT_BACKENDS]
    saved = [dict(r._table) for r in registries]
    try:
        with single_thread():
            exec(compile(BLOCKS[index], f"{DESIGN}:block{index}", "exec"), {"__name__": f"design_{index}"})
    finally:  # the examples' names leave the registries again
        for r, table in zip(registries, saved):
            r._table.clear()
            r._table.update(table)
