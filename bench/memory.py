"""Peak memory of one GRPO step, grpo vs TRL, for full fine-tuning, LoRA, gradient checkpointing
and both, as the completion length grows.

    .venv/bin/python -m bench.memory --trl-python .venv-bench/bin/python

Model: Qwen2 architecture with Qwen2-0.5B's vocabulary and width (151,936 x 896, tied embedding,
14 query / 2 key-value heads, MLP 4864, qkv biases) and `--layers` decoder layers (default 2):
the LM head and the logits are what a 0.5B-8B model's memory is about at these lengths, and a few
layers keep a CPU step to minutes. Random weights, the character tokenizer of grpo.recipes.tasks.

Work, the same for both systems: 8 prompts x 8 completions (`--prompts/--group`), every
completion forced to its full length (EOS never sampled: ours drops EOS from the stop set, TRL
generates with `min_new_tokens`), completion lengths 32/64/128 (`--tokens`), temperature 1,
beta 0.04 (both compute reference log-probs), one update per rollout, float32 weights and AdamW
(the fused kernel in both: TRL's default optim, adamw_torch_fused, which ours takes with `--optim`),
one forward over the whole batch (ours: micro_batch_size 64; TRL: per_device_train_batch_size 64),
or with `--micro-batch m` m rows per forward in both (ours: micro_batch_size m; TRL:
per_device_train_batch_size m, gradient_accumulation_steps 64 / m: the same one optimizer step).
LoRA: r 16, alpha 32, dropout 0, all linear layers (peft, in both); the reference is the base
model with the adapter off (both). Gradient checkpointing: Hugging Face's, non-reentrant (both).
Ours runs its defaults for this vocabulary: the chunked LM head (`--chunk` tokens at a time,
default 128; 0: off), the MLP keeping two of its four activations and running a row chunk at a
time where it keeps none (`mlp_activations: auto`), and glibc's mmap threshold fixed at 1 MiB
(`malloc_mmap_threshold: -1`, grpo.runtime.host_memory: freed tensors leave the process at once).
TRL runs at glibc's default; `--trl-mmap-threshold 1048576` runs it a second time with the same
fixed threshold, so the table shows what the allocator setting alone is worth to it.

Each measurement is one step in a fresh subprocess; its peak RSS (VmHWM) includes the Python
process, torch and the loaded model, so the baseline after loading is printed too. Measurements
are interleaved (ours, TRL, ours, TRL, ...) so that machine drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench.bench_vs_trl import run_worker
from bench.common import MODELS, emit, exact_answer, peak_rss_mib, reset_peak, rss, save_qwen2, set_threads

MODES = {"full": dict(lora=False, gc=False), "lora": dict(lora=True, gc=False),
         "checkpointing": dict(lora=False, gc=True), "lora+checkpointing": dict(lora=True, gc=True)}
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def build_model(root: Path, layers: int) -> Path:
    d = root / f"qwen0.5b-vocab-{layers}layers"
    if not (d / "config.json").exists():
        shape = {k: v for k, v in MODELS["qwen0.5b"].items() if k != "arch"}
        save_qwen2(d, **{**shape, "num_layers": layers})
    return d


# ----------------------------------------------------------------------------------------------
# Workers: one step of one system in this process.

class PhasePeaks:
    """`--phases` (ours): the peak RSS of each phase of the step, generation, the reference and
    old-policy scoring, the update's forward, its backward, the optimizer step, by resetting the
    kernel's high-water mark (VmHWM, `/proc/self/clear_refs`) between them (Linux)."""

    PHASES = {"generate": ("grpo.engine.backend", "generate_groups"),
              "score (pi_ref, pi_old)": ("grpo.train.rollout", "batched_logprobs"),
              "update forward": ("grpo.train.update", "completion_logprobs"),
              "backward": ("grpo.runtime.precision", "Precision.backward"),
              "optimizer step": ("grpo.runtime.precision", "Precision.step")}

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.starts: dict[str, float] = {}  # the RSS the phase began from (the first call)

    def _wrap(self, name, fn):
        def wrapped(*a, **k):
            self.peaks[name] = max(self.peaks.get(name, 0.0), rss("VmHWM") / 2**20)  # what came before
            self.starts.setdefault(name, rss("VmRSS") / 2**20)
            reset_peak()
            try:
                return fn(*a, **k)
            finally:
                self.peaks[name] = max(self.peaks[name], rss("VmHWM") / 2**20)
                reset_peak()
        return wrapped

    def install(self) -> None:
        import importlib
        for name, (module, attr) in self.PHASES.items():
            owner = importlib.import_module(module)
            if "." in attr:
                cls, attr = attr.split(".")
                owner = getattr(owner, cls)
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def table(self) -> str:
        return "\n".join(f"  {name:24s} from {self.starts[name]:7.0f} MiB, peak RSS {mib:7.0f} MiB"
                         for name, mib in self.peaks.items())

def run_ours(args) -> dict:
    import torch

    import grpo.engine.backend
    from grpo.config import TrainConfig
    from grpo.engine.adapters import add_lora, trainable_parameters
    from grpo.engine.models import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
    from grpo.rewards import Reward
    from grpo.runtime import host_memory
    from grpo.runtime.distributed import World
    from grpo.runtime.optim import make_optimizer, make_scheduler
    from grpo.runtime.precision import Precision
    from grpo.train.rollout import collect_rollout
    from grpo.train.update import update

    torch.manual_seed(0)
    n = args.prompts * args.group
    cfg = TrainConfig(model=args.model, prompts_per_step=args.prompts, group_size=args.group,
                      max_completion_length=args.tokens, temperature=1.0, beta=0.04, num_iterations=1,
                      num_minibatches=1, micro_batch_size=args.micro_batch or n, learning_rate=1e-6,
                      max_prompt_length=4096, dtype="float32", device="cpu", num_threads=args.threads, optim=args.optim,
                      logprob_chunk_size=args.chunk, malloc_mmap_threshold=args.malloc_mmap_threshold,
                      rewards=[{"function": "exact_answer"}])
    device = torch.device("cpu")
    precision = Precision(device, torch.float32)
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, device, torch.float32)
    if args.lora:
        policy = add_lora(policy, **LORA)
        reference = policy  # pi_ref = the base model: the policy with its adapter off
    else:
        reference = load_causal_lm(args.model, device, torch.float32, trainable=False)
    if args.gc:
        enable_gradient_checkpointing(policy)
    host_memory.configure(cfg, policy, device)  # as grpo.train.loop does
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, 1)
    loaded = peak_rss_mib()

    phases = PhasePeaks() if args.phases else None
    if phases:
        phases.install()
    generate = grpo.engine.backend.generate_groups

    def full_length(*a, **k):
        k["eos_token_id"] = [-1]  # never sampled: every completion runs max_new_tokens
        return generate(*a, **k)
    grpo.engine.backend.generate_groups = full_length

    from grpo.recipes.tasks import addition_problems
    rows = addition_problems()[0][:args.prompts]
    generator = torch.Generator(device=device).manual_seed(0)
    rewards = [Reward(name="exact_answer", fn=exact_answer, weight=1.0)]
    rollout = collect_rollout(policy, reference, tokenizer, rows, rewards, cfg, generator, precision=precision)
    update(policy, optimizer, scheduler, rollout, cfg, World(), generator, precision)
    out = dict(system="ours", rss_after_load_mib=loaded, tokens=int(rollout.completion_mask.sum()),
               trainable=trainable_parameters(policy))
    if phases:  # the high-water mark was reset between phases: the step's peak is the largest of them
        print(phases.table(), flush=True)
        out.update(phase_peaks_mib=phases.peaks, peak_rss_mib=max(phases.peaks.values()))
    return out


def run_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bench.workers import trl_version_kwargs

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    from grpo.recipes.tasks import addition_problems
    rows = addition_problems()[0][:args.prompts]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    peft_config = None
    if args.lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    n = args.prompts * args.group
    micro = args.micro_batch or n
    if n % micro:
        raise SystemExit(f"--micro-batch {micro} does not divide {n} completions")
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-memory-"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=args.gc, per_device_train_batch_size=micro,
        gradient_accumulation_steps=n // micro, num_generations=args.group, max_completion_length=args.tokens,
        beta=0.04, num_iterations=1, temperature=1.0, learning_rate=1e-6, max_steps=1,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=0, loss_type="grpo", scale_rewards="group", use_vllm=False, shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": args.tokens}, **trl_version_kwargs(args))
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    loaded = peak_rss_mib()
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return dict(system="trl", rss_after_load_mib=loaded, trl_version=__import__("trl").__version__,
                trainable=trainable)


def worker(argv) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["ours", "trl"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=-1)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--optim", default="adamw_torch_fused")
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--phases", action="store_true", help="ours: print the peak RSS of each phase of the step")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="trl: fix glibc's mmap threshold at this many bytes first (what ours' "
                         "malloc_mmap_threshold does; 0: glibc's default)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=-1,
                    help="ours: its malloc_mmap_threshold setting (0: glibc's default; -1: ours' default)")
    args = ap.parse_args(argv)
    if args.mmap_threshold:
        from grpo.runtime.host_memory import set_mmap_threshold
        assert set_mmap_threshold(args.mmap_threshold)
    # Names bench.workers' TRL helpers read.
    args.device, args.dtype, args.full_length = "cpu", "float32", True
    set_threads(args.threads)
    emit(run_ours(args) if args.system == "ours" else run_trl(args))


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=-1,
                    help="ours: LM-head chunk (tokens); 0: whole logits; -1: ours' default (128 at this vocabulary)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optim", default="adamw_torch_fused", help="ours (TRL runs its default, adamw_torch_fused)")
    ap.add_argument("--micro-batch", type=int, default=0, help="rows per forward, both systems (0: all 64 at once)")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    ap.add_argument("--model", default="", help="use this model directory instead of building one")
    ap.add_argument("--python", default=sys.executable, help="interpreter for grpo's runs")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl and peft installed")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-mmap-threshold", type=int, default=0,
                    help="also run TRL with glibc's mmap threshold fixed at this many bytes (1048576: "
                         "what ours sets for this vocabulary), beside TRL at glibc's default")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    ap.add_argument("--json", default="", help="also write raw results here")
    args = ap.parse_args(argv)
    command = "python -m bench.memory " + " ".join(shlex.quote(a) for a in argv)
    from grpo.cli import quiet_libraries

    quiet_libraries()  # building the model would print transformers' progress bars among the rows
    model = args.model or str(build_model(Path(args.models_dir), args.layers))
    systems = ["ours"] + ([] if args.skip_trl else ["trl"] + ["trl-mmap"] * bool(args.trl_mmap_threshold))
    raw = []
    for T in args.tokens:
        for mode in args.modes:
            for system in systems:
                extra = [system.split("-")[0], "--model", model, "--prompts", str(args.prompts),
                         "--group", str(args.group), "--tokens", str(T), "--threads", str(args.threads),
                         "--chunk", str(args.chunk), "--optim", args.optim, "--micro-batch", str(args.micro_batch)]
                extra += ["--lora"] * MODES[mode]["lora"] + ["--gc"] * MODES[mode]["gc"]
                if system == "trl-mmap":
                    extra += ["--mmap-threshold", str(args.trl_mmap_threshold)]
                py = args.python if system == "ours" else args.trl_python
                res = run_worker(py, "worker", extra, timeout=args.timeout, module="bench.memory")
                res.update(T=T, mode=mode, system=system)
                raw.append(res)
                print(f"[T={T} {mode}] {system:8s} peak RSS {res['peak_rss_mib']:.0f} MiB "
                      f"(after loading {res['rss_after_load_mib']:.0f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print()
    print(report(raw, args, command, model))


def report(raw: list[dict], args, command: str, model: str) -> str:
    cfg = json.loads((Path(model) / "config.json").read_text())
    lines = [f"Peak RSS of one GRPO step: {args.prompts} prompts x {args.group} completions forced to T tokens, "
             f"beta 0.04, float32, CPU, {args.threads} threads; Qwen2 {cfg['vocab_size']} x {cfg['hidden_size']} "
             f"(tied), {cfg['num_hidden_layers']} layers; ours with logprob_chunk_size {args.chunk} "
             f"and optim {args.optim} (TRL: its default, adamw_torch_fused); "
             f"{args.micro_batch or args.prompts * args.group} rows per forward.",
             f"Command: `{command}`", "",
             "| T | mode | ours peak MiB | TRL peak MiB | ours / TRL | TRL peak, threshold fixed | ours / that "
             "| ours after load | TRL after load | trainable params (ours / TRL) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["T"], r["mode"], r["system"]): r for r in raw}

    def cell(r, key, fmt="{:.0f}"):
        return fmt.format(r[key]) if r else ""

    def ratio(a, b):
        return f"{a['peak_rss_mib'] / b['peak_rss_mib']:.1%}" if a and b else ""
    for T in args.tokens:
        for mode in args.modes:
            ours, trl, fixed = (by.get((T, mode, s)) for s in ("ours", "trl", "trl-mmap"))
            lines.append(f"| {T} | {mode} | {cell(ours, 'peak_rss_mib')} | {cell(trl, 'peak_rss_mib')} | "
                         f"{ratio(ours, trl)} | {cell(fixed, 'peak_rss_mib')} | {ratio(ours, fixed)} | "
                         f"{cell(ours, 'rss_after_load_mib')} | {cell(trl, 'rss_after_load_mib')} | "
                         f"{cell(ours, 'trainable', '{:,}')} / {cell(trl, 'trainable', '{:,}')} |")
    versions = {r.get("trl_version") for r in raw if r.get("trl_version")}
    if versions:
        lines += ["", f"TRL {', '.join(sorted(versions))}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
