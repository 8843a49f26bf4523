"""Reward-model kinds (score head, likelihood, DPO), the guards against over-optimisation (ensembles,
clipping, KL in the reward, the best held-out model, iterative RL), and a seed pipeline that does
not make the model worse."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import single_thread
from grpo import algorithm
from grpo.cli import main
from grpo.config import ConfigError, TrainConfig, build
from grpo.rewards.models import KIND_FILE, EnsembleScorer, RewardModelScorer, load_reward_model
from grpo.rewards.preferences import Pair, pair_scores
from grpo.train.best_model import BestModel
from grpo.train.loop import train

PROMPTS = ["12+34=", "12+34=", "5+5=", "5+5="]
COMPLETIONS = ["46", "47 ", "10", " 9"]


@pytest.fixture(scope="module")
def preferences(tmp_path_factory, tiny_model_dir, addition_files):
    d = tmp_path_factory.mktemp("prefs")
    with single_thread():
        assert main(["reward-model", "make-preferences", "--quiet", "--set", f"model={tiny_model_dir}",
                     "--set", f"dataset={addition_files['train']}", "--set", "num_prompts=60",
                     "--set", "samples_per_prompt=4", "--set", "max_completion_length=4",
                     "--set", f"output_file={d / 'p.jsonl'}"]) == 0
    return d / "p.jsonl"


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, tiny_model_dir, preferences):
    """One reward model of each kind, trained a few steps through the CLI."""
    d = tmp_path_factory.mktemp("kinds")
    extra = {"score_head": [], "likelihood": ["--set", "nll_coef=1"], "dpo": ["--set", "dpo_beta=0.5"]}
    with single_thread():
        for kind, flags in extra.items():
            assert main(["reward-model", "train", "--quiet", "--set", f"model={tiny_model_dir}",
                         "--set", f"dataset={preferences}", "--set", f"output_dir={d / kind}", "--set", f"kind={kind}",
                         "--set", "max_steps=6", "--set", "batch_size=8", "--set", "learning_rate=1e-3",
                         "--set", "eval_steps=0", "--set", "max_length=16", "--set", "report_to=[]", *flags]) == 0
    return d


def plain_logprob(model, prompt_ids, completion_ids):
    """Sum of log p(completion token | everything before) with one plain forward, no padding."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt_ids) + t - 1, tok] for t, tok in enumerate(completion_ids))


@pytest.mark.parametrize("kind", ["score_head", "likelihood", "dpo"])
def test_each_kind_records_itself_loads_in_transformers_and_scores_the_policy_text(kinds, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    d = kinds / kind
    assert json.loads((d / KIND_FILE).read_text())["kind"] == kind
    tok = AutoTokenizer.from_pretrained(d)
    scorer = RewardModelScorer(str(d), torch.device("cpu"), torch.float32, batch_size=3)
    scores = scorer(PROMPTS, COMPLETIONS)
    # Whitespace at a completion's ends is not part of the answer: "47 " scores as "47".
    assert scores[1] == pytest.approx(scorer(["12+34="], ["47"])[0], abs=1e-6)
    with torch.no_grad():
        if kind == "score_head":
            model = AutoModelForSequenceClassification.from_pretrained(d).eval()
            plain = [model(**tok(p + c.strip(), return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                     for p, c in zip(PROMPTS, COMPLETIONS)]
        else:
            model = AutoModelForCausalLM.from_pretrained(d).eval()
            reference = AutoModelForCausalLM.from_pretrained(d / "reference").eval() if kind == "dpo" else None
            plain = []
            for p, c in zip(PROMPTS, COMPLETIONS):
                pi = tok(p, add_special_tokens=False)["input_ids"]
                ci = tok(c.strip(), add_special_tokens=False)["input_ids"]
                ci = ci + [tok.eos_token_id]
                lp = plain_logprob(model, pi, ci)
                plain.append((lp / len(ci)).item() if kind == "likelihood" else
                             (0.5 * (lp - plain_logprob(reference, pi, ci))).item())
    assert scores == pytest.approx(plain, abs=1e-5)
    # Saved and loaded again: the same scores.
    copy = kinds / f"{kind}_copy"
    scorer.rm.save(copy)
    assert RewardModelScorer(str(copy), torch.device("cpu"), torch.float32)(PROMPTS, COMPLETIONS) == \
        pytest.approx(scores, abs=1e-6)


def test_a_causal_lm_without_a_kind_is_not_taken_for_a_reward_model(tiny_model_dir):
    from grpo.errors import RewardError
    with pytest.raises(RewardError, match="holds a causal LM, not a reward model"):
        RewardModelScorer(tiny_model_dir, torch.device("cpu"), torch.float32)


def test_likelihood_bradley_terry_plus_nll_gradient_equals_a_naive_loop(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm = load_reward_model(tiny_model_dir, torch.device("cpu"), torch.float64, tok, max_length=16, fresh="likelihood")
    pairs = [Pair("12+34=", "46", "47", 0.0, ""), Pair("5+5=", "10", "9", 0.0, ""), Pair("1+1=", "2", "11", 0.0, "")]
    coef = 0.7
    c, r = pair_scores(rm, pairs)
    loss = algorithm.bradley_terry_loss(c, r) + coef * rm.nll([p.prompt for p in pairs], [p.chosen for p in pairs])
    grads = torch.autograd.grad(loss, list(rm.model.parameters()))

    def mean_lp(prompt, completion):
        ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return plain_logprob(rm.model, tok(prompt, add_special_tokens=False)["input_ids"], ids) / len(ids), len(ids)

    naive, nll_sum, nll_tokens = 0.0, 0.0, 0
    for p in pairs:
        (sc, n), (sr, _) = mean_lp(p.prompt, p.chosen), mean_lp(p.prompt, p.rejected)
        naive = naive - torch.nn.functional.logsigmoid(sc - sr) / len(pairs)
        nll_sum, nll_tokens = nll_sum - sc * n, nll_tokens + n
    naive = naive + coef * nll_sum / nll_tokens
    # completion_logprobs takes its log-softmax in float32 whatever the model's dtype: float32 tolerance.
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    for g, h in zip(grads, torch.autograd.grad(naive, list(rm.model.parameters()))):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_dpo_implicit_reward_is_zero_at_the_start(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm = load_reward_model(tiny_model_dir, torch.device("cpu"), torch.float32, tok, max_length=16, fresh="dpo",
                           settings={"beta": 0.1})
    # pi == pi_ref: zero, to float32 rounding (the reference's pass runs without grad)
    assert rm.scores(PROMPTS, COMPLETIONS).abs().max() < 1e-6


def test_ensembles_take_the_mean_or_the_worst_member_and_clip_bounds_scores(kinds):
    members = [RewardModelScorer(str(kinds / k), torch.device("cpu"), torch.float32)
               for k in ("score_head", "likelihood")]
    each = torch.tensor([m(PROMPTS, COMPLETIONS) for m in members])
    assert EnsembleScorer(members, "min")(PROMPTS, COMPLETIONS) == pytest.approx(each.min(0).values.tolist())
    assert EnsembleScorer(members, "mean")(PROMPTS, COMPLETIONS) == pytest.approx(each.mean(0).tolist())
    clipped = RewardModelScorer(str(kinds / "likelihood"), torch.device("cpu"), torch.float32, clip=0.5)
    assert clipped(PROMPTS, COMPLETIONS) == pytest.approx(each[1].clamp(-0.5, 0.5).tolist())


def test_held_out_evaluation_leaves_the_running_moments_as_they_are(kinds):
    from grpo.rewards.scoring import Reward, evaluating
    scorer = RewardModelScorer(str(kinds / "likelihood"), torch.device("cpu"), torch.float32, normalize=True)
    scorer(PROMPTS, COMPLETIONS)
    before = scorer.state_dict()
    with evaluating([Reward("rm", scorer, 1.0)]):
        scorer(PROMPTS[:1], COMPLETIONS[:1])
    assert scorer.state_dict() == before and scorer.learning
    scorer(PROMPTS[:1], COMPLETIONS[:1])  # training scores teach it again
    assert scorer.state_dict() != before


def test_kl_in_the_reward_by_hand():
    rewards = torch.tensor([1.0, 0.0])
    lp = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (the masked 9 never counts); row 1: 0 + 1 + 0 = 1
    out, kl = algorithm.kl_penalised_rewards(rewards, lp, ref, mask, 0.1)
    assert kl.tolist() == [-0.5, 1.0] and out.tolist() == pytest.approx([1.05, -0.1])


def small(tiny_model_dir, addition_files, out, **kw):
    values = dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(out),
                  rewards=["answer_distance"], prompts_per_step=2, group_size=4, max_completion_length=4,
                  max_steps=2, learning_rate=1e-3, max_prompt_length=16, report_to=[])
    values.update(kw)
    return build(TrainConfig, values)


def test_kl_in_the_reward_is_zero_before_the_first_update(tiny_model_dir, addition_files, tmp_path):
    out = train(small(tiny_model_dir, addition_files, tmp_path / "kl", reward_kl_coef=0.1, beta=0.0), quiet=True)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # The sampler's log-probs (the group decoder) against the reference's (the packed forward):
    # the same model at step 1, so zero to float32 rounding; then the policy has moved.
    assert abs(lines[0]["reward/kl"]) < 1e-5 and abs(lines[1]["reward/kl"]) > 1e-4


def test_kl_in_the_reward_is_paid_by_truncated_completions_left_out_of_the_loss(tiny_model_dir, addition_files,
                                                                                tmp_path):
    # max_completion_length 2: every completion is truncated, so DAPO's overlong filtering takes
    # every row out of the loss; the KL in the reward is still counted on the generated tokens, so
    # the reference must be scored there too: at step 1 (policy == reference) it is zero, not the
    # sampler's whole log-prob against a masked-out zero.
    out = train(small(tiny_model_dir, addition_files, tmp_path / "kl", reward_kl_coef=0.1, beta=0.0,
                      max_completion_length=2, mask_truncated_completions=True, max_steps=1), quiet=True)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["reward/kl"]) < 1e-5


def test_best_model_remembers_the_best_and_stops_after_patience(tmp_path):
    saved = []
    best = BestModel("eval_accuracy", True, patience=2, keep=True, out=tmp_path)
    for step, acc, stop in [(0, 0.2, False), (10, 0.5, False), (20, 0.4, False), (30, 0.5, True)]:
        assert best.observe(step, {"eval_accuracy": acc}, lambda d: saved.append((step, d))) == stop
    assert (best.value, best.step) == (0.5, 10) and [s for s, _ in saved] == [0, 10]


def test_a_best_model_metric_that_no_evaluation_gives_is_a_config_error(tmp_path):
    best = BestModel("eval_acuracy", True, patience=2, keep=False, out=tmp_path)
    unknown = r"metric_for_best_model: 'eval_acuracy' .*\['eval_accuracy', 'eval_reward'\]"
    with pytest.raises(ConfigError, match=unknown):
        best.observe(0, {"step": 0, "eval_accuracy": 0.2, "eval_reward": 0.1}, lambda d: None)


def test_load_best_model_at_end_and_early_stopping(tiny_model_dir, addition_files, tmp_path):
    out = train(small(tiny_model_dir, addition_files, tmp_path / "best", max_steps=8, eval_steps=1,
                      eval_dataset=addition_files["heldout"], eval_max_prompts=16, learning_rate=3e-2,
                      rewards=["answer_distance", {"function": "exact_answer", "weight": 0}],
                      metric_for_best_model="eval_reward", early_stopping_patience=2, load_best_model_at_end=True),
                quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {l["step"]: l["eval/reward"] for l in lines if "eval/reward" in l}
    best_step = max(evals, key=lambda s: (evals[s], -s))
    assert summary["best"]["step"] == best_step
    assert summary["eval_after"]["eval_reward"] == pytest.approx(evals[best_step])
    final, kept = load_file(str(out / "model.safetensors")), load_file(str(out / "best-model" / "model.safetensors"))
    assert all(torch.equal(final[k], kept[k]) for k in final)
    if "early_stopped_at" in summary:
        assert max(evals) == summary["early_stopped_at"] < 8


def test_iterative_rl_rounds_train_the_reward_model_and_resume_exactly(tiny_model_dir, addition_files, kinds,
                                                                         preferences, tmp_path):
    def cfg(out, **kw):
        return small(tiny_model_dir, addition_files, out, max_steps=4, save_steps=2, beta=0.04,
                     rewards=[{"model": str(kinds / "likelihood"), "name": "rm"},
                              {"function": "exact_answer", "weight": 0}],
                     iterative_rl={"every": 2, "prompts": 8, "samples_per_prompt": 4, "steps": 3, "batch_size": 4,
                                   "replay_dataset": str(preferences), "labeler": "answer_distance"}, **kw)

    with single_thread():
        full = train(cfg(tmp_path / "full"), quiet=True)
        lines = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
        assert [l.get("reward/iterative/round") for l in lines] == [None, 1.0, None, 2.0]
        assert lines[1]["reward/iterative/pairs"] > 0 and math.isfinite(lines[1]["reward/iterative/rm_loss"])
        assert lines[2]["loss/kl"] == 0.0  # pi_ref <- pi_theta at the round: no drift yet at the next step
        before = load_file(str(kinds / "likelihood" / "model.safetensors"))
        after = load_file(str(full / "reward_model" / "model.safetensors"))
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the reward model learned
        part = tmp_path / "part"
        part.mkdir()
        shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
        train(cfg(part), resume=True, quiet=True)
    for name in ("model.safetensors", "reward_model/model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_iterative_rl_inputs_are_checked_first_and_fingerprinted(tiny_model_dir, addition_files, kinds,
                                                                  preferences, tmp_path):
    from grpo.data import load_source
    from grpo.runs.inputs import fingerprints

    def cfg(replay, labeler="answer_distance"):
        return small(tiny_model_dir, addition_files, tmp_path / "o", rewards=[{"model": str(kinds / "likelihood")}],
                     iterative_rl={"every": 2, "replay_dataset": str(replay), "labeler": labeler})

    with pytest.raises(ConfigError, match="iterative_rl.replay_dataset: .*missing.jsonl is not a file"):
        train(cfg(tmp_path / "missing.jsonl"), quiet=True)
    with pytest.raises(Exception, match="no_such_reward"):
        train(cfg(preferences, labeler="no_such_reward"), quiet=True)
    assert not (tmp_path / "o").exists()  # nothing was written before the inputs were checked
    found = fingerprints(cfg(preferences), load_source(addition_files["train"]), None)
    assert found["iterative_rl.replay_dataset"].startswith("sha256:")  # a resume must find the same pairs


# The seed pipeline at the tests' budget, from the demo's full warm start (a weaker one leaves a
# collapse too little room to show). Its margin is measured over other warm starts and thread
# counts by bench/learning_margins.py; docs/benchmarks.md has the table.
SEED_BUDGET = dict(
    rm_overrides=dict(max_steps=100, eval_steps=0),
    grpo_overrides=dict(max_steps=20, eval_steps=10, eval_max_prompts=200, prompts_per_step=16,
                        iterative_rl={"every": 10, "prompts": 64, "steps": 20, "labeler": "exact_answer"}),
    preference_prompts=400, heldout_preference_prompts=50, zero_variance_prompts=20)


def test_seed_pipeline_at_a_small_budget_does_not_collapse(addition_warm_start, tmp_path):
    """The recipe (a likelihood reward model, iterative RL) on a budget of seconds, beam or sampled
    groups: held-out true accuracy stays above 0.4 of the warm start's at every evaluation. Twenty
    steps on a reward model trained for a hundred can cost some warm starts close to half their
    accuracy (bench/learning_margins.py measures how much over a grid of them); a reward model the
    policy exploits sends it towards zero, which this catches."""
    from grpo.recipes.pipeline import run_seed_pipeline

    with single_thread():
        summary = run_seed_pipeline(str(tmp_path / "seed"), quiet=True, warm=addition_warm_start, **SEED_BUDGET)
    assert summary["reward_model"]["kind"] == "likelihood + NLL"
    for name, v in summary["variants"].items():
        assert v["guard"] == "iterative RL"
        assert 0.05 < v["accuracy_before"] and v["accuracy_lowest"] >= 0.4 * v["accuracy_before"], (name, v)


def test_an_ensemble_trains_through_grpo_train(tiny_model_dir, addition_files, kinds, tmp_path):
    members = [str(kinds / "score_head"), str(kinds / "likelihood")]
    out = train(small(tiny_model_dir, addition_files, tmp_path / "ens",
                      rewards=[{"model": members, "ensemble": "min", "name": "rm"}]), quiet=True)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(l["reward/rm/mean"]) for l in lines)
