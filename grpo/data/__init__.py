"""Data: dataset sources (`sources`: files, save_to_disk directories, hub ids, Python objects),
rows of line-based files (`rows`), prompt text and tokens (`prompts`), the draw order (`sampler`)."""

from grpo.errors import DataError

from .prompts import (CHAT_TEMPLATE_MODES, as_completion, check_prompts, completion_ids_list, content_of,
                      decode_completions, encode_prompt, format_prompt, is_messages, is_templated, prompt_batch,
                      tokenize_prompts)
from .rows import load_rows, require_columns
from .sampler import PromptSampler
from .sources import META_COLUMNS, Source, load_source, where

__all__ = ["CHAT_TEMPLATE_MODES", "DataError", "META_COLUMNS", "PromptSampler", "Source", "as_completion",
           "check_prompts", "completion_ids_list", "content_of", "decode_completions", "encode_prompt",
           "format_prompt", "is_messages", "is_templated", "load_rows", "load_source", "prompt_batch",
           "require_columns", "tokenize_prompts", "where"]
