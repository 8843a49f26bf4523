"""Loading models and tokenizers, choosing device and dtype, and the few facts about a model's
forward signature that the engine needs.

fp32 on CPU (bf16 matmuls are very slow there), bf16 on CUDA; whatever is trained is stored in
float32 whatever the forwards compute in (master weights: `grpo.runtime.precision`).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

from grpo.errors import ConfigError, ModelError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_sharded(model) -> bool:
    """Whether `model` is sharded with FSDP2 (`fsdp: true`): its root is an FSDP unit."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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


def trusts_remote_code(model_init_kwargs: dict | None) -> bool:
    """Whether a model's own Python code may run: `model_init_kwargs.trust_remote_code` (where TRL's
    ModelConfig key lands too), False when absent. It goes to every `from_pretrained` of a model's
    config, tokenizer and weights, always as a bool: given None, Hugging Face asks `[y/N]` on a
    terminal, so a run's outcome would depend on how it was started."""
    value = (model_init_kwargs or {}).get("trust_remote_code", False)
    if not isinstance(value, bool):
        raise ConfigError(f"model_init_kwargs.trust_remote_code: expected true or false, got {value!r}")
    return value


def _remote_code_error(key: str, path: str, what: str) -> ModelError:
    return ModelError(f"{key}: {path}: its {what} needs Python code shipped with the model (an auto_map naming "
                      f"classes of its own), which runs only with trust_remote_code; set model_init_kwargs: "
                      f"{{trust_remote_code: true}} (TRL: --trust_remote_code) if you trust that code")


def _needs_trust(e: Exception) -> bool:
    return "trust_remote_code" in str(e)


def check_model_source(path: str, key: str = "model", trust_remote_code: bool = False):
    """The model's config; one line instead when `path` is neither a model directory nor a
    reachable hub id, before anything heavy is loaded (reads config.json, and the headers of a
    local directory's safetensors files: `check_weight_files`).

    `trust_remote_code` (see `trusts_remote_code`): a config whose auto_map names classes of
    its own is loaded with that code only when True; else one ModelError says how to allow it."""
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
        config = AutoConfig.from_pretrained(str(local) if local.is_dir() else path,
                                            trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as e:
        if _needs_trust(e) and not trust_remote_code:
            raise _remote_code_error(key, path, "config") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local.is_dir():
            raise ModelError(f"{key}: {path}/config.json is not a model config: {reason}") from None
        raise ModelError(f"{key}: {path!r} is not a directory here ({local.resolve()}) and could not be "
                         f"loaded as a hub id: {reason}") from None
    if local.is_dir():
        check_weight_files(local, key)
    return config


# The most safetensors itself accepts for a header.
SAFETENSORS_MAX_HEADER = 100_000_000


def check_weight_files(directory: str | Path, key: str = "model") -> None:
    """Every `*.safetensors` file of a model directory is whole: its header is there, is JSON, and
    the file is as long as the tensors it lists. Reads the headers only. A file cut short by an
    interrupted download or copy is one ModelError naming it, not a loader's traceback."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            raise ModelError(f"{key}: {file} is not a valid safetensors file: {problem}; it is probably truncated "
                             f"(an interrupted download or copy): fetch or save it again")


def _safetensors_problem(file: Path) -> str:
    """Why `file` is not a whole safetensors file ('' when it is): an 8-byte little-endian header
    length, that many bytes of JSON mapping each tensor to its `data_offsets` [begin, end) in the
    data after the header."""
    size = file.stat().st_size
    if size < 8:
        return f"it is {size} bytes, too short for even the header's length" if size else "it is empty (0 bytes)"
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
            return f"its header claims {n} bytes but the file has {size}"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"its tensors need {need} bytes but the file has {size}"
    return ""


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A tokenizer that left-pads (prompts end where completions start), with an EOS and a pad token.

    EOS: the tokenizer's own; without one, the first EOS id of the model's generation config (or
    config.json) in the same place, as the model's `generate` would stop on it; with neither, a
    completion could never end, and one ModelError names the tokenizer and what is missing. Pad:
    the tokenizer's own, else EOS (many causal LMs ship without one; every mask excludes padding).
    `trust_remote_code` as in `check_model_source`.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as e:
        if _needs_trust(e) and not trust_remote_code:
            raise _remote_code_error("model", path, "tokenizer") from None
        raise ModelError(f"model: cannot load the tokenizer of {path!r}: {e}") from None
    if tokenizer.eos_token_id is None:
        tokens = [t for t in map(tokenizer.convert_ids_to_tokens, model_eos_ids(path)) if t is not None]
        if not tokens:
            pad = "" if tokenizer.pad_token_id is not None else " and no pad token"
            raise ModelError(f"model: the tokenizer of {path} has no EOS token{pad}, and the model's generation "
                             f"config names none: a completion could never end; set eos_token in its "
                             f"tokenizer_config.json (or eos_token_id in generation_config.json)")
        tokenizer.eos_token = tokens[0]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_eos_ids(path: str) -> list[int]:
    """The EOS ids the model at `path` declares: its generation_config.json's, else config.json's
    (read from a local directory; a hub id's from the local cache, [] when it is not there)."""
    local = Path(path).expanduser()
    if local.is_dir():
        for name in ("generation_config.json", "config.json"):
            try:
                ids = _as_ids(json.loads((local / name).read_text()).get("eos_token_id"))
            except (OSError, ValueError, AttributeError):
                continue
            if ids:
                return ids
        return []
    try:
        from transformers import GenerationConfig

        return _as_ids(GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id)
    except Exception:  # not cached, not a model: nothing declared
        return []


def _as_ids(value) -> list[int]:
    """An eos_token_id as configs give it (an int, a list of ints, or None) as a list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS first, then each id of the
    model's `generation_config.eos_token_id` (an int or a list) not already there. Chat models
    list their end-of-turn tokens there (Llama-3's `<|eot_id|>`, Qwen's `<|im_end|>` and
    `<|endoftext|>`), and their own `generate` stops on all of them, so generation, completion
    masks and truncation flags all treat each of them as EOS. `model` may be wrapped by PEFT."""
    ids = _as_ids(tokenizer.eos_token_id)
    if model is not None:
        base = unwrap(model)
        generation_config = getattr(base, "generation_config", None)
        declared = generation_config.eos_token_id if generation_config is not None else \
            getattr(getattr(base, "config", None), "eos_token_id", None)
        ids += [i for i in _as_ids(declared) if i not in ids]
    if not ids:
        raise ModelError("model: neither the tokenizer nor the model's generation config has an EOS token: "
                         "a completion could never end")
    return ids


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

    Safety: `trust_remote_code` is always passed, False unless given (`trusts_remote_code`), so
    Hugging Face never asks on a terminal. Pickled weights (`pytorch_model.bin`) are loaded only
    through torch's safe unpickler (`weights_only=True`, which rebuilds tensors and refuses any
    other object, so a pickle cannot run code); a file it refuses is one ModelError naming it,
    never retried unsafely, and `weights_only: false` in model_init_kwargs is refused. A
    safetensors file that is cut short is one ModelError naming it (`check_weight_files`).
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_init_kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ConfigError("model_init_kwargs: give dtype or torch_dtype, not both")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if kwargs.get("weights_only", True) is not True:
        raise ConfigError("model_init_kwargs.weights_only: pickled weights are only loaded with torch's safe "
                          "unpickler (weights_only=True); convert them to safetensors instead")
    kwargs["weights_only"] = True
    kwargs["trust_remote_code"] = trusts_remote_code(kwargs)
    default = (storage_dtype or torch.float32) if trainable else dtype
    kwargs["dtype"] = _init_dtype(kwargs.get("dtype", default))
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    local = Path(path).expanduser()
    if local.is_dir():
        check_weight_files(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as e:
        raise ModelError(f"model: {_pickled_weights(local, path)} holds pickled weights that torch's safe unpickler "
                         f"(weights_only=True) refuses: {_first_line(e)}. Unpickling it fully could run any code "
                         f"it carries, so it is not loaded; where you trust it, convert it to safetensors "
                         f"(from_pretrained(..., weights_only=False).save_pretrained(dir))") from None
    except OSError as e:
        raise ModelError(f"model: could not load {path!r} with AutoModelForCausalLM.from_pretrained: {e}") from None
    except (TypeError, ValueError) as e:  # an unknown or invalid keyword, e.g. attn_implementation
        if _needs_trust(e) and not kwargs["trust_remote_code"]:
            raise _remote_code_error("model", path, "model") from None
        if not model_init_kwargs:
            raise ModelError(f"model: could not load {path!r} with AutoModelForCausalLM.from_pretrained: {e}") from None
        raise ConfigError(f"model_init_kwargs {sorted(model_init_kwargs)}: from_pretrained({path!r}) "
                          f"rejected them: {e}") from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":  # a hub model's file, or one that changed since the check
            raise ModelError(f"model: {path}: a safetensors file is not valid: {_first_line(e)}; it is probably "
                             f"truncated: fetch or save it again") from None
        raise
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _pickled_weights(local: Path, path: str) -> str:
    """The pickled weight file(s) of a model directory, for a message; the path itself otherwise."""
    files = sorted(local.glob("*.bin")) if local.is_dir() else []
    return ", ".join(map(str, files)) if files else path


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
