"""Data: dataset rows (`rows`), prompt text and tokens (`prompts`), the draw order (`sampler`)."""

from grpo.errors import DataError

from .prompts import CHAT_TEMPLATE_MODES, check_prompts, decode_completions, format_prompt, is_messages, tokenize_prompts
from .rows import load_rows, require_columns
from .sampler import PromptSampler

__all__ = ["CHAT_TEMPLATE_MODES", "DataError", "PromptSampler", "check_prompts", "decode_completions", "format_prompt", "is_messages", "load_rows",
           "require_columns", "tokenize_prompts"]
