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


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype, trainable: bool = True,
                   model_init_kwargs: dict | None = None, storage_dtype: torch.dtype | None = None,
                   quantization_config=None):
    """A trainable model is loaded in float32 whatever `dtype` is (master weights); a frozen one
    in `dtype`, in eval mode and without gradients. Every dropout is off either way
    (`disable_dropout`). `storage_dtype` overrides the trainable model's float32 (the frozen base
    under a LoRA adapter, whose weights are never updated).

    `model_init_kwargs` go to `AutoModelForCausalLM.from_pretrained` as TRL's
    `GRPOConfig.model_init_kwargs` do: `attn_implementation` ("sdpa", "eager", ...),
    `trust_remote_code`, and `dtype` (or its old name `torch_dtype`: a name such as "bfloat16",
    "auto" or a torch.dtype), which then replaces the storage dtype chosen above.
    `quantization_config` (`adapters.quantization_config`): the Linear layers stored in 4 bits,
    loaded straight onto `device` (a quantized model is placed by from_pretrained, not moved).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_init_kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ConfigError("model_init_kwargs: give dtype or torch_dtype, not both")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    default = (storage_dtype or torch.float32) if trainable else dtype
    kwargs["dtype"] = _init_dtype(kwargs.get("dtype", default))
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"model: could not load {path!r} with AutoModelForCausalLM.from_pretrained: {e}") from None
    except (TypeError, ValueError) as e:  # an unknown or invalid keyword, e.g. attn_implementation
        if not model_init_kwargs:
            raise ModelError(f"model: could not load {path!r} with AutoModelForCausalLM.from_pretrained: {e}") from None
        raise ConfigError(f"model_init_kwargs {sorted(model_init_kwargs)}: from_pretrained({path!r}) "
                          f"rejected them: {e}") from None
    if quantization_config is None:
        model.to(device)
    else:
        keep_trainable_layout(model)
    if trainable:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    disable_dropout(model)
    return model


def keep_trainable_layout(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for inference the
    first time it runs in eval mode without grad, and never back: training after that crashes
    (layers with a bias) or silently loses the base's gradient path (without). GRPO alternates
    no-grad rollouts with training steps, so the repacking is switched off (it is also slower
    here without the optional `kernels` package)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _init_dtype(value):
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ConfigError(f"model_init_kwargs.dtype: expected one of {sorted(DTYPES)} or 'auto', got {value!r}")


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model) -> None:
    """Every dropout off, in training mode too: dropout would make pi_old differ from pi_theta at
    identical weights (GRPO implementations turn it off; TRL's `disable_dropout`).

    Three places hold a probability: `nn.Dropout` modules; float attributes that modules copied
    from the config at init and pass to the attention function (`LlamaAttention.attention_dropout`,
    handed to SDPA as `dropout_p` in training mode); and the config itself, which some models read
    at every forward (Falcon, GPT-Neo). All three are zeroed, so the saved config says 0 too: the
    model was trained without dropout.
    """
    configs = [model.config, *(getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {}))]
    for cfg in filter(None, configs):
        for key, value in list(vars(cfg).items()):
            if _is_dropout_name(key) and isinstance(value, float) and value:
                setattr(cfg, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if _is_dropout_name(key) and isinstance(value, float) and value:
                setattr(module, key, 0.0)


def compute_dtype(x) -> torch.dtype:
    """The dtype autocast runs a matmul on x's device in (x's own dtype without autocast): what a
    hand-written backward (lmhead, llama.mlp) computes in, to match the module it stands in for."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in `dtype` (an absent bias stays None)."""
    return None if t is None else t.to(dtype)


def accumulate_matmul(buffer: Tensor, a: Tensor, b: Tensor) -> None:
    """buffer += a @ b for a hand-written backward's weight gradient: in place when the dtypes
    agree, else as autograd would (the product in the compute dtype, added into the float32
    master gradient)."""
    if buffer.dtype == a.dtype:
        buffer.addmm_(a, b)
    else:
        buffer.add_(a @ b)


def unwrap(model):
    """The transformers model under a PEFT wrapper (its Linear layers carry the adapter); the
    model itself otherwise."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_gradient_checkpointing(model) -> None:
    """Hugging Face's own activation checkpointing, non-reentrant: each decoder layer keeps only its
    input and recomputes itself in the backward. It reaches every forward that runs the model's
    layers, the packed one included (`packed.forward` calls the model's own forward; the
    hand-written `packed.llama_hidden` checkpoints its layers the same way when this is on)."""
    base = unwrap(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(base).__name__} does not support it")
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before activation_checkpointing_enable
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Transformers 5 (and 4.x for PEFT models) also hooks the input embeddings to make their output
    # require grad, which only reentrant checkpointing needs (its checkpoints pass no gradient to
    # parameters otherwise). With frozen embeddings (LoRA) that output becomes a leaf: kept to the
    # end of the backward, and given a [tokens, D] .grad nobody reads.
    if getattr(base, "_require_grads_hooks", None) or hasattr(base, "_require_grads_hook"):
        base.disable_input_require_grads()


def checkpointing_active(model) -> bool:
    """Whether a forward now would run under activation checkpointing (it only acts in training
    mode with grad enabled, and then drops every KV cache its layers are handed)."""
    return model.training and torch.is_grad_enabled() and \
        any(getattr(m, "gradient_checkpointing", False) is True for m in unwrap(model).modules())


def model_device(model) -> torch.device:
    """The device of the model's weights (where every input tensor has to go)."""
    return next(model.parameters()).device


def supports_logits_to_keep(model) -> bool:
    """Whether `model.forward` can run its LM head on the last k positions only (most HF causal
    LMs; a PEFT wrapper hands the keyword to the model it wraps)."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def cache_kwarg(model) -> str:
    """The KV-cache argument of `model.forward`: `cache` in Transformers 5.x, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


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
