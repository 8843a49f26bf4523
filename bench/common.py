"""Shared pieces of the benchmarks: the two locally built models, the workload, FLOP counting,
the matmul roofline and the timing/memory bookkeeping of one worker process.

Everything here runs in a *worker* subprocess (one system, one model, one measurement), so that
peak resident memory (VmHWM, `peak_rss_mib`) belongs to that system alone.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

# The model sizes, all with the character tokenizer of grpo.recipes.tasks. The two CPU sizes are
# Llama-architecture; max_positions covers the longest scaling run (512-token prompt + 256 tokens).
# qwen0.5b, for a GPU, has Qwen2-0.5B's shapes (its config.json: 24 layers, hidden 896, 14 query
# and 2 key/value heads, qkv biases, tied 151,936-row embedding; 494M parameters); the tokenizer
# only names its first 19 ids, so decoded completions drop the others (the same for both systems).
MODELS = {
    "1m": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_positions=1024),
    "30m": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1792, max_positions=1024),
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                     intermediate_size=4864, vocab_size=151936, max_positions=4096),
}


def save_qwen2(directory: Path, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
               intermediate_size: int, vocab_size: int, max_positions: int, seed: int = 0) -> Path:
    """A randomly initialised Qwen2-architecture model with the character tokenizer, saved."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo.recipes.tasks import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_models(root: Path, sizes=("1m", "30m")) -> dict[str, Path]:
    """Build (once) and save the benchmark models named in `sizes`; name -> directory."""
    from grpo.recipes.tasks import save_tiny_model
    out = {}
    for name in sizes:
        kwargs = dict(MODELS[name])
        d = root / name
        if not (d / "config.json").exists():
            if kwargs.pop("arch", "llama") == "qwen2":
                save_qwen2(d, **kwargs)
            else:
                save_tiny_model(d, seed=0, **kwargs)
        out[name] = d
    return out


def addition_rows(n: int = 2000):
    from grpo.recipes.tasks import addition_problems
    return addition_problems()[0][:n]


def long_prompt_rows(prompt_len: int, n: int = 64):
    """Addition prompts left-filled with spaces-and-digits noise up to `prompt_len` characters, so
    the prompt length (and the shared-prefix cost) can be scaled with the same task and reward."""
    import random
    rng = random.Random(0)
    rows = []
    for a, b in [(rng.randrange(100), rng.randrange(100)) for _ in range(n)]:
        q = f"{a}+{b}="
        filler = "".join(rng.choice("0123456789 ") for _ in range(max(0, prompt_len - len(q))))
        rows.append({"prompt": filler + q, "answer": str(a + b)})
    return rows


def exact_answer(prompts, completions, answer=None, **_):
    """The reward both systems use: 1 when the completion is exactly the sum."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


# ----------------------------------------------------------------------------------------------
# FLOPs, counted analytically (multiply-add = 2 FLOPs) for a Llama decoder: per token per layer the
# q,k,v,o projections (4 d^2 with full-head kv) and the gated MLP (3 d i), plus the LM head (d V),
# plus attention scores and values: 2 * 2 * ctx * d per token per layer (ctx = tokens attended).

def model_dims(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, L, i, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    return dict(d=d, L=L, V=V, matmul_params=L * (2 * d * d + 2 * d * kv + 3 * d * i) + d * V)


def forward_flops(dims: dict, rows: int, new: int, past: int = 0) -> float:
    """FLOPs of a forward pass over `new` tokens per row that attend to `past` cached tokens
    (causal: token j of the new ones sees past + j + 1 positions)."""
    linear = 2.0 * dims["matmul_params"] * rows * new
    ctx = rows * (new * past + new * (new + 1) / 2)
    attention = 2.0 * 2.0 * dims["d"] * dims["L"] * ctx
    return linear + attention


def step_flops(dims: dict, prompt_lengths: list[int], G: int, lengths: list[int]) -> dict[str, float]:
    """The FLOPs one GRPO step cannot do without (one update per rollout, beta > 0), for the
    completions that were actually sampled: rows p*G .. p*G+G-1 belong to prompt p, whose real
    (unpadded) length is prompt_lengths[p]; row i has lengths[i] tokens up to and including EOS.

    One forward over the work is: each prompt once (its G completions share it), and each row's
    completion tokens but the last (which predicts nothing). Generation runs exactly that forward
    (prefill + decode steps), the reference scores it once, the update runs it forward and
    backward (backward = 2x forward). Padding, a prompt repeated G times and tokens after EOS are
    not counted: a system that computes them does more work than the step needs, and is charged
    for it as lower FLOP/s.
    """
    fwd = 0.0
    for p, Lp in enumerate(prompt_lengths):
        fwd += forward_flops(dims, 1, Lp)
        for n in lengths[p * G:(p + 1) * G]:
            fwd += forward_flops(dims, 1, max(n - 1, 0), Lp)
    return {"generation": fwd, "logprobs": fwd, "update": 3 * fwd, "total": 5 * fwd}


def matmul_flops_per_s(n: int = 2048, repeats: int = 10, device: str = "cpu", dtype: str = "float32") -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the machine's practical peak for
    these models (fp32 2048^2 on the CPU; on a GPU, e.g. bf16 8192^2)."""
    import torch
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(times)


# Vendor dense bf16 peaks (no sparsity), for model FLOP utilisation against the datasheet as well as
# against the measured matmul. Matched against torch.cuda.get_device_name().
NOMINAL_BF16_FLOPS = {"H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12, "H200": 989.4e12,
                      "A100": 312.0e12, "L40S": 362.1e12}


def nominal_peak(device_name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_FLOPS.items() if k in device_name), None)


# ----------------------------------------------------------------------------------------------

def rss(field: str) -> int:
    """VmRSS or VmHWM (the high-water mark) of this process, in bytes (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (or since `reset_peak`).

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a worker started by a driver
    that holds torch and a built model would report at least the driver's resident memory."""
    if Path("/proc/self/status").exists():
        return rss("VmHWM") / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def emit(result: dict) -> None:
    """A worker's one line of output, picked up by the driver."""
    result.setdefault("peak_rss_mib", peak_rss_mib())  # a worker that reset the peak reports its own
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        torch = sys.modules["torch"]
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["device_name"] = torch.cuda.get_device_name()
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def pipeline_preferences(out: Path, seed: int, prefix: str) -> None:
    """The seed pipeline's preference pairs of its warm start under `out` (`sft/`, `data/`), as
    `data/{prefix}_train.jsonl` and `data/{prefix}_heldout.jsonl`; a file already there is kept."""
    from grpo.config import PreferenceConfig, build
    from grpo.recipes.pipeline import HELDOUT_PREFERENCE_PROMPTS, PREFERENCE_PROMPTS, PREFERENCES
    from grpo.recipes.preferences import make_preferences

    for name, n in (("train", PREFERENCE_PROMPTS), ("heldout", HELDOUT_PREFERENCE_PROMPTS)):
        path = out / "data" / f"{prefix}_{name}.jsonl"
        if not path.exists():
            cfg = build(PreferenceConfig, {"model": str(out / "sft"), "dataset": str(out / "data" / f"{name}.jsonl"),
                                           "num_prompts": n, "seed": seed, "output_file": str(path), **PREFERENCES})
            make_preferences(cfg, quiet=True)
