"""Reward functions: the built-ins and the loading of a user's.

A reward function has TRL's contract (grpo.rewards.scoring says what it is called with):
`fn(prompts, completions, **columns) -> list[float | None]`, where `prompts` and `completions`
are lists of N strings, or, for conversational data, of message lists (a completion is then
[{"role": "assistant", "content": text}]), and each dataset column arrives as a list of N
values. In a config it is
  {function: exact_answer}                      a built-in (see BUILTIN)
  {function: path/to/file.py:my_reward}         a function in a Python file
  {function: my_package.rewards:my_reward}      a function in an importable module
and from Python the function itself. The built-ins take both forms of completion.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

from grpo.data import content_of
from grpo.errors import GrpoError, RewardError


# ---------------------------------------------------------------------------------------------
# Built-in rewards

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def is_exact_answer(completion: str, answer) -> bool:
    """The exact-answer verifier: the completion, stripped of whitespace, is the answer."""
    return completion.strip() == str(answer).strip()


def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion, stripped of whitespace, is exactly the `answer` column, else 0.0."""
    return [float(is_exact_answer(content_of(c), a)) for c, a in zip(completions, answer)]


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def answer_distance(prompts, completions, answer, **_) -> list[float]:
    """A dense reward: 1 / (1 + |first number in completion - answer|), 0 without a number."""
    out = []
    for c, a in zip(completions, answer):
        x = first_number(content_of(c))
        out.append(0.0 if x is None else 1.0 / (1.0 + abs(x - float(a))))
    return out


_THINK = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def think_format(prompts, completions, **_) -> list[float]:
    """DeepSeek-R1's format reward: 1.0 for '<think>...</think> <answer>...</answer>', else 0.0."""
    return [float(bool(_THINK.match(content_of(c).strip()))) for c in completions]


BUILTIN: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "answer_distance": answer_distance,
    "think_format": think_format,
}


def load_module(spec: str, what: str, error: type[GrpoError] = RewardError, shared: bool = False):
    """The module `spec` (`path/to/file.py:name` or `package.module:name`) names, and the name.

    A file is executed as a module of its own; `shared`: once per file and process, so that the
    names one file gives (an agent's tools and its environment) share its module-level state as
    in the user's own program. Every failure is one `error` naming `what` and the spec."""
    target, name = spec.rsplit(":", 1)
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target), name
        except Exception as e:
            raise error(f"{what} {spec!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from None
    path = Path(target)
    if not path.is_file():
        raise error(f"{what} {spec!r}: file {path} does not exist")
    key = f"grpo_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
    if shared and key in sys.modules:
        return sys.modules[key], name
    module_spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise error(f"{what} {spec!r}: importing {path} failed: {type(e).__name__}: {' '.join(str(e).split())}") \
            from None
    if shared:
        sys.modules[key] = module
    return module, name


def load_function(spec: str) -> Callable:
    """A built-in name, `path/to/file.py:function` or `package.module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise RewardError(f"reward function {spec!r}: not a built-in ({', '.join(BUILTIN)}) and not of "
                          f"the form path/to/file.py:function or package.module:function")
    module, name = load_module(spec, "reward function")
    target = spec.rsplit(":", 1)[0]
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {target} has no function {name!r}")
    return fn
