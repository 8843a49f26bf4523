"""Real model sizes through `grpo train`: LoRA (peft), gradient checkpointing, FSDP2 under torchrun,
chunked log-probs; each exact where the maths says it must be, and each resumable exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import TrainConfig, build
from grpo.train.loop import train
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def small(tiny_model_dir, addition_files, out, **kw):
    values = dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(out),
                  rewards=["answer_distance"], prompts_per_step=2, group_size=4, max_completion_length=4,
                  max_steps=2, learning_rate=1e-2, max_prompt_length=16, report_to=[], beta=0.04)
    values.update(kw)
    return build(TrainConfig, values)


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def test_lora_trains_the_adapter_only_and_its_reference_is_the_base_exactly(tiny_model_dir, addition_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train(small(tiny_model_dir, addition_files, tmp_path / "lora", peft=LORA), quiet=True)
    # pi_ref is the base model with the adapter off: at the first step (B = 0) it is pi_theta exactly.
    assert metrics(out)[0]["loss/kl"] == 0.0 and metrics(out)[1]["loss/kl"] > 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    lora = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    for k, v in base.state_dict().items():  # the base weights did not move
        assert torch.equal(adapted.get_base_model().state_dict()[k.replace(".weight", ".base_layer.weight")]
                           if k.replace(".weight", ".base_layer.weight") in adapted.get_base_model().state_dict()
                           else adapted.get_base_model().state_dict()[k], v), k


def test_lora_stores_its_frozen_base_in_the_compute_dtype_and_the_adapter_in_float32(tiny_model_dir, addition_files,
                                                                                       tmp_path):
    """Under bf16 the base LoRA never updates is kept in bf16 (half of full fine-tuning's float32
    master copy), the adapter, the only thing the optimizer moves, in float32; pi_ref is still
    the base exactly (KL 0 at the first step) and a resumed run ends bit for bit where the
    uninterrupted one did."""
    from grpo.runs.models import load_models
    from grpo.runtime.precision import Precision
    from grpo.runtime.setup import RunSetup

    cfg = small(tiny_model_dir, addition_files, tmp_path / "bf16", peft=LORA, dtype="bfloat16", max_steps=4,
                save_steps=2)
    cpu = torch.device("cpu")
    policy, reference = load_models(cfg, RunSetup(cpu, Precision(cpu, torch.bfloat16), None, None))
    assert reference is policy
    trained = {n: p.dtype for n, p in policy.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in policy.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32} and all("lora_" in n for n in trained)
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    out = train(cfg, quiet=True)
    assert metrics(out)[0]["loss/kl"] == 0.0 and metrics(out)[-1]["loss/kl"] > 0
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(out / "checkpoint-2", part / "checkpoint-2")
    train(small(tiny_model_dir, addition_files, part, peft=LORA, dtype="bfloat16", max_steps=4, save_steps=2),
          resume=True, quiet=True)
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_merge_adapter_writes_a_plain_model(tiny_model_dir, addition_files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = train(small(tiny_model_dir, addition_files, tmp_path / "merged", peft=LORA, merge_adapter=True), quiet=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in merged.state_dict().items())


QLORA = {**LORA, "quantization": "nf4"}


def test_qlora_trains_a_4bit_base_and_merges_into_a_plain_model(tiny_model_dir, addition_files, tmp_path):
    """peft.quantization through `grpo train`: pi_ref is the 4-bit base (KL 0 at the first step),
    the adapter trains, and merge_adapter writes a plain float32 model (no quantization left in
    its config) that computes what the trained 4-bit model with its adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grpo.engine.adapters import quantization_config
    from grpo.engine.models import load_causal_lm
    from grpo.engine.logprobs import completion_logprobs

    out = train(small(tiny_model_dir, addition_files, tmp_path / "q", peft=QLORA, merge_adapter=True), quiet=True)
    assert metrics(out)[0]["loss/kl"] == 0.0 and metrics(out)[1]["loss/kl"] > 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith(("proj", "lm_head")))
    four_bit = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32, trainable=False,
                              quantization_config=quantization_config("nf4", False, torch.float32))
    trained = PeftModel.from_pretrained(four_bit, str(out / "adapter")).eval()
    g = torch.Generator().manual_seed(0)
    V = merged.config.vocab_size
    ids = torch.randint(0, V, (4, 6), generator=g)
    comp, mask = torch.randint(0, V, (4, 5), generator=g), torch.ones(4, 5)
    with torch.no_grad():
        want = completion_logprobs(trained, ids, torch.ones_like(ids), comp, mask, engine="plain")[0]
        got = completion_logprobs(merged, ids, torch.ones_like(ids), comp, mask, engine="plain")[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra", [{"peft": LORA}, {"peft": QLORA}, {"gradient_checkpointing": True},
                                   {"logprob_chunk_size": 3}])
def test_resume_is_exact_in_every_mode(tiny_model_dir, addition_files, tmp_path, extra):
    full = tmp_path / "full"
    train(small(tiny_model_dir, addition_files, full, max_steps=4, save_steps=2, **extra), quiet=True)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train(small(tiny_model_dir, addition_files, part, max_steps=4, save_steps=2, **extra), resume=True, quiet=True)
    name = "adapter_model.safetensors" if "peft" in extra else "model.safetensors"
    a, b = load_file(str(full / name)), load_file(str(part / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [{"gradient_checkpointing": True}, {"logprob_chunk_size": 3}])
def test_checkpointing_and_chunked_logprobs_change_no_result(tiny_model_dir, addition_files, tmp_path, extra):
    """End to end (the gradients themselves are compared in tests/test_engine_options.py and
    tests/test_lmhead.py): the same samples, losses and, to AdamW's amplification of fp32
    rounding in near-zero gradients, the same weights."""
    plain = train(small(tiny_model_dir, addition_files, tmp_path / "plain", learning_rate=1e-3), quiet=True)
    other = train(small(tiny_model_dir, addition_files, tmp_path / "other", learning_rate=1e-3, **extra), quiet=True)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(other / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    for x, y in zip(metrics(plain), metrics(other)):
        assert x["reward/mean"] == y["reward/mean"]  # the same samples
        assert x["loss/total"] == pytest.approx(y["loss/total"], rel=1e-5, abs=1e-7)


def torchrun(args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "grpo.cli", "train", "--quiet", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]


def test_fsdp_in_one_process_says_to_start_it_with_torchrun(tiny_model_dir, addition_files, tmp_path):
    from grpo.config import ConfigError, TrainConfig, build
    from grpo.train.loop import train

    cfg = build(TrainConfig, dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(tmp_path / "o"),
                                  rewards=["answer_distance"], fsdp=True, report_to=[]))
    with pytest.raises(ConfigError, match="fsdp: sharding needs two or more processes.*torchrun"):
        train(cfg, quiet=True)


def torchrun_settings(tiny_model_dir, addition_files):
    return ["--set", f"model={tiny_model_dir}", "--set", f"dataset={addition_files['train']}",
            "--set", "rewards=[answer_distance]", "--set", "prompts_per_step=2", "--set", "group_size=4",
            "--set", "max_completion_length=4", "--set", "max_steps=4", "--set", "save_steps=2",
            "--set", "num_threads=1", "--set", "learning_rate=1e-3", "--set", "report_to=[]",
            # the chunked LM head (what a 151,936-token vocabulary gets by default): under fsdp
            # it runs on the root unit's weights outside the model's forward
            "--set", "logprob_chunk_size=3"]


def test_fsdp_under_torchrun_matches_plain_data_parallel_and_resumes_exactly(tiny_model_dir, addition_files, tmp_path):
    common = torchrun_settings(tiny_model_dir, addition_files)
    torchrun([*common, "--set", f"output_dir={tmp_path / 'ddp'}"], tmp_path)
    torchrun([*common, "--set", f"output_dir={tmp_path / 'fsdp'}", "--set", "fsdp=true"], tmp_path)
    assert (tmp_path / "fsdp" / "checkpoint-2" / "sharded").is_dir()
    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    fsdp = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert ddp.keys() == fsdp.keys()
    # Sharded gradients are the summed ones: the same training, to fp32 rounding. Four Adam steps
    # at lr 1e-3 move every weight by ~4e-3 (each step is ~lr * g / |g|), so a wrong sum shows at
    # that size; where g is near zero the summation order's rounding moves a weight by a small
    # fraction of lr, which 1e-4 allows.
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-4)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", part / "checkpoint-2")
    torchrun([*common, "--set", f"output_dir={part}", "--set", "fsdp=true", "--resume"], tmp_path)
    resumed = load_file(str(part / "model.safetensors"))
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)


def test_fsdp_with_lora_matches_plain_data_parallel_resumes_exactly_and_merges(tiny_model_dir, addition_files,
                                                                                tmp_path):
    """fsdp + peft: the base and the adapter sharded, the reference the sharded base with the
    adapter off (beta > 0): the same adapter as plain data parallel to fp32 rounding, a sharded
    checkpoint that resumes bit for bit, and with merge_adapter the adapter plus a merged plain
    model."""
    from transformers import AutoModelForCausalLM

    common = [*torchrun_settings(tiny_model_dir, addition_files), "--set", "beta=0.04",
              "--set", "peft={r: 4, alpha: 8, target_modules: all-linear}"]
    torchrun([*common, "--set", f"output_dir={tmp_path / 'ddp'}"], tmp_path)
    torchrun([*common, "--set", f"output_dir={tmp_path / 'fsdp'}", "--set", "fsdp=true", "--set", "merge_adapter=true"],
             tmp_path)
    from torch.distributed.checkpoint import FileSystemReader
    stored = FileSystemReader(str(tmp_path / "fsdp" / "checkpoint-2" / "sharded")).read_metadata().state_dict_metadata
    weights = [k for k in stored if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights)  # the adapter only: the frozen base is loaded again
    name = "adapter_model.safetensors"
    ddp, fsdp = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "fsdp" / "adapter" / name))
    assert ddp.keys() == fsdp.keys() and all("lora_" in k for k in ddp)
    assert any(v.abs().sum() > 0 for k, v in fsdp.items() if "lora_B" in k)
    for k in ddp:  # fp32 rounding in near-zero gradients, which AdamW's normalised step (lr 1e-3) amplifies
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-4)
    from peft import PeftModel
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     str(tmp_path / "fsdp" / "adapter")).merge_and_unload().state_dict()
    assert all(torch.equal(v, want[k]) for k, v in merged.state_dict().items())
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", part / "checkpoint-2")
    torchrun([*common, "--set", f"output_dir={part}", "--set", "fsdp=true", "--set", "merge_adapter=true", "--resume"],
             tmp_path)
    resumed = load_file(str(part / "adapter" / name))
    assert resumed.keys() == fsdp.keys() and all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)


def test_malloc_mmap_threshold_auto_is_for_large_vocabularies_on_a_cpu_only():
    from types import SimpleNamespace

    from grpo.errors import ConfigError
    from grpo.runtime.host_memory import mmap_threshold

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = TrainConfig(model="m", rewards=[{"function": "exact_answer"}])
    assert cfg.malloc_mmap_threshold == -1
    assert mmap_threshold(cfg, model(151_936), cpu) == 1 << 20
    assert mmap_threshold(cfg, model(64), cpu) == 0 and mmap_threshold(cfg, model(151_936), cuda) == 0
    cfg.malloc_mmap_threshold = 0
    assert mmap_threshold(cfg, model(151_936), cpu) == 0
    cfg.malloc_mmap_threshold = 4096
    assert mmap_threshold(cfg, model(64), cpu) == 4096
    for value, says in ((-2, "must be >= -1"), (64 << 20, "at most 32 MiB")):
        with pytest.raises(ConfigError, match=f"malloc_mmap_threshold: .*{says}"):
            build(TrainConfig, {"model": "m", "dataset": "d.jsonl", "rewards": [{"function": "exact_answer"}],
                                "malloc_mmap_threshold": value})


# Tensors of 2 MiB that glibc's moving threshold puts on the heap (a freed 4 MiB mapping raised it),
# with small live ones between them so that the heap cannot shrink from its top: freed, they stay
# in the process unless the fixed threshold made each its own mapping.
_FRAGMENTS = """
import re, sys, torch
from grpo.runtime import host_memory
from types import SimpleNamespace
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
if sys.argv[1] == "fixed":
    cfg = SimpleNamespace(malloc_mmap_threshold=1 << 20)
    assert host_memory.configure(cfg, None, torch.device("cpu")) == 1 << 20
x = torch.ones(1 << 20)  # 4 MiB, mapped and unmapped: glibc's own threshold moves up to it
del x
big, small = [], []
for _ in range(64):
    big.append(torch.ones(1 << 19))   # 2 MiB
    small.append(torch.ones(1 << 12)) # 16 KiB, kept
before = rss()
big.clear()
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_a_fixed_mmap_threshold_hands_freed_tensors_back():
    """Freed 2 MiB tensors leave the process at once with the threshold fixed at 1 MiB (128 MiB of
    them); with glibc's default they stay in its heap."""
    def released(mode):
        out = subprocess.run([sys.executable, "-c", _FRAGMENTS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])
    assert released("fixed") > 100
    assert released("default") < 28
