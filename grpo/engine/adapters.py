"""LoRA adapters through `peft` (the optional extra `grpo[peft]`).

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes the pretrained weight W and trains a low-rank
update: h = W x + (alpha / r) * B A x, A [r x d_in], B [d_out x r], B initialised to zero so the
adapted model starts as the base model. Only A and B are trained (and sit in the optimizer).

The reference policy of GRPO's KL term is the base model, which LoRA keeps intact: it is the
same modules with the adapter switched off (`reference_policy`), so beta > 0 costs no second copy
of the weights. At the start of training the adapter is zero and pi_ref == pi_theta exactly.

Every engine path runs on the wrapped model: the packed scoring forward goes through the model's
own forward (the adapter's Linear layers included), and the group decoder calls the adapted
projection modules directly (`models.unwrap` finds the layers under the PEFT wrapper).

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the same adapter over a base whose Linear layers
are stored in 4 bits (NF4, or FP4) by bitsandbytes (`quantization_config`, the optional extra
`grpo[qlora]`), dequantized block by block to the compute dtype in each matmul. The embeddings,
norms and LM head stay unquantized, as in bitsandbytes' own loading. The reference is again the
base with the adapter off, now the 4-bit base: pi_ref is what the quantized model computes.
"""

from __future__ import annotations

import contextlib

from grpo.errors import ConfigError

from .models import unwrap


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("peft: LoRA needs the peft package: pip install 'grpo[peft]'") from None
    return peft


def add_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules="all-linear"):
    """The model wrapped with a fresh LoRA adapter (`peft.get_peft_model`): the base weights frozen,
    A and B of rank `r` on `target_modules` ("all-linear": every Linear layer but the output
    head, or a list of module names such as ["q_proj", "v_proj"]; None: peft's default for the
    architecture, which TRL's `peft_config` gets), scaled by alpha / r.

    `dropout` is LoRA's dropout on the adapter's input. It is applied in training mode, so with
    dropout > 0 two log-prob passes at the same weights differ (the ratio to pi_old is not 1 at
    step 0); the reference, with the adapter off, is unaffected.
    """
    peft = _peft()
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"peft.r: expected a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"peft.alpha: expected a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"peft.dropout: expected a probability in [0, 1), got {dropout!r}")
    if not (target_modules is None or target_modules == "all-linear" or
            (isinstance(target_modules, (list, tuple)) and target_modules and
             all(isinstance(m, str) for m in target_modules))):
        raise ConfigError("peft.target_modules: expected 'all-linear' or a list of module names, "
                          f"got {target_modules!r}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), task_type="CAUSAL_LM",
                             target_modules=target_modules if target_modules is None or isinstance(target_modules, str)
                             else list(target_modules))
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError(f"peft.target_modules {target_modules!r}: {e}") from None


QUANTIZATIONS = ("nf4", "fp4")


def quantization_config(quantization: str, double_quant: bool, compute_dtype):
    """bitsandbytes' 4-bit storage for the base's Linear layers (`peft.quantization`): "nf4"
    (QLoRA's NormalFloat, for normally distributed weights) or "fp4"; `double_quant` also
    quantizes the per-block scales (QLoRA's double quantization, about 0.4 bits a parameter
    less). Matmuls dequantize to `compute_dtype`."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"peft.quantization: expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it importable)
    except ImportError:
        raise ConfigError("peft.quantization: 4-bit bases need the bitsandbytes package: "
                          "pip install 'grpo[qlora]'") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_use_double_quant=bool(double_quant), bnb_4bit_compute_dtype=compute_dtype)


def is_peft(model) -> bool:
    return unwrap(model) is not model


@contextlib.contextmanager
def reference_policy(model):
    """The base model: `model` itself with its adapter switched off inside the block (a model
    without adapter is returned as is)."""
    if not is_peft(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def merge_and_unload(model):
    """A plain transformers model with the adapter folded into the weights, W + (alpha / r) B A,
    for `save_pretrained` (it loads without peft). Changes `model`: call it once, at the end."""
    return model.merge_and_unload() if is_peft(model) else model


def trainable_parameters(model) -> int:
    """How many parameters the optimizer gets (with LoRA: the adapter's A and B only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
