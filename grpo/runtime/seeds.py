"""Every random stream of a run, drawn from the run's one `seed` and named by what it draws.

A stream's seed hashes the run seed, the stream's name and its index (a process's rank, an
evaluation's step, an iterative-RL round), so no two streams of a run share a seed: offsets like
`seed * 1000 + rank` and `seed * 1000 + round` collide as soon as a rank equals a round.
"""

from __future__ import annotations

import hashlib

STREAMS = (
    "rollout",              # a process's sampling of its groups (index: the rank)
    "eval",                 # held-out sampling with num_generations_eval > 1 (index: the step)
    "iterative_prompts",    # the prompts an iterative-RL round samples
    "iterative_sampling",   # that round's completions (the same on every process)
    "iterative_pairs",      # which labelled completions a round pairs (index: the round)
    "iterative_batches",    # the reward model's batches in a round (index: the round)
)


def stream_seed(seed: int, stream: str, index: int = 0) -> int:
    """The seed of `stream` number `index` of a run seeded `seed`: 63 bits, fit for
    torch.Generator.manual_seed and random.Random."""
    if stream not in STREAMS:
        raise ValueError(f"stream_seed: unknown stream {stream!r}; one of {', '.join(STREAMS)}")
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
