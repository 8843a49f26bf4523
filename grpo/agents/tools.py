"""Tools: the Python functions an agent may call, and the checks they pass before a model loads.

A tool is a plain function, sync or `async def`, with a type hint on every argument and a
Google-style docstring describing it and each argument: the transformers / TRL convention
(https://huggingface.co/docs/transformers/en/chat_extras#passing-tools). Its JSON schema, which
the chat template shows the model, comes from `transformers.utils.get_json_schema`. In a config
a tool is named as a reward function is:

    tools: [path/to/file.py:search, my_package.tools:calculator]

and from Python it is the function itself (or a bound method: an environment's tools are its
public methods, `grpo.agents.environments`).

`load_tools` refuses, with one ConfigError naming the function, a tool that cannot be imported
or has no schema (a missing hint or docstring); `check_chat_template` refuses one the tokenizer's
chat template cannot render, and a template that cannot carry a tool call and its result at all.
Neither needs a model (the second only the tokenizer), so a bad tool stops a run before any model
loads.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable

from grpo.errors import ConfigError
from grpo.rewards.functions import load_module

from .rendering import assistant_message, template_name


@dataclass(frozen=True)
class Tool:
    """One callable tool: its name (what the model writes), the function, its JSON schema."""
    name: str
    fn: Callable
    schema: dict            # {"type": "function", "function": {"name", "description", "parameters"}}
    label: str              # how messages name it: the spec, or module.function / Class.method

    @property
    def parameters(self) -> dict:
        return self.schema["function"].get("parameters", {})


def describe(error: BaseException) -> str:
    """An exception as one line of an error message: its type and its text, newlines folded."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_object(spec: str, what: str) -> Any:
    """The object `spec` names: `path/to/file.py:name` or `package.module:name`, loaded as reward
    functions are (grpo.rewards.functions.load_module), a file once per process so that tools and
    an environment from one file share it. Errors name `what` and the spec."""
    if ":" not in spec:
        raise ConfigError(f"{what} {spec!r}: not of the form path/to/file.py:name or package.module:name")
    module, name = load_module(spec, what, error=ConfigError, shared=True)
    obj = getattr(module, name, None)
    if obj is None:
        raise ConfigError(f"{what} {spec!r}: {spec.rsplit(':', 1)[0]} has no attribute {name!r}")
    return obj


def make_tool(fn: Callable, label: str | None = None) -> Tool:
    """A Tool from a function or bound method, its schema from `get_json_schema`; a ConfigError
    naming the function when it has none (no docstring, an argument without a hint or a
    description)."""
    from transformers.utils import get_json_schema

    label = label or _qualified_name(fn)
    if not callable(fn) or inspect.isclass(fn):
        raise ConfigError(f"tool {label}: not a function")
    try:
        schema = get_json_schema(fn)
    except Exception as e:  # transformers' TypeHintParsingException / DocstringParsingException
        raise ConfigError(f"tool {label}: no JSON schema for it: {describe(e)} (a tool needs a type hint on every "
                          f"argument and a Google-style docstring describing it and each argument)") from None
    return Tool(name=schema["function"]["name"], fn=fn, schema=schema, label=label)


def load_tools(tools: list) -> list[Tool]:
    """Each entry (a spec string, a function, or a Tool) as a Tool; names must be distinct."""
    out = []
    for entry in tools:
        if isinstance(entry, Tool):
            out.append(entry)
        elif isinstance(entry, str):
            out.append(make_tool(load_object(entry, "tool"), label=entry))
        else:
            out.append(make_tool(entry))
    check_distinct(out)
    return out


def check_distinct(tools: list[Tool]) -> None:
    """Two tools of one name would leave the model unable to say which it calls."""
    seen: dict[str, Tool] = {}
    for tool in tools:
        if tool.name in seen:
            raise ConfigError(f"tool {tool.label}: its name {tool.name!r} is also the name of {seen[tool.name].label}")
        seen[tool.name] = tool


def _qualified_name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None and not inspect.ismodule(owner):
        return f"{type(owner).__name__}.{fn.__name__}"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# ---------------------------------------------------------------------------------------------
# Arguments the model wrote, against the schema and the signature

_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,), "null": (type(None),)}


def argument_problem(tool: Tool, arguments: Any) -> str | None:
    """Why `arguments` cannot be passed to `tool` (not an object, a missing or unknown argument, a
    value of the wrong JSON type or outside its enum), or None when they can."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {json.dumps(arguments)[:80]}"
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as e:
        return str(e)
    properties = tool.parameters.get("properties", {})
    for key, value in arguments.items():
        spec = properties.get(key, {})
        types = spec.get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if spec.get("nullable") and value is None:
            continue
        # bool is an int in Python but not a JSON integer or number
        if types and not any(isinstance(value, _JSON_TYPES.get(t, object)) and
                             not (isinstance(value, bool) and t != "boolean") for t in types):
            return f"argument {key!r} must be of type {' or '.join(types)}, got {json.dumps(value)[:80]}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r} must be one of {spec['enum']}, got {json.dumps(value)[:80]}"
    return None


# ---------------------------------------------------------------------------------------------
# What the chat template can render

_PROBE_ARGUMENT, _PROBE_RESULT = "probe_argument_7f3a", "probe_result_9c2e"


def check_chat_template(tokenizer, tools: list[Tool], template_kwargs: dict | None = None) -> None:
    """Refuse, with one ConfigError, a tool whose schema the tokenizer's chat template cannot
    render (it raises, or the tool's name does not appear in what it writes), and a template that
    cannot render a tool call and its result (it raises, or drops either: TRL's
    `supports_tool_calling` test), naming the template."""
    kwargs = template_kwargs or {}
    name = template_name(tokenizer)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"tools: the tokenizer of {name} has no chat template, so the model cannot be shown tools")
    user = [{"role": "user", "content": "hi"}]
    for tool in tools:
        try:
            text = tokenizer.apply_chat_template(user, tools=[tool.schema], tokenize=False,
                                                 add_generation_prompt=True, **kwargs)
        except Exception as e:
            raise ConfigError(f"tool {tool.label}: the chat template of {name} cannot render its schema: "
                              f"{describe(e)}") from None
        if tool.name not in text:
            raise ConfigError(f"tool {tool.label}: the chat template of {name} does not show tools to the model "
                              f"(the tool's name is not in what it renders)")
    if tools:
        tool = tools[0]
        messages = user + [assistant_message("", [(tool.name, {"x": _PROBE_ARGUMENT})]),
                           {"role": "tool", "name": tool.name, "content": _PROBE_RESULT}]
        try:
            text = tokenizer.apply_chat_template(messages, tools=[t.schema for t in tools], tokenize=False, **kwargs)
        except Exception as e:
            raise ConfigError(f"tools: the chat template of {name} cannot render a tool call and its result: "
                              f"{describe(e)}") from None
        if _PROBE_ARGUMENT not in text or _PROBE_RESULT not in text:
            raise ConfigError(f"tools: the chat template of {name} drops tool calls or tool results when it renders a "
                              f"conversation, so the model would never see them")
