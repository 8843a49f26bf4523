"""Reward functions that return the wrong thing or try to end the process, called through
grpo.rewards.score as the trainer calls them: None on a large scale, values that are not real
numbers, values beyond float32's range, sys.exit and os._exit."""

from __future__ import annotations

import asyncio
import decimal
import fractions
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from grpo.errors import RewardError
from grpo.rewards import build_rewards, score
from grpo.rewards.scoring import FLOAT32_MAX

CPU = torch.device("cpu")
PROMPTS, COMPLETIONS = ["p1", "p1", "p2", "p2"], ["a", "b", "c", "d"]


def rewards_of(*fns, weights=None):
    entries = [fn if weights is None else {"function": fn, "weight": w} for fn, w in zip(fns, weights or fns)]
    return build_rewards(entries, CPU, torch.float32)


def returning(values, name="r"):
    def fn(prompts, completions, **kwargs):
        return values
    fn.__name__ = name
    return fn


def scored(*fns, **kw):
    return score(rewards_of(*fns, **kw), PROMPTS, COMPLETIONS, {})


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "grpo.rewards" and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------
# None: "does not apply" (TRL), loud on a large scale.

def test_some_none_is_nan_in_its_values_and_counts_zero_in_the_total(caplog):
    total, per = scored(returning([1.0, None, 2.0, None], "a"), returning([None, 3.0, 1.0, None], "b"),
                        weights=[1.0, 2.0])
    assert per["a"][1].isnan() and per["b"][0].isnan()
    assert total.tolist() == [1.0, 6.0, 4.0, 0.0]
    # Completion 3 has no reward at all: a warning, once, with the count and the rewards.
    assert warnings_of(caplog) == ["grpo: warning: 1 of 4 completions got no reward at all (each of ['a', 'b'] "
                                   "returned None for them); they count 0 in the total; shown once"]


def test_a_reward_that_applies_to_no_completion_warns_once_naming_it(caplog):
    rewards = rewards_of(returning([1.0, 0.0, 1.0, 0.0], "exact"), returning([None] * 4, "code_tests"))
    for _ in range(3):  # three steps, one warning
        total, per = score(rewards, PROMPTS, COMPLETIONS, {})
    assert total.tolist() == [1.0, 0.0, 1.0, 0.0] and per["code_tests"].isnan().all()
    assert warnings_of(caplog) == ["grpo: warning: reward 'code_tests' returned None for all 4 completions of a "
                                   "step (it does not apply to any of them); shown once"]


def test_completions_without_any_reward_warn_once_per_run(caplog):
    rewards = rewards_of(returning([1.0, None, None, 0.0], "a"), returning([None, None, 2.0, 0.0], "b"))
    score(rewards, PROMPTS, COMPLETIONS, {})
    score(rewards, PROMPTS, COMPLETIONS, {})
    assert len(warnings_of(caplog)) == 1 and "1 of 4 completions got no reward at all" in warnings_of(caplog)[0]
    caplog.clear()
    score(rewards_of(returning([1.0, None, None, 0.0], "a")), PROMPTS, COMPLETIONS, {})  # a new run's rewards
    assert len(warnings_of(caplog)) == 1


def test_a_step_with_no_reward_at_all_is_an_error():
    with pytest.raises(RewardError, match=r"no reward applied to any of the 4 completions: every one of "
                                          r"\['a', 'b'\] returned None"):
        scored(returning([None] * 4, "a"), returning([None] * 4, "b"))


# ---------------------------------------------------------------------------------------------
# Values that are not real numbers.

@pytest.mark.parametrize("value, shown", [
    ("1.0", "'1.0' (str)"),
    (b"1", "\"b'1'\" (bytes)"),
    ([1.0], "'[1.0]' (list)"),
    (1 + 0j, "'(1+0j)' (complex)"),
    (torch.tensor([1.0, 2.0]), "(Tensor)"),
    (np.array([1.0, 2.0]), "(ndarray)"),
    (np.str_("1"), "'1' (str_)"),
])
def test_a_value_that_is_not_a_real_number_is_refused_naming_function_value_and_type(value, shown):
    with pytest.raises(RewardError) as e:
        scored(returning([0.0, value, 0.0, 0.0], "as_text"))
    message = str(e.value)
    assert message.startswith("reward 'as_text' returned ") and f"{shown} for completion 1" in message
    assert "expected a real number (int, float or bool) or None" in message


def test_real_numbers_of_every_kind_are_accepted_and_bool_counts_as_one_or_zero():
    values = [True, False, np.float32(0.5), np.int64(-2)]
    assert scored(returning(values))[0].tolist() == [1.0, 0.0, 0.5, -2.0]
    values = [np.bool_(True), decimal.Decimal("0.25"), fractions.Fraction(3, 4), 7]
    assert scored(returning(values))[0].tolist() == [1.0, 0.25, 0.75, 7.0]
    # Whole arrays and tensors (their elements: numpy scalars, 0-d tensors), bool tensors too.
    assert scored(returning(np.array([1, 0, 1, 0])))[0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert scored(returning(torch.tensor([0.5, 1.5, -1.0, 0.0])))[0].tolist() == [0.5, 1.5, -1.0, 0.0]
    assert scored(returning(torch.tensor([True, False, False, True])))[0].tolist() == [1.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Values beyond float32 (they would become inf, then NaN advantages: a run that trains nothing).

@pytest.mark.parametrize("value, message", [
    (1e39, r"returned 1e\+39 for completion 2, beyond float32's range"),
    (-1e39, r"returned -1e\+39 for completion 2, beyond float32's range"),
    (float("inf"), r"returned inf for completion 2, beyond float32's range"),
    (float("-inf"), r"returned -inf for completion 2, beyond float32's range"),
    (10 ** 40, r"returned 1" + "0" * 40 + " for completion 2, beyond float32's range"),
    (float("nan"), r"returned NaN for completion 2; return None for 'does not apply'"),
    (np.float64("nan"), r"returned NaN for completion 2"),
])
def test_values_beyond_float32_and_nan_are_refused_naming_function_and_value(value, message):
    with pytest.raises(RewardError, match=r"^reward 'huge' " + message):
        scored(returning([0.0, 1.0, value, 0.0], "huge"))


def test_the_largest_float32_is_accepted_but_a_weighted_sum_beyond_it_is_refused():
    total, _ = scored(returning([FLOAT32_MAX, -FLOAT32_MAX, 0.0, 1.0]))
    assert torch.isfinite(total).all() and total[0].item() == FLOAT32_MAX
    with pytest.raises(RewardError, match=r"the weighted sum of the rewards of completion 1 "
                                          r"\(1 \* 3e\+38 \+ 1 \* 3e\+38 = 6e\+38\) is beyond float32's range"):
        scored(returning([0.0, 3e38, 0.0, 0.0], "a"), returning([0.0, 3e38, 0.0, 0.0], "b"))
    with pytest.raises(RewardError, match=r"weighted sum of the rewards of completion 0 \(10 \* 1e\+38 = 1e\+39\)"):
        scored(returning([1e38, 0.0, 0.0, 0.0]), weights=[10.0])


# ---------------------------------------------------------------------------------------------
# A reward function cannot end the process.

@pytest.fixture
def fake_exit(monkeypatch):
    """os._exit replaced by a recorder before scoring: were the guard to let a reward's call
    through, the test fails instead of ending pytest with status 0."""
    calls = []

    def recorder(status):
        calls.append(status)
        raise AssertionError(f"the real os._exit({status}) was reached")

    monkeypatch.setattr(os, "_exit", recorder)
    return calls, recorder


def exits(how):
    def quits(prompts, completions, **kwargs):
        if how == "sys.exit":
            sys.exit(0)
        if how == "exit":
            exit(3)
        os._exit(0)
    return quits


@pytest.mark.parametrize("how, call", [("sys.exit", "sys.exit(0)"), ("exit", "exit(3)"), ("os._exit", "os._exit(0)")])
def test_a_reward_that_ends_the_process_is_a_reward_error(fake_exit, how, call):
    calls, recorder = fake_exit
    shown = re.escape(call.replace("exit(3)", "sys.exit(3)") if how == "exit" else call)
    with pytest.raises(RewardError, match=rf"^reward 'quits' called {shown} "
                                          rf"\(at .*test_reward_faults.py:\d+, in quits\): a reward function must "
                                          rf"return its values, not end the process"):
        scored(returning([1.0] * 4, "fine"), exits(how))
    assert calls == [] and os._exit is recorder  # restored after the error


@pytest.mark.parametrize("how", ["sys.exit", "os._exit"])
def test_an_async_reward_that_ends_the_process_is_named(fake_exit, how):
    calls, recorder = fake_exit

    async def other(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.0] * len(completions)

    async def quits_async(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        sys.exit(0) if how == "sys.exit" else os._exit(0)

    with pytest.raises(RewardError, match=rf"^reward 'quits_async' called {how}\(0\) \(at .*, in quits_async\)"):
        scored(other, quits_async)
    assert calls == [] and os._exit is recorder


def test_a_reward_that_catches_what_os_exit_raised_is_still_an_error(fake_exit):
    calls, _ = fake_exit

    def stubborn(prompts, completions, **kwargs):
        try:
            os._exit(1)
        except BaseException:
            return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"^reward 'stubborn' called os._exit\(1\) \(and caught what it raised\)"):
        scored(stubborn)
    assert calls == []


def test_os_exit_from_a_thread_a_reward_started_is_an_error(fake_exit):
    calls, _ = fake_exit

    def spawns(prompts, completions, **kwargs):
        failure = []

        def work():
            try:
                os._exit(0)
            except RewardError as e:
                failure.append(e)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        raise failure[0]

    with pytest.raises(RewardError, match=r"reward 'spawns' failed: RewardError: a thread started while rewards "
                                          r"\['spawns'\] were scored called os._exit\(0\)"):
        scored(spawns)
    assert calls == []


def test_the_guard_is_installed_once_and_restored_when_the_last_overlapping_call_ends(fake_exit):
    calls, recorder = fake_exit
    inside, release = threading.Event(), threading.Event()

    def slow(prompts, completions, **kwargs):
        inside.set()
        release.wait(10)
        return [1.0] * len(completions)

    def seen(prompts, completions, **kwargs):
        return [float(os._exit is not recorder)] * len(completions)

    other = threading.Thread(target=scored, args=(slow,))
    other.start()
    assert inside.wait(10)
    guard = os._exit
    assert guard is not recorder
    assert scored(seen)[0].tolist() == [1.0] * 4  # a second call while the first runs: the same guard
    assert os._exit is guard  # the first call still runs: still guarded
    release.set()
    other.join(10)
    assert os._exit is recorder and calls == []


def test_os_exit_from_the_main_thread_goes_through_while_rewards_are_scored(fake_exit):
    """A signal handler's hard exit (the main thread waits on the reward threads) is not a reward's."""
    calls, recorder = fake_exit
    from grpo.rewards.scoring import _EXIT_GUARD

    with _EXIT_GUARD.installed(["r"]):
        assert os._exit is not recorder
        with pytest.raises(AssertionError, match=r"the real os._exit\(5\) was reached"):
            os._exit(5)
    assert calls == [5] and os._exit is recorder


def test_a_real_os_exit_in_a_reward_does_not_end_the_process(tmp_path):
    """The real thing, in a process of its own: the reward's os._exit(0) becomes an error."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import os, torch
        from grpo.errors import RewardError
        from grpo.rewards import build_rewards, score
        def bye(prompts, completions, **kwargs):
            os._exit(0)
        try:
            score(build_rewards([bye], torch.device("cpu"), torch.float32), ["p"], ["c"], {})
        except RewardError as e:
            print("refused:", e)
            raise SystemExit(2)
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2, run.stderr
    assert "refused: reward 'bye' called os._exit(0)" in run.stdout
