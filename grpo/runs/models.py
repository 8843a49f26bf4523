"""The policy and the reference as the config asks for them, and how they are saved.

Full fine-tuning: two float32 models (the reference only when beta > 0 or the ratio is anchored
at it). LoRA (`peft`): one model, the reference being the same modules with the adapter off; its
frozen base is stored in the compute dtype (bf16 on CUDA: 2 bytes a parameter, as TRL users load
it), the adapter in float32 (peft's autocast_adapter_dtype), so master weights stay float32.
FSDP2 (`fsdp`): each loaded on the CPU and sharded over the torchrun processes. Gradient
checkpointing and the model's own `model_init_kwargs` apply to both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo.config import TrainConfig
from grpo.engine.adapters import add_lora, is_peft, merge_and_unload, quantization_config
from grpo.engine.models import enable_gradient_checkpointing, load_causal_lm
from grpo.engine.moe import is_moe
from grpo.errors import ConfigError
from grpo.runtime.sharding import shard_model

from .checkpoint import save_model
from .sharded_checkpoint import save_gathered_pretrained


def needs_reference(cfg) -> bool:
    return cfg.beta > 0 or cfg.ratio_anchor == "reference" or cfg.reward_kl_coef > 0


def load_models(cfg: TrainConfig, run):
    """pi_theta, and pi_ref (None when the run never uses it: beta = 0 with the ratio anchored at
    pi_old; the policy itself under LoRA). Full fine-tuning: both hold float32 weights whatever the
    forwards compute in (runtime.precision), the reference like the policy so that the two agree bit
    for bit at step 0 (KL exactly 0, a reference-anchored ratio exactly 1), under bf16 as under
    fp32. LoRA: the frozen base in the compute dtype, the trained adapter in float32."""
    where = torch.device("cpu") if cfg.fsdp else run.device  # fully_shard moves each shard to the device
    kwargs = dict(model_init_kwargs=cfg.model_init_kwargs) if cfg.model_init_kwargs else {}
    # LoRA never updates the base: stored as the forwards compute (fp32 on CPU, bf16 on CUDA), or
    # under QLoRA its Linear layers in 4 bits. FSDP2 shards float32 weights and casts them for the
    # forwards with its own policy, so a sharded base stays float32 (a 1 / world share of it).
    base_dtype = run.dtype if cfg.peft and not cfg.fsdp else None
    policy = load_causal_lm(cfg.model, where, torch.float32, storage_dtype=base_dtype,
                            quantization_config=quantization(cfg, run.dtype), **kwargs)
    if cfg.router_aux_loss_coef and not is_moe(policy):
        raise ConfigError(f"router_aux_loss_coef: {cfg.model} ({type(policy).__name__}) is not a mixture-of-experts "
                          "model with a router load-balancing loss (Mixtral, Qwen2-MoE, Qwen3-MoE); set it to 0")
    if cfg.peft:
        # The adapter's random A from the run's seed, not the process's (seed + rank): every process
        # of a data-parallel or sharded run starts from the same adapter, as from the same base.
        # The process's own stream (LoRA dropout, users' reward functions) resumes after it.
        cuda = [torch.cuda.current_device()] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            policy = add_lora(policy, **lora_settings(cfg))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    reference = None
    if needs_reference(cfg):
        reference = policy if cfg.peft else load_causal_lm(cfg.model, where, torch.float32, trainable=False, **kwargs)
    if cfg.fsdp:
        shared = reference is policy  # a LoRA policy's reference is the policy itself: sharded once
        policy = shard_model(policy, run.world, run.dtype)
        if reference is not None:
            reference = policy if shared else shard_model(reference, run.world, run.dtype)
    return policy, reference


def lora_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.peft.items() if k not in ("quantization", "double_quant")}


def quantization(cfg: TrainConfig, compute_dtype: torch.dtype):
    """bitsandbytes' config for a QLoRA base (peft.quantization), or None."""
    if cfg.peft.get("quantization") is None:
        return None
    return quantization_config(cfg.peft["quantization"], cfg.peft.get("double_quant", False), compute_dtype)


def save_final(cfg: TrainConfig, out: Path, policy, tokenizer, world) -> None:
    """The trained model: one directory plain transformers loads (gathered from the shards under
    fsdp); under LoRA the adapter, or with merge_adapter the merged model and adapter/ beside it."""
    merge = is_peft(policy) and cfg.merge_adapter
    if cfg.fsdp:  # a LoRA policy's save_pretrained takes the adapter's entries of the gathered weights
        save_gathered_pretrained(policy, tokenizer, out / "adapter" if merge else out, world)
        if merge and world.main:
            save_model(out, merged_model(cfg, policy, out / "adapter"), tokenizer)
        world.barrier()
        return
    if not world.main:
        return
    if merge:
        save_model(out / "adapter", policy, tokenizer)
        save_model(out, merged_model(cfg, policy, out / "adapter"), tokenizer)
    else:
        save_model(out, policy, tokenizer)


def merged_model(cfg: TrainConfig, policy, adapter_dir: Path):
    """The adapter folded into its base, a plain transformers model. Under QLoRA peft would fold it
    into the 4-bit weights and quantize the sums again (a second rounding, and still 4-bit), and a
    sharded policy has no whole weights on any process: then the base is loaded once more (under
    QLoRA dequantized to float32, the weights the trained model's matmuls used) and the saved
    adapter merged into that."""
    quantized = quantization(cfg, torch.float32)
    if quantized is None and not cfg.fsdp:
        return merge_and_unload(policy)
    from peft import PeftModel
    base = load_causal_lm(cfg.model, torch.device("cpu"), torch.float32, trainable=False,
                          quantization_config=quantized, model_init_kwargs=cfg.model_init_kwargs)
    return PeftModel.from_pretrained(base.dequantize() if quantized else base, str(adapter_dir)).merge_and_unload()
