"""The sampler's draw against torch.multinomial, at the vocabulary sizes of the demo and of real models.

    .venv/bin/python -m bench.sampler [--rows 64] [--vocab 104 32000 151936] [--repeats 30] [--threads 1]

One draw of one token per row from a [rows, vocabulary] log-probability tensor, as a decode step
makes it: `grpo.engine.sequences.categorical` (the exponential race in log space, exponentials
by inversion of uniforms) against `torch.multinomial(logp.exp(), 1)` (the same race, with
`Tensor.exponential_`). Both draw the same distribution (tests/test_sampling_options.py). The two
alternate call by call, `--repeats` times each, and the table gives the median milliseconds per
draw and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import set_threads
from grpo.engine.sequences import categorical


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs="+", default=[104, 32000, 151936])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.rows} rows, {args.threads} thread(s), median of {args.repeats} draws each, interleaved")
    print("| vocabulary | torch.multinomial ms | categorical ms | multinomial / categorical |")
    print("|---|---|---|---|")
    for vocab in args.vocab:
        logp = torch.log_softmax(torch.randn(args.rows, vocab, generator=generator) * 3, dim=-1)
        ours = lambda: categorical(logp, generator)  # noqa: E731
        theirs = lambda: torch.multinomial(logp.exp(), 1, generator=generator)  # noqa: E731
        ours(), theirs()  # first calls allocate
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(theirs))
            b.append(timed(ours))
        ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(f"| {vocab} | {ta:.3f} | {tb:.3f} | {ta / tb:.1f}x |")


if __name__ == "__main__":
    main()
