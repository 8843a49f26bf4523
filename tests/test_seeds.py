"""A run's random streams: each named, each from the run's seed, no two alike."""

import itertools

import pytest

from grpo.runtime.seeds import STREAMS, stream_seed


def test_no_two_streams_of_a_run_share_a_seed():
    seeds = [stream_seed(s, name, i) for s in range(3) for name in STREAMS for i in range(64)]
    assert len(set(seeds)) == len(seeds)


def test_a_ranks_sampling_never_meets_an_iterative_round():
    """The offsets this replaces gave rank r and round r one seed (seed * 1000 + r)."""
    for r in range(8):
        assert stream_seed(0, "rollout", r) not in {stream_seed(0, n, r) for n in STREAMS if n != "rollout"}


def test_a_stream_is_the_same_in_every_process_and_fits_every_generator():
    import random

    import torch

    for name, i in itertools.product(STREAMS, (0, 7)):
        seed = stream_seed(42, name, i)
        assert seed == stream_seed(42, name, i) and 0 <= seed < 2**63
        torch.Generator().manual_seed(seed + 1000)  # the prompt sampler adds the epoch
        random.Random(seed)


def test_an_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="unknown stream 'rolout'"):
        stream_seed(0, "rolout")
