"""mkdocs hook: the configuration reference is generated from the config docstrings.

A line `<!-- config:FAMILY -->` in a page becomes the output of `grpo config FAMILY`
(`grpo.config.describe`) in a YAML block, so the page cannot drift from the code.
Listed in mkdocs.yml under `hooks:`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MARKER = re.compile(r"^<!-- config:([a-z-]+) -->$", re.MULTILINE)


def config_reference(family: str) -> str:
    """`grpo config FAMILY` as a fenced YAML block."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # the repository's grpo, even when it is not installed
        sys.path.insert(0, root)
    from grpo.config import COMMANDS, describe

    if family not in COMMANDS:
        raise ValueError(f"<!-- config:{family} -->: not a command family; one of {', '.join(COMMANDS)}")
    cls, command = COMMANDS[family]
    return f"```yaml\n{describe(cls, command).rstrip()}\n```"


def expand(markdown: str) -> str:
    """Every `<!-- config:FAMILY -->` line of `markdown` replaced by that family's reference."""
    return MARKER.sub(lambda m: config_reference(m.group(1)), markdown)


def on_page_markdown(markdown, page, config, files):
    return expand(markdown)
