"""Agents: multi-turn episodes in which the model calls tools or acts on an environment.

- `tools`: loading tools (`file.py:fn`, `pkg.mod:fn`, callables), their JSON schemas, the checks
  they pass before a model loads
- `parsing`: the tool calls in what the model wrote (the tokenizer's response template, Hermes /
  Qwen `<tool_call>` blocks, Llama 3.1 JSON), errors as values
- `environments`: TRL's environment_factory (methods as tools) and the text protocol
  reset / step (verifiers, OpenRLHF, SkyRL)
- `rendering`: the chat template's tokens for the messages a turn appends (prefix-stable)
- `calls`: every call of a turn at once, each bounded by a timeout
- `episodes`: the lockstep loop, token-exact, with its loss mask
- `contract`: `Episode`, what training takes from the loop or from a user's rollout function
- `backend`: the loop's `generate` on the rollout backend
"""

from .backend import backend_generate
from .calls import Call, CallRunner, Outcome
from .contract import Episode, episodes_from_trl
from .environments import AgentError, Environments, is_text_environment
from .episodes import Generate, Sampled, check_setup, run_episodes
from .parsing import ERROR_KINDS, CallError, ParsedTurn, ToolCall, parse_turn
from .rendering import Renderer
from .tools import Tool, check_chat_template, load_tools, make_tool

__all__ = ["AgentError", "Call", "CallError", "CallRunner", "ERROR_KINDS", "Environments", "Episode", "Generate",
           "Outcome", "ParsedTurn", "Renderer", "Sampled", "Tool", "ToolCall", "backend_generate",
           "check_chat_template", "check_setup", "episodes_from_trl", "is_text_environment", "load_tools",
           "make_tool", "parse_turn", "run_episodes"]
