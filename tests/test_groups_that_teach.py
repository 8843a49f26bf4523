"""Groups that teach, wired through the rollout and the update: dynamic sampling, the
off-policy correction against the distribution actually sampled (top-p), high-entropy token
selection over the whole minibatch, and short runs of the new variants."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from grpo.engine.backend import blocked_token_ids

from grpo import algorithm
from grpo.config import TrainConfig, build
from grpo.engine.models import load_causal_lm, load_tokenizer
from grpo.engine.sequences import filter_logits
from grpo.rewards import Reward
from grpo.runtime.distributed import World
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.train.loop import train
from grpo.train.rollout import batched_logprobs, collect_rollout
from grpo.train.update import update

pytestmark = pytest.mark.usefixtures("one_thread_module")


def config(tiny_model_dir, addition_files, **kw):
    values = dict(model=tiny_model_dir, dataset=addition_files["train"], rewards=[{"function": "exact_answer"}],
                  prompts_per_step=4, group_size=4, max_completion_length=4, max_prompt_length=16,
                  learning_rate=1e-3, beta=0.0, report_to=[])
    values.update(kw)
    return build(TrainConfig, values)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def by_kind(prompts, completions, kind, **columns):
    """Rows of kind "tied" score 1 on every completion; "mixed" rows alternate 0, 1 down the
    list, so every group of an even size has both (the list is rows x G in order)."""
    return [1.0 if k == "tied" else float(i % 2) for i, k in enumerate(kind)]


REWARD = [Reward("by_kind", by_kind)]


def rows_of(kinds, start=0):
    return [{"prompt": f"{start + i}+1=", "answer": "0", "kind": k} for i, k in enumerate(kinds)]


class Draws:
    """more_rows: hands out rows of the given kinds in order, and records every call."""

    def __init__(self, kinds):
        self.kinds, self.calls, self.rows = kinds, [], []

    def __call__(self, n):
        self.calls.append(n)
        at = 100 + len(self.rows)
        rows = rows_of([self.kinds[(len(self.rows) + i) % len(self.kinds)] for i in range(n)], at)
        self.rows += rows
        return rows


def test_dynamic_sampling_fills_the_batch_with_groups_that_teach(policy, tokenizer, tiny_model_dir, addition_files):
    cfg = config(tiny_model_dir, addition_files, dynamic_sampling=True, max_generation_rounds=4)
    g = torch.Generator().manual_seed(0)
    draws = Draws(["mixed", "tied", "tied", "mixed", "tied", "mixed", "mixed"])
    first = rows_of(["tied", "mixed", "tied", "tied"])
    rollout = collect_rollout(policy, None, tokenizer, first, REWARD, cfg, g, more_rows=draws)
    G, P = cfg.group_size, cfg.prompts_per_step
    assert len(rollout) == P * G  # the batch size is kept
    assert not algorithm.zero_variance_groups(rollout.rewards, G).any()  # and no tied group trains
    assert (rollout.advantages.view(P, G) != 0).any(1).all()
    s = rollout.sampling_stats
    # Round 1 kept 1 of 4; round 2 drew ceil(3 / (1/4)) = 12 -> capped at P = 4 rows, keeping 2;
    # round 3: rate 3/8, ceil(1 / 0.375) = 3 rows; enough.
    assert draws.calls == [4, 3] and s["dynamic_sampling/rounds"] == 3
    assert s["dynamic_sampling/prompts_generated"] == 11 and s["dynamic_sampling/groups_dropped"] == 7
    assert s["dynamic_sampling/tied_groups_kept"] == 0 and s["dynamic_sampling/zero_variance_frac"] == 6 / 11
    # Rows, prompts and completions stay aligned: the kept prompts are the first P "mixed" rows.
    mixed = [r["prompt"] for r in first + draws.rows if r["kind"] == "mixed"]
    assert rollout.prompts[::G] == mixed[:P] and len(mixed) == P + 1
    assert rollout.prompt_ids.shape[0] == rollout.completion_ids.shape[0] == len(rollout.completions)


def test_dynamic_sampling_round_bound(policy, tokenizer, tiny_model_dir, addition_files, monkeypatch):
    import itertools

    import grpo.train.rollout as rollout_module

    cfg = config(tiny_model_dir, addition_files, dynamic_sampling=True, max_generation_rounds=3)
    clock = itertools.count()  # each read one second later: every round generates and scores in 1 s
    monkeypatch.setattr(rollout_module, "synced_time", lambda device=None: float(next(clock)))
    draws = Draws(["tied"])
    rollout = collect_rollout(policy, None, tokenizer, rows_of(["tied", "mixed", "tied", "tied"]), REWARD, cfg,
                              torch.Generator().manual_seed(0), more_rows=draws)
    s = rollout.sampling_stats
    assert len(draws.calls) == 2 and s["dynamic_sampling/rounds"] == 3  # never more than the bound
    assert len(rollout) == cfg.prompts_per_step * cfg.group_size
    assert s["dynamic_sampling/tied_groups_kept"] == 3  # topped up, and logged
    assert int((~algorithm.zero_variance_groups(rollout.rewards, cfg.group_size)).sum()) == 1
    # Rounds 2 and 3 kept nothing, but the step's time is theirs too.
    assert rollout.timings["generate"] == 3.0 and rollout.timings["score"] == 3.0
    with pytest.raises(ValueError, match="more_rows"):
        collect_rollout(policy, None, tokenizer, rows_of(["tied"] * 4), REWARD, cfg, torch.Generator())


def test_sampler_logprobs_are_the_filtered_distribution_and_weights_correct_towards_it(
        policy, tokenizer, tiny_model_dir, addition_files):
    """With top-p the tokens come from the renormalised nucleus: the recorded sampler log-prob is
    log p(o_t) - log(mass kept), checked against the model's logits directly; the weight
    pi_old / pi_sampler is that kept mass (< 1) and the update reports its mean."""
    cfg = config(tiny_model_dir, addition_files, top_p=0.7, temperature=1.2, off_policy_correction="token",
                 rewards=[{"function": "answer_distance"}])
    rows = rows_of(["mixed"] * 4)
    rollout = collect_rollout(policy, None, tokenizer, rows, REWARD, cfg, torch.Generator().manual_seed(1))
    m = rollout.completion_mask.bool()
    with torch.no_grad():
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        att = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], 1)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        logits = policy(input_ids=ids, attention_mask=att, position_ids=pos).logits
    Lp = rollout.prompt_ids.shape[1]
    step_logits = logits[:, Lp - 1:-1].float() / 1.2
    full = torch.log_softmax(step_logits, -1)
    # What the sampler draws from: padding blocked (backend.blocked_token_ids), then the nucleus.
    blocked = torch.zeros(full.shape[-1], dtype=torch.bool)
    blocked[blocked_token_ids(tokenizer)] = True
    kept = torch.log_softmax(filter_logits(full.view(-1, full.shape[-1]), 0, 0.7, blocked=blocked), -1).view_as(full)
    token = rollout.completion_ids.unsqueeze(-1)
    torch.testing.assert_close(rollout.sampling_logprobs[m], kept.gather(2, token).squeeze(-1)[m], atol=1e-4, rtol=0)
    trainer = batched_logprobs(policy, rollout, 1.2, 64)
    w = algorithm.truncated_is_weights(trainer, rollout.sampling_logprobs, m, "token", 2.0)
    filtered = filter_logits(full.view(-1, full.shape[-1]), 0, 0.7, blocked=blocked)
    mass = torch.logsumexp(filtered, -1).exp().view(m.shape)
    torch.testing.assert_close(w[m], mass[m], atol=1e-4, rtol=0)
    assert (w[m] < 1 + 1e-5).all() and (w[m] < 0.999).any()
    model = copy.deepcopy(policy)
    opt = make_optimizer(model, cfg)
    stats = update(model, opt, make_scheduler(opt, cfg, 1), rollout, cfg, World(distributed=False),
                   torch.Generator().manual_seed(0))
    assert abs(stats["is_weight_mean"] - float(w[m].mean())) < 1e-4


def test_entropy_selection_is_over_the_minibatch_whatever_the_micro_batch(policy, tokenizer, tiny_model_dir,
                                                                           addition_files):
    """The threshold of top_entropy_quantile is the whole minibatch's: the same weights after a
    step with one micro-batch (threshold from the update's own forward) and with four (a pass
    without grad first)."""
    rows = rows_of(["mixed"] * 4)
    after = []
    for micro in (16, 4):
        cfg = config(tiny_model_dir, addition_files, top_entropy_quantile=0.3, micro_batch_size=micro)
        rollout = collect_rollout(policy, None, tokenizer, rows, REWARD, cfg, torch.Generator().manual_seed(2))
        model = copy.deepcopy(policy)
        opt = make_optimizer(model, cfg)
        stats = update(model, opt, make_scheduler(opt, cfg, 1), rollout, cfg, World(distributed=False),
                       torch.Generator().manual_seed(0))
        # The threshold is the interpolated 0.7-quantile of the n valid tokens: the tokens above sorted
        # position 0.7 (n - 1) are kept, which can be a hair under 30% of n; ties at it are kept too.
        n = int(rollout.completion_mask.sum())
        assert (n - math.ceil(0.7 * (n - 1))) / n <= stats["pg_token_frac"] < 0.45
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(after[0], torch.cat([p.detach().flatten() for p in policy.parameters()]))
    # Adam moves every weight by ~lr = 1e-3 in its first step: another selection would show. Its
    # step is g / sqrt(g^2), so where g is near zero the two micro-batchings' rounding moves a weight
    # by a small fraction of lr that differs between CPUs; 1e-4 is ten times below a real difference.
    torch.testing.assert_close(after[0], after[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra", [
    {"generation": "stochastic_beam", "advantage_estimator": "priority", "preset": "gmpo"},
    {"off_policy_correction": "sequence", "top_p": 0.9, "top_entropy_quantile": 0.5, "advantage_estimator": "rloo",
     "num_iterations": 2},
])
def test_new_variants_train(tiny_model_dir, addition_files, tmp_path, extra):
    cfg = config(tiny_model_dir, addition_files, output_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2,
                 **extra)
    out = train(cfg, quiet=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(v == v for line in lines for v in line.values() if isinstance(v, float))
    if "off_policy_correction" in extra:
        assert 0 < lines[0]["loss/is_weight_mean"] <= 2 and 0 < lines[0]["loss/pg_token_frac"] < 1


def test_config_rejects_what_cannot_work(tiny_model_dir, addition_files):
    from grpo.errors import ConfigError
    for bad, key in [({"off_policy_correction": "token", "generation": "beam"}, "off_policy_correction"),
                     ({"advantage_estimator": "priority"}, "advantage_estimator"),
                     ({"policy_loss": "gmpo", "ratio_level": "sequence"}, "ratio_level"),
                     ({"top_entropy_quantile": 0.0}, "top_entropy_quantile"),
                     ({"off_policy_cap": 0.5}, "off_policy_cap"),
                     ({"max_generation_rounds": 0}, "max_generation_rounds"),
                     ({"off_policy_correction": "tokens"}, "off_policy_correction")]:
        with pytest.raises(ConfigError, match=key):
            config(tiny_model_dir, addition_files, **bad)


def test_race_report_by_hand():
    from bench.time_to_accuracy import accuracy_at, late_mean, report, time_to
    trl = {"system": "trl", "seed": 0, "steps": 10, "curve": [(0, 0.2), (60, 0.4), (120, 0.5), (241, 0.5)]}
    ours = {"system": "default", "seed": 0, "steps": 20, "curve": [(0, 0.2), (30, 0.5), (200, 0.6), (242, 0.7)]}
    assert accuracy_at(trl["curve"], 100) == 0.4 and time_to(trl["curve"], 0.5) == 120
    # The budget's last quarter starts at 180 s: TRL evaluated there once (50%), ours twice (60%, 70%).
    assert late_mean(trl["curve"], 240) == 0.5 and abs(late_mean(ours["curve"], 240) - 0.65) < 1e-12
    text = report([trl, ours], 240)
    # TRL reaches its final 50% at 120 s, ours at 30 s: 0.25x its time, and ends 20 points above.
    assert "| default | 0 | 20 | 20.0% | 50.0% | 50.0% | 50.0% | 70.0% | 30 (0.25x) | +20.0 pts |" in text
    assert "| trl | 0 | 10 | 20.0% | 40.0% | 50.0% | 50.0% | 50.0% | 120 (1.00x) | +0.0 pts |" in text
    assert "| default | 70.0% | 30 (1/1) | +20.0 pts | 65.0% | +15.0 pts |" in text


@pytest.mark.parametrize("system", ["default", "dynamic"])
def test_the_race_runs_our_systems_through_the_current_trainer_api(tiny_model_dir, addition_files, system):
    # The race's own loop (bench/time_to_accuracy.run_ours) calls the trainer's parts directly: a
    # one-second run keeps it in step with their signatures.
    import argparse

    from bench.time_to_accuracy import run_ours
    args = argparse.Namespace(system=system, model=tiny_model_dir, train=addition_files["train"],
                              heldout=addition_files["heldout"], seed=0, budget=1.0, eval_every=1.0,
                              eval_prompts=8, threads=1)
    result = run_ours(args)
    assert result["steps"] >= 1 and len(result["curve"]) >= 2
    assert all(0.0 <= a <= 1.0 for _, a in result["curve"])
