"""A step's seconds, phase by phase: each phase its own, a phase that comes back summed."""

import time

from grpo.runtime.timing import PhaseTimer


def test_each_phase_counts_only_its_own_seconds():
    timer = PhaseTimer()
    with timer.phase("update"):
        time.sleep(0.05)
    with timer.phase("sync_weights"):
        pass
    with timer.phase("update"):
        time.sleep(0.05)
    assert 0.1 <= timer.seconds["update"] < 0.5 and timer.seconds["sync_weights"] < 0.05
    assert timer.total() == sum(timer.seconds.values())


def test_a_phase_that_raises_is_still_counted():
    timer = PhaseTimer()
    try:
        with timer.phase("rollout"):
            raise KeyError
    except KeyError:
        pass
    assert "rollout" in timer.seconds
