"""How much of an agent rollout re-prefills the conversation: the case for a KV cache across turns.

    .venv/bin/python -m bench.agent_prefill --rollouts 5

The local engine generates each turn of every episode from its whole context (prompt, earlier
turns, tool results): the prompt forward of turn t re-reads every token turn t-1 already read.
A cache kept across turns would prefill only the tokens added since (the tool result and the
next turn's header). This times, on the calculator demo's rollouts (its warm start, 8 prompts x
8 episodes, temperature 0.5, at most 3 turns and 128 tokens, one thread, as `grpo demo --task
calculator` trains), the prompt forward of every turn, and splits the tokens it reads into those
an earlier turn of the same episode already read and the new ones.

Printed per turn: the seconds in prompt forwards, the share of the rollout they are, and the share
of their tokens that were already read. A cache across turns saves at most the re-read share of
turns 2+ (less: it would still pay for longer cache reads and per-episode bookkeeping).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=5, help="rollouts timed (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0, help="the warm start's seed")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    args = ap.parse_args(argv)

    import torch

    import grpo.engine.decoders as decoders
    from grpo.agents import backend_generate, run_episodes
    from grpo.engine.backend import LocalBackend, SamplingParams
    from grpo.engine.models import load_tokenizer
    from grpo.recipes import calculator as calc
    from transformers import AutoModelForCausalLM

    from bench.agents_vs_trl import read_rows, warm_start

    torch.set_num_threads(1)
    warm = warm_start(Path(args.models_dir), args.seed)
    tokenizer = load_tokenizer(str(warm / "model"))
    model = AutoModelForCausalLM.from_pretrained(warm / "model", dtype=torch.float32).eval()
    rows = read_rows(warm / "train.jsonl")
    g = calc.GRPO
    backend = LocalBackend(model, tokenizer)
    params = SamplingParams(group_size=g["group_size"], max_new_tokens=g["max_completion_length"], strategy="sample",
                            temperature=g["temperature"], top_p=1.0, top_k=0)
    generator = torch.Generator().manual_seed(args.seed)

    # Each call of the episode loop's generate is one turn of the episodes still running; the
    # prefill inside it reads their whole contexts.
    turn = {"i": 0}
    stats: dict[int, dict] = {}
    prefill = decoders.prefill

    def timed_prefill(model, kwarg, keep, prompt_ids, prompt_mask):
        t = time.perf_counter()
        try:
            return prefill(model, kwarg, keep, prompt_ids, prompt_mask)
        finally:
            s = stats.setdefault(turn["i"], {"seconds": 0.0, "tokens": 0, "reread": 0, "padded": 0})
            s["seconds"] += time.perf_counter() - t
            s["padded"] += prompt_ids.numel()
            s["tokens"] += int(prompt_mask.sum())
    decoders.prefill = timed_prefill

    base = backend_generate(backend, tokenizer, params, generator)
    ended: list[list[int]] = []  # each context of the turn before, with what it sampled

    def generate(contexts, max_new_tokens):
        turn["i"] += 1
        out = base(contexts, max_new_tokens)
        s = stats[turn["i"]]
        # A context extends the one its episode had a turn earlier (plus the tokens sampled then):
        # those tokens were read before.
        for context in contexts:
            s["reread"] += max((len(p) for p in ended if context[:len(p)] == p), default=0)
        ended[:] = [list(c) + list(o.token_ids) for c, o in zip(contexts, out)]
        return out

    per_rollout = []
    for r in range(args.rollouts + 1):
        batch = [rows[(r * g["prompts_per_step"] + i) % len(rows)] for i in range(g["prompts_per_step"])]
        prompts = [row["prompt"] for row in batch for _ in range(g["group_size"])]
        turn["i"] = 0
        stats.clear()
        ended.clear()
        t = time.perf_counter()
        with torch.no_grad():
            run_episodes(tokenizer, prompts, generate, tools=[calc.multiply], max_turns=g["max_turns"],
                         max_completion_length=g["max_completion_length"], stop_token_ids=backend.stop_token_ids)
        total = time.perf_counter() - t
        if r:
            per_rollout.append({"total": total, "turns": {k: dict(v) for k, v in stats.items()}})

    print(f"Calculator rollouts ({g['prompts_per_step']} x {g['group_size']} episodes, temperature "
          f"{g['temperature']}, <= {g['max_turns']} turns), median of {args.rollouts} after one warm-up; "
          f"warm start {warm}.\n")
    print("| turn | prompt-forward s | of the rollout | tokens read | of which read by an earlier turn |")
    print("|---|---|---|---|---|")
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    total = med([p["total"] for p in per_rollout])
    turns = sorted({t for p in per_rollout for t in p["turns"]})
    for t in turns:
        sec = med([p["turns"].get(t, {}).get("seconds", 0.0) for p in per_rollout])
        tok = med([p["turns"].get(t, {}).get("tokens", 0) for p in per_rollout])
        rer = med([p["turns"].get(t, {}).get("reread", 0) for p in per_rollout])
        print(f"| {t} | {sec:.3f} | {sec / total:.1%} | {tok:.0f} | {rer / tok if tok else 0:.0%} |")
    later = med([sum(s["seconds"] * s["reread"] / max(s["tokens"], 1) for k, s in p["turns"].items() if k > 1)
                 for p in per_rollout])
    print(f"\nRollout: {total:.3f} s (median). Re-read tokens' share of turns 2+'s prompt forwards, "
          f"pro rata: {later:.3f} s = {later / total:.1%} of the rollout, the most a cache across turns saves.")


if __name__ == "__main__":
    main()
