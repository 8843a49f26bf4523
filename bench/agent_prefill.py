"""What re-prefilling the conversation costs an agent rollout, and what keeping the KV cache saves.

    .venv/bin/python -m bench.agent_prefill --rollouts 5

Without a cache kept across turns, the local engine generates each turn of every episode from
its whole context (prompt, earlier turns, tool results): the prompt forward of turn t re-reads
every token turn t-1 already read. With it (the default: `grpo.agents.backend_generate` on the
local engine), turn t prefills only the tokens added since (the tool result and the next turn's
header) after the keys and values it kept. This runs the calculator demo's rollouts (its warm
start, 8 prompts x 8 episodes, temperature 0.5, at most 3 turns and 128 tokens, one thread, as
`grpo demo --task calculator` trains) both ways, interleaved, and times the prompt forward of
every turn (`decoders.prefill` and `decoders.prefill_after`).

Printed per way and turn: the seconds in prompt forwards, their share of the rollout, the tokens
fed and the share of those an earlier turn of the same episode already read; and the rollout's
median seconds each way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=5, help="rollouts timed each way (after one warm-up each)")
    ap.add_argument("--seed", type=int, default=0, help="the warm start's seed")
    ap.add_argument("--models-dir", default="/tmp/grpo-bench-models")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import grpo.engine.decoders as decoders
    from bench.agents_vs_trl import read_rows, warm_start
    from grpo.agents import backend_generate, run_episodes
    from grpo.engine.backend import LocalBackend, SamplingParams
    from grpo.engine.models import load_tokenizer
    from grpo.recipes import calculator as calc

    torch.set_num_threads(1)
    warm = warm_start(Path(args.models_dir), args.seed)
    tokenizer = load_tokenizer(str(warm / "model"))
    model = AutoModelForCausalLM.from_pretrained(warm / "model", dtype=torch.float32).eval()
    rows = read_rows(warm / "train.jsonl")
    g = calc.GRPO
    params = SamplingParams(group_size=g["group_size"], max_new_tokens=g["max_completion_length"], strategy="sample",
                            temperature=g["temperature"], top_p=1.0, top_k=0)

    class Whole(LocalBackend):
        keeps_cache = False

    # Each call of the episode loop's generate is one turn of the episodes still running.
    turn = {"i": 0}
    stats: dict[int, dict] = {}

    def timed(fn, fed):
        def wrapped(*a):
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                s = stats.setdefault(turn["i"], {"seconds": 0.0, "tokens": 0, "reread": 0})
                s["seconds"] += time.perf_counter() - t
                s["tokens"] += fed(*a)
        return wrapped

    def kept_tokens(past):
        return sum(0 if p is None else p.length for p in past)
    decoders.prefill = timed(decoders.prefill, lambda m, kw, keep, ids, mask: int(mask.sum()))
    decoders.prefill_after = timed(decoders.prefill_after,
                                   lambda m, kw, keep, ids, mask, past: int(mask.sum()) - kept_tokens(past))

    def rollout(backend, r: int) -> dict:
        base = backend_generate(backend, tokenizer, params, torch.Generator().manual_seed(r))
        ended: list[list[int]] = []  # each context of the turn before, with what it sampled

        def generate(contexts, max_new_tokens):
            turn["i"] += 1
            out = base(contexts, max_new_tokens)
            # A context extends the one its episode had a turn earlier (plus the tokens sampled
            # then): those tokens were read before, and fed again unless their cache was kept.
            reread = sum(max((len(p) for p in ended if c[:len(p)] == p), default=0) for c in contexts)
            s = stats[turn["i"]]
            s["reread"] += reread if not backend.keeps_cache else 0
            ended[:] = [list(c) + list(o.token_ids) for c, o in zip(contexts, out)]
            return out

        batch = [rows[(r * g["prompts_per_step"] + i) % len(rows)] for i in range(g["prompts_per_step"])]
        prompts = [row["prompt"] for row in batch for _ in range(g["group_size"])]
        turn["i"] = 0
        stats.clear()
        t = time.perf_counter()
        with torch.no_grad():
            run_episodes(tokenizer, prompts, generate, tools=[calc.multiply], max_turns=g["max_turns"],
                         max_completion_length=g["max_completion_length"], stop_token_ids=backend.stop_token_ids)
        return {"total": time.perf_counter() - t, "turns": {k: dict(v) for k, v in stats.items()}}

    ways = {"cache kept": LocalBackend(model, tokenizer), "whole context": Whole(model, tokenizer)}
    runs: dict[str, list] = {w: [] for w in ways}
    for r in range(args.rollouts + 1):
        for way, backend in ways.items():
            res = rollout(backend, r)
            if r:  # the first of each is a warm-up
                runs[way].append(res)

    print(f"Calculator rollouts ({g['prompts_per_step']} x {g['group_size']} episodes, temperature "
          f"{g['temperature']}, <= {g['max_turns']} turns), median of {args.rollouts} each way after one warm-up, "
          f"interleaved; warm start {warm}.\n")
    print("| way | turn | prompt-forward s | of the rollout | tokens fed | of which an earlier turn read |")
    print("|---|---|---|---|---|---|")
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    totals = {}
    for way, per in runs.items():
        totals[way] = total = med([p["total"] for p in per])
        for t in sorted({t for p in per for t in p["turns"]}):
            sec = med([p["turns"].get(t, {}).get("seconds", 0.0) for p in per])
            tok = med([p["turns"].get(t, {}).get("tokens", 0) for p in per])
            rer = med([p["turns"].get(t, {}).get("reread", 0) for p in per])
            print(f"| {way} | {t} | {sec:.3f} | {sec / total:.1%} | {tok:.0f} | {rer / tok if tok else 0:.0%} |")
    print()
    for way, total in totals.items():
        print(f"Rollout, {way}: {total:.3f} s (median).")
    whole, kept = totals["whole context"], totals["cache kept"]
    print(f"Keeping the cache: {whole / kept:.2f}x the rollouts per second ({100 * (whole - kept) / whole:.0f}% less "
          f"time).")


if __name__ == "__main__":
    main()
