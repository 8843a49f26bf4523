"""The tool calls in the text a model wrote.

Where the tokenizer defines a response template (`tokenizer.response_template`, transformers'
response parsing), `tokenizer.parse_response` reads the turn: it knows the model's own format,
and casts arguments by the tools' schemas. Otherwise two formats are read, told apart by the
text itself:

- Hermes style, the default (Qwen2.5, Qwen3, Hermes, and most open tool-calling models): each
  call a JSON object in its own block, several per turn allowed,
      <tool_call>
      {"name": "add", "arguments": {"a": 1, "b": 2}}
      </tool_call>
  and the text outside the blocks is the message's content.
- Llama 3.1 style: the whole turn is one JSON object, optionally after `<|python_tag|>`,
      {"name": "add", "parameters": {"a": 1, "b": 2}}

("arguments" and "parameters" are read alike in both, and arguments given as a JSON string, as
OpenAI's API writes them, are decoded.)

A call that cannot be made is not an exception: it is a `CallError` of one kind, in the order the
model wrote it, which the episode answers with a tool message saying what was wrong and counts:
`parse` (malformed JSON, an unclosed block, no name), `unknown_tool` (a name that is not one of
the episode's tools) or `bad_arguments` (not an object, a missing or unexpected argument, a
value of the wrong JSON type).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .rendering import assistant_message
from .tools import Tool, argument_problem, describe

PARSE, UNKNOWN_TOOL, BAD_ARGUMENTS, RAISED, TIMEOUT = "parse", "unknown_tool", "bad_arguments", "raised", "timeout"
ERROR_KINDS = (PARSE, UNKNOWN_TOOL, BAD_ARGUMENTS, RAISED, TIMEOUT)

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    """A call that can be made: a known tool and arguments its signature and schema accept."""
    name: str
    arguments: dict


@dataclass
class CallError:
    """A call that cannot be made, and why (`kind`: parse, unknown_tool or bad_arguments)."""
    kind: str
    message: str
    name: str | None = None
    arguments: Any = None  # as written, where the call parsed


@dataclass
class ParsedTurn:
    """One assistant turn: its message for the conversation, and its calls in the order written."""
    message: dict
    calls: list[ToolCall | CallError] = field(default_factory=list)


def parse_turn(text: str, tools: dict[str, Tool], *, tokenizer=None, ids: list[int] | None = None,
               prefix_ids: list[int] | None = None) -> ParsedTurn:
    """The calls in `text` (the model's turn, its stop token removed), checked against `tools`.

    With a tokenizer that defines `response_template`, `ids` (the turn's tokens, stop token
    included) and `prefix_ids` (what it was generated after) go to `tokenizer.parse_response`.
    """
    if tokenizer is not None and getattr(tokenizer, "response_template", None) is not None and ids is not None:
        return _parse_with_template(text, tools, tokenizer, ids, prefix_ids or [])
    if "<tool_call>" in text:
        content, raw = _hermes(text)
    else:
        content, raw = _llama(text)
    calls = [r if isinstance(r, CallError) else _check(r, tools) for r in raw]
    return ParsedTurn(_message(content, calls), calls)


def _hermes(text: str) -> tuple[str, list]:
    """Every <tool_call> block; blocks that are not a JSON call stay in the content as written."""
    raw, kept, last = [], [], 0
    for m in _BLOCK.finditer(text):
        body, closed = m.group(1), bool(m.group(2))
        kept.append(text[last:m.start()])
        last = m.end()
        call = _json_call(body) if closed else CallError(PARSE, "a <tool_call> block that is never closed")
        raw.append(call)
        if isinstance(call, CallError) and call.kind == PARSE:
            kept.append(m.group(0))
    kept.append(text[last:])
    return "".join(kept).strip(), raw


def _llama(text: str) -> tuple[str, list]:
    """The whole turn as one JSON call, after an optional <|python_tag|>; plain text otherwise."""
    body = text.strip()
    tagged = body.startswith(_PYTHON_TAG)
    body = body[len(_PYTHON_TAG):].strip() if tagged else body
    if not tagged and not (body.startswith("{") and '"name"' in body):
        return text, []
    call = _json_call(body)
    return (text if isinstance(call, CallError) and call.kind == PARSE else "", [call])


def _json_call(body: str) -> dict | CallError:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return CallError(PARSE, f"the tool call is not valid JSON ({e})")
    return _normalise(call)


def _normalise(call: Any) -> dict | CallError:
    """{"name", "arguments"} from the forms models and parsers write: flat or nested under
    "function", arguments as "arguments" or "parameters", an object or a JSON string of one."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return CallError(PARSE, 'a tool call must be a JSON object with a string "name"')
    arguments = call.get("arguments", call.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return CallError(BAD_ARGUMENTS, f"the arguments of {call['name']} are not valid JSON ({e})", call["name"],
                             arguments)
    return {"name": call["name"], "arguments": {} if arguments is None else arguments}


def _check(call: dict, tools: dict[str, Tool]) -> ToolCall | CallError:
    name, arguments = call["name"], call["arguments"]
    tool = tools.get(name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return CallError(UNKNOWN_TOOL, f"there is no tool {name!r} (the tools are: {known})", name, arguments)
    problem = argument_problem(tool, arguments)
    if problem is not None:
        return CallError(BAD_ARGUMENTS, f"bad arguments for {name}: {problem}", name, arguments)
    return ToolCall(name, arguments)


def _message(content: str, calls: list, **extra) -> dict:
    """The assistant message: calls that parsed (even to an unknown tool) as tool_calls, since
    the model did write them as calls; malformed ones are in the content, as written."""
    written = [(c.name, c.arguments) for c in calls if isinstance(c, ToolCall) or c.kind != PARSE]
    return assistant_message(content, written, **extra)


def _parse_with_template(text: str, tools: dict[str, Tool], tokenizer, ids: list[int],
                         prefix_ids: list[int]) -> ParsedTurn:
    try:
        parsed = tokenizer.parse_response(ids, prefix=prefix_ids, tools=[t.schema for t in tools.values()] or None)
    except Exception as e:  # the template's parser refuses what the model wrote (malformed JSON, ...)
        error = CallError(PARSE, f"the tool call could not be parsed ({describe(e)})")
        return ParsedTurn(assistant_message(text, []), [error])
    parsed = dict(parsed or {})
    raw = [_normalise(c) for c in parsed.pop("tool_calls", None) or []]
    calls = [r if isinstance(r, CallError) else _check(r, tools) for r in raw]
    parsed.pop("role", None)
    content = parsed.pop("content", None) or ""
    return ParsedTurn(_message(content, calls, **parsed), calls)
