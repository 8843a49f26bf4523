"""Step ends mapped to tokens: the one-pass incremental decoder against the prefix bisection.

    .venv/bin/python -m bench.step_ends [--rows 64] [--tokens 20 200 1000] [--steps 4 10 20] [--repeats 5]

Process supervision maps every step end of every completion from characters to tokens at every
optimizer step (`grpo.data.steps.char_ends_to_tokens_batch`). Two paths give the same tokens here
(checked on every call): the tokenizer's incremental decoder (`tokenizers`' DecodeStream) in one
pass over each completion, and the bisection over decoded prefixes that tokenizers without one
take (`DecodeStream` set to None), each search in lockstep with one `batch_decode` per round.
The tokenizer is a byte-level BPE trained here on reasoning-like lines (its tokens span several
characters); each completion is `--tokens` tokens cut into `--steps` lines. The two alternate,
`--repeats` times each; the table gives the median milliseconds per batch and their ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from grpo.data import steps


def tokenizer(rng: random.Random):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line(rng, 40) for _ in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


WORDS = ["First", "we", "add", "and", "then", "multiply", "by", "so", "the", "answer", "is", "which", "gives",
         "=", "+", "*", "(", ")", "étape", "résultat"]


def line(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randrange(1000)) for _ in range(words))


def completions(tok, rng: random.Random, rows: int, tokens: int, n_steps: int):
    """rows completions of about `tokens` tokens in `n_steps` lines: (ids, character ends, lengths)."""
    out_ids, out_ends, lengths = [], [], []
    for _ in range(rows):
        text = "\n".join(line(rng, max(1, tokens // n_steps)) for _ in range(n_steps))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out_ids.append(ids)
        out_ends.append(steps.delimiter_ends(tok.decode(ids), "\n"))
        lengths.append(len(ids) + 1)
    return out_ids, out_ends, lengths


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="+", default=[20, 200, 1000])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 10, 20], help="steps per completion, one per --tokens")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if len(args.steps) != len(args.tokens):
        raise SystemExit("--steps needs one value per --tokens value")
    rng = random.Random(0)
    tok = tokenizer(rng)
    stream = steps.DecodeStream
    print(f"{args.rows} completions per batch, median of {args.repeats} batches each, interleaved")
    print("| tokens per completion (mean) | steps | prefix bisection, ms | one pass, ms | speedup |")
    print("|---|---|---|---|---|")
    for tokens, n_steps in zip(args.tokens, args.steps):
        ids, ends, lengths = completions(tok, rng, args.rows, tokens, n_steps)
        fast, slow = [], []
        for _ in range(args.repeats):
            steps.DecodeStream = None
            seconds, by_prefix = timed(lambda: steps.char_ends_to_tokens_batch(tok, ids, ends, lengths))
            slow.append(seconds)
            steps.DecodeStream = stream
            seconds, by_stream = timed(lambda: steps.char_ends_to_tokens_batch(tok, ids, ends, lengths))
            fast.append(seconds)
            if by_prefix != by_stream:
                raise SystemExit("the two paths disagree")
        a, b = statistics.median(slow) * 1e3, statistics.median(fast) * 1e3
        print(f"| {statistics.mean(map(len, ids)):.0f} | {n_steps} | {a:.1f} | {b:.1f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
