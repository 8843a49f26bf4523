"""Loading models and tokenizers, choosing device and dtype, and the few facts about a model's
forward signature that the engine needs.

fp32 on CPU (bf16 matmuls are very slow there), bf16 on CUDA; whatever is trained is stored in
float32 whatever the forwards compute in (master weights: `grpo.train.precision`).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import Tensor

from grpo.errors import ConfigError, ModelError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU of this process (LOCAL_RANK under torchrun) when CUDA is there, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but this machine has no usable CUDA device "
                          "(torch.cuda.is_available() is False); use device: auto or cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu" if name == "auto" else name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def check_model_source(path: str, key: str = "model"):
    """The model's config; one line instead when `path` is neither a model directory nor a
    reachable hub id, before anything heavy is loaded (reads config.json only)."""
    from transformers import AutoConfig

    if not path:
        raise ModelError(f"{key}: required: a model directory or hub id")
    local = Path(path).expanduser()
    if local.is_file():
        raise ModelError(f"{key}: {path} is a file; expected a model directory (what save_pretrained writes) "
                         f"or a hub id")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelError(f"{key}: {path} is a directory but holds no model: there is no config.json in it "
                         f"(a model directory is what save_pretrained writes)")
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local.is_dir():
            raise ModelError(f"{key}: {path}/config.json is not a model config: {reason}") from None
        raise ModelError(f"{key}: {path!r} is not a directory here ({local.resolve()}) and could not be "
                         f"loaded as a hub id: {reason}") from None


def load_tokenizer(path: str):
    """A tokenizer that left-pads (prompts end where completions start) and has a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"model: cannot load the tokenizer of {path!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; EOS is safe because every mask excludes padding.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype, trainable: bool = True):
    """A trainable model is loaded in float32 whatever `dtype` is (master weights); a frozen one
    in `dtype`, in eval mode and without gradients."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trainable else dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"model: could not load {path!r} with AutoModelForCausalLM.from_pretrained: {e}") from None
    model.to(device)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    # Dropout would make pi_old differ from pi_theta at identical weights; GRPO implementations turn it off.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def model_device(model) -> torch.device:
    """The device of the model's weights (where every input tensor has to go)."""
    return next(model.parameters()).device


def supports_logits_to_keep(model) -> bool:
    """Whether `model.forward` can run its LM head on the last k positions only (most HF causal LMs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """The KV-cache argument of `model.forward`: `cache` in Transformers 5.x, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a forward's output, under either name."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that start at 0 on each row's first real token, whatever its left padding.

    Without them a left-padded row would see its prompt at positions 3, 4, 5... instead of 0, 1, 2...
    and (with rotary or learned position embeddings) produce different logits than the same row
    unpadded. Padding columns get position 0; they are masked out as keys, so it does not matter.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
