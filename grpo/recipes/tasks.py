"""Built-in verifiable tasks and the tiny locally built model used by the demo and the tests.

Nothing here downloads anything: the tokenizer is a character-level `tokenizers` model and the
policy is a ~1M-parameter Llama-architecture network initialised from a config, both saved with
`save_pretrained` so that the rest of the library loads them exactly as it loads a user's model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Characters the arithmetic task can produce; the special tokens come first so their ids are stable.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARS = list("0123456789+-*=? ")


def build_char_tokenizer(chars: list[str] = CHARS, *, special: list[str] | None = None, added: list[str] = (),
                         eos: str = "<eos>", pad: str = "<pad>", bos: str | None = None, name: str | None = None):
    """A character tokenizer as a `PreTrainedTokenizerFast`: one token per character, no merges.

    `special` (a chat format's turn markers, registered as special tokens) and `added` (whole
    tokens inside the text, such as tool-call tags) come first in the vocabulary; without
    `special`, the built-in tasks' own (<pad>, <eos>, <unk>, ...) as plain vocabulary entries."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((SPECIAL_TOKENS if special is None else special) + list(added) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if special is not None:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token="<unk>", padding_side="left",
        clean_up_tokenization_spaces=False, **({"bos_token": bos} if bos else {}),
        **({"name_or_path": name} if name else {}),
    )


def build_tiny_model(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 4,
                     num_heads: int = 4, intermediate_size: int = 512, max_positions: int = 128,
                     pad_token_id: int = 0, eos_token_id: int = 1, seed: int = 0):
    """A Llama-architecture causal LM of about 1M parameters (at the defaults), randomly initialised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(directory: str | Path, seed: int = 0, **model_kwargs) -> Path:
    """Build the tokenizer and the tiny model and save both in Hugging Face format."""
    directory = Path(directory)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed, **model_kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------
# Two-number addition: "12+34=" -> "46". The held-out split is disjoint from the training split.

def addition_problems(max_operand: int = 99, seed: int = 0, heldout: int = 500):
    """All (a, b) pairs with 0 <= a, b <= max_operand, shuffled once, split into train / held-out."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
    return rows[heldout:], rows[:heldout]


def write_jsonl(rows, path: str | Path, completion: bool = False) -> Path:
    """Write rows as JSONL; with `completion=True` each row also gets its supervised target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            row = dict(row)
            if completion:
                row["completion"] = row["answer"]
            f.write(json.dumps(row) + "\n")
    return path
