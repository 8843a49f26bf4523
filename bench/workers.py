"""One measurement of one system in its own process: `python -m bench.workers ours|trl|matmul ...`.

Prints one `RESULT {json}` line: per-step seconds (after warm-up) with their split into
generation / log-probs (reference, and old when computed) / update, completion tokens per step and
peak RSS of this process.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import addition_rows, emit, exact_answer, long_prompt_rows, matmul_flops_per_s, set_threads


def workload_rows(args):
    return addition_rows() if args.prompt_len == 0 else long_prompt_rows(args.prompt_len)


# ----------------------------------------------------------------------------------------------

def run_ours(args) -> dict:
    import torch

    from grpo.config import TrainConfig
    from grpo.engine.models import load_tokenizer, pick_device, pick_dtype
    from grpo.rewards import Reward
    from grpo.runs.models import load_models
    from grpo.runtime.distributed import World
    from grpo.runtime.optim import make_optimizer, make_scheduler
    from grpo.runtime.precision import Precision
    from grpo.runtime.setup import RunSetup
    from grpo.runtime.timing import synced_time as clock
    from grpo.train.rollout import collect_rollout
    from grpo.train.update import update

    torch.manual_seed(0)
    cfg = TrainConfig(model=args.model, prompts_per_step=args.prompts, group_size=args.group,
                      max_completion_length=args.tokens, temperature=1.0, beta=0.04, num_iterations=1,
                      num_minibatches=1, micro_batch_size=args.prompts * args.group, learning_rate=1e-6,
                      max_prompt_length=4096, dtype=args.dtype, device=args.device, num_threads=args.threads,
                      generation=args.generation, rollout_backend=args.backend,
                      # With vLLM sampling, what `grpo train` defaults to: TRL's truncated correction.
                      **({"off_policy_correction": "token", "off_policy_cap": 3.0} if args.backend == "vllm" else {}),
                      rewards=[{"function": "exact_answer"}])
    # As `grpo train` sets them up: float32 weights, forwards in cfg.dtype (grpo.runtime.precision).
    device = pick_device(cfg.device)
    precision = Precision(device, pick_dtype(cfg.dtype, device))
    tokenizer = load_tokenizer(args.model)
    world = World()
    policy, reference = load_models(cfg, RunSetup(device, precision, world, None))
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, args.warmup + args.steps)
    rewards = [Reward(name="exact_answer", fn=exact_answer, weight=1.0)]
    generator = torch.Generator(device=device).manual_seed(0)
    rows = workload_rows(args)
    backend = None
    if args.backend == "vllm":  # as grpo train starts it (grpo.train.loop.backend_options)
        from grpo.engine.backend import make_backend
        from grpo.engine.vllm_backend import VLLMOptions
        backend = make_backend("vllm", policy, tokenizer, options=VLLMOptions(
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, dtype=precision.dtype,
            max_num_seqs=args.prompts * args.group))

    import grpo.engine.backend
    import grpo.engine.decoders
    timings = {"prefill": 0.0}
    prefill = grpo.engine.decoders.prefill

    def timed_prefill(*a, **k):
        t = time.perf_counter()
        try:
            return prefill(*a, **k)
        finally:
            timings["prefill"] += time.perf_counter() - t
    grpo.engine.decoders.prefill = timed_prefill
    if args.engine != "auto" or args.full_length:
        gen = grpo.engine.backend.generate_groups

        def patched(*a, **k):
            if args.full_length:
                k["eos_token_id"] = [-1]  # never sampled: every completion runs max_new_tokens
            return gen(*a, engine=args.engine, **k)
        grpo.engine.backend.generate_groups = patched

    steps = []
    for step in range(args.warmup + args.steps):
        batch = [rows[(step * args.prompts + i) % len(rows)] for i in range(args.prompts)]
        timings["prefill"] = 0.0
        t0 = clock(device)
        rollout = collect_rollout(policy, reference, tokenizer, batch, rewards, cfg, generator, precision=precision,
                                  backend=backend)
        t1 = clock(device)
        update(policy, optimizer, scheduler, rollout, cfg, world, generator, precision)
        if backend is not None:
            backend.sync_weights(policy)  # part of the update: every step ends with the engine in sync
        t2 = clock(device)
        if step >= args.warmup:
            steps.append(dict(total=t2 - t0, generation=rollout.timings["generate"],
                              logprobs=rollout.timings["logprobs"], update=t2 - t1,
                              other=rollout.timings["score"], prefill=timings["prefill"],
                              tokens=int(rollout.completion_mask.sum()),
                              gen_cols=int(rollout.completion_ids.shape[1]),
                              prompt_lengths=rollout.prompt_mask[::args.group].sum(1).tolist(),
                              lengths=rollout.lengths.tolist()))
    return dict(system="ours", steps=steps)


# ----------------------------------------------------------------------------------------------

class _Timer:
    """Accumulates wall time spent inside wrapped callables (one bucket per name), read with
    grpo's `synced_time` (which first waits for queued CUDA work on a GPU)."""

    def __init__(self, device):
        from grpo.runtime.timing import synced_time as clock
        self.buckets: dict[str, float] = {}
        self.depth = 0
        self.now = lambda: clock(device)

    def wrap(self, name, fn):
        def timed(*a, **k):
            # Nested timed calls (e.g. a log-prob helper called from inside the loss) count once,
            # in the outermost bucket.
            if self.depth:
                return fn(*a, **k)
            self.depth += 1
            t = self.now()
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                self.buckets[name] = self.buckets.get(name, 0.0) + self.now() - t
        return timed


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    # float32 weights by default; with --dtype bfloat16 the Trainer's bf16=True computes under
    # autocast (accelerate wraps each forward): the same master-weights arrangement as ours. TRL
    # loads its reference in the model's dtype too. --trl-weights bfloat16 is the pure-bf16 setup
    # of many TRL GPU recipes (faster, but AdamW's small steps round away in bf16 weights).
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.trl_weights))
    cuda = args.device == "cuda"
    rows = workload_rows(args)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    out = tempfile.mkdtemp(prefix="trl-bench-")
    total = args.warmup + args.steps
    config = GRPOConfig(
        output_dir=out, report_to="none", use_cpu=not cuda, bf16=args.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1, num_generations=args.group, max_completion_length=args.tokens,
        beta=0.04, num_iterations=1, temperature=1.0, learning_rate=1e-6, max_steps=total,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=0, loss_type="grpo", scale_rewards="group", shuffle_dataset=False,
        **trl_version_kwargs(args),
        # --backend vllm: TRL's own vLLM, colocated in the training process, as ours.
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
           if args.backend == "vllm" else dict(use_vllm=False)),
        # Same work as ours with --full-length: no EOS before max_completion_length.
        **({"generation_kwargs": {"min_new_tokens": args.tokens}} if args.full_length else {}))
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    # The split: generation = the unwrapped model's generate; log-probs = the per-token log-prob
    # helper called outside the loss (reference, and old when TRL computes it); update = the rest
    # of the step. The helper is called from the loss too, so time inside compute_loss is
    # excluded from the log-prob bucket.
    timer = _Timer(torch.device(args.device))
    trainer.model.generate = timer.wrap("generation", trainer.model.generate)
    llm = getattr(trainer, "llm", None) or getattr(getattr(trainer, "vllm_generation", None), "llm", None)
    if llm is not None:  # use_vllm colocate: TRL's engine generates
        llm.generate = timer.wrap("generation", llm.generate)
    lp_name = "_get_per_token_logps_and_entropies" if hasattr(trainer, "_get_per_token_logps_and_entropies") \
        else "_get_per_token_logps"
    setattr(trainer, lp_name, timer.wrap("logprobs", getattr(trainer, lp_name)))
    trainer.compute_loss = timer.wrap("loss", trainer.compute_loss)
    # Completion and prompt lengths per step, from the batch TRL builds (completion mask 1 up to
    # and including EOS; prompt mask 1 on real prompt tokens).
    batches: list[dict] = []
    build = trainer._generate_and_score_completions

    def counted(*a, **k):
        out = build(*a, **k)
        batches.append(dict(tokens=int(out["completion_mask"].sum()),
                            prompt_lengths=out["prompt_mask"][::args.group].sum(1).tolist(),
                            lengths=out["completion_mask"].sum(1).tolist()))
        return out
    trainer._generate_and_score_completions = counted

    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            timer.buckets.clear()
            self.t0 = timer.now()

        def on_step_end(self, a, state, control, **kw):
            dt = timer.now() - self.t0
            if state.global_step > args.warmup:
                gen, lp = timer.buckets.get("generation", 0.0), timer.buckets.get("logprobs", 0.0)
                steps.append(dict(total=dt, generation=gen, logprobs=lp, update=dt - gen - lp,
                                  gen_cols=args.tokens, **batches[-1]))

    trainer.add_callback(Clock())
    trainer.train()
    return dict(system="trl", steps=steps, trl_version=__import__("trl").__version__)


def trl_version_kwargs(args) -> dict:
    """GRPOConfig fields that moved between TRL releases, set only where this version has them."""
    from trl import GRPOConfig
    fields = GRPOConfig.__dataclass_fields__
    kw = {}
    if "max_prompt_length" in fields:
        kw["max_prompt_length"] = None  # no truncation (ours does none either)
    if "mask_truncated_completions" in fields:
        kw["mask_truncated_completions"] = False
    if "top_k" in fields:
        kw["top_k"] = 0
    if "top_p" in fields:
        kw["top_p"] = 1.0
    if "log_completions" in fields:
        kw["log_completions"] = False
    if "disable_dropout" in fields:
        kw["disable_dropout"] = True
    if "model_init_kwargs" in fields:
        pass
    return kw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["ours", "trl", "matmul"])
    ap.add_argument("--model", default="")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=0, help="0: the plain addition prompts")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="auto", choices=["auto", "plain"], help="ours: generation engine")
    ap.add_argument("--generation", default="sample", choices=["sample", "beam"], help="ours: groups by")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (weights stay float32 in both systems)")
    ap.add_argument("--trl-weights", default="float32", choices=["float32", "bfloat16"],
                    help="trl: the dtype its model (and so its reference) is loaded in")
    ap.add_argument("--backend", default="local", choices=["local", "vllm"],
                    help="rollouts by the local engine, or by vLLM colocated (ours: rollout_backend; trl: use_vllm)")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--full-length", action="store_true",
                    help="no early EOS: every completion is --tokens long (both systems)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.system == "matmul":
        if args.device == "cuda":  # a bf16 8192^2 is the tensor cores' practical peak
            emit(dict(system="matmul", flops_per_s=matmul_flops_per_s(8192, 20, "cuda", args.dtype)))
        else:
            emit(dict(system="matmul", flops_per_s=matmul_flops_per_s(dtype=args.dtype)))
        return
    result = run_ours(args) if args.system == "ours" else run_trl(args)
    emit(result)


if __name__ == "__main__":
    main()
