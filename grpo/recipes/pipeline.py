"""`grpo demo --pipeline seed`: the seed notes' pipeline end to end, on a laptop CPU.

  1. supervised warm start of the tiny addition model (the demo's SFT stage)
  2. preference data: sample the warm policy, pair correct with incorrect answers
     (grpo.recipes.preferences; a labeller would write the right answer where no sample has it)
  3. a reward model trained on those pairs with the Bradley-Terry loss, its backbone the warm
     policy itself: by default a generative verifier (`likelihood`: the completion's
     log-likelihood, BT + NLL on the chosen answer)
  4. GRPO whose reward is the reward model's score, run twice from the same start:
       beam:   groups from beam search, as the seed says
       sample: i.i.d. samples at temperature 1, as DeepSeekMath does
     guarded by iterative RL (DeepSeekMath 4.2): every 25 steps the reward model learns from the
     current policy's samples, labelled by the task's verifier
  5. held-out accuracy by the exact-answer verifier before, every 25 steps and after each run.

With `feedback="ranking"` (`--feedback ranking`), steps 2 and 3 use ranking feedback instead: the
same 8 samples of each prompt ranked by the verifier (right answers tied first, the wrong ones
tied below them), and a reward model trained listwise with the
Plackett-Luce loss; the same number of completions is judged per prompt (an equal labelling
budget), and each reward-model step reads about as many sequences (32 rankings of about four
distinct answers against 64 pairs of 2). Iterative RL's rounds label the policy's samples with the verifier either way.

The verifier is in every GRPO run with weight 0: it changes no advantage, but it makes the trainer
log true accuracy next to the reward-model score at every step, which is how we see whether the
policy learns to please the reward model rather than to be right (reward over-optimisation,
Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from grpo.config import PreferenceConfig, RewardModelConfig, RewardModelEvalConfig, TrainConfig, build
from grpo.data import decode_completions, format_prompt, load_rows, tokenize_prompts
from grpo.engine.backend import LocalBackend, SamplingParams
from grpo.engine.models import load_causal_lm, load_tokenizer, pick_device
from grpo.rewards import is_exact_answer
from grpo.supervised.reward_model import eval_reward_model, train_reward_model
from grpo.train.loop import train

from .addition import GRPO, SFT, WarmStart, claim_recipe_dir, warm_start
from .preferences import make_preferences
from .tasks import write_jsonl

# Preference data: the warm policy sampled at temperature 1 on training prompts (and, for the
# reward model's held-out accuracy, on held-out prompts it never trains on). Correct-vs-wrong
# pairs only: "closer of two wrong answers" pairs taught the reward model little and cost it
# accuracy on the pairs that matter (docs/seed-pipeline.md).
PREFERENCES = dict(samples_per_prompt=8, temperature=1.0, max_completion_length=6, max_prompt_length=16,
                   correct_pairs_per_prompt=4, closer_pairs_per_prompt=0, batch_size=128)
PREFERENCE_PROMPTS, HELDOUT_PREFERENCE_PROMPTS = 2000, 250
# The reward model: a generative verifier (the completion's likelihood under the warm policy's own
# network, Bradley-Terry plus NLL on the chosen answer); a fresh linear score head on this tiny
# backbone ranks right above wrong answers too weakly, and GRPO exploits it (docs/seed-pipeline.md).
REWARD_MODEL = dict(kind="likelihood", nll_coef=1.0, max_steps=500, batch_size=64, learning_rate=5e-4,
                    warmup_steps=20, eval_steps=100, logging_steps=50, max_length=32, micro_batch_size=64)
# The guard: iterative RL (DeepSeekMath 4.2): every 25 steps the reward model learns from the
# current policy's own samples, labelled by the task's verifier (the labelling function that made
# the preference data), with 10% replay of earlier pairs; pi_ref <- pi_theta each round.
ITERATIVE = dict(every=25, labeler="exact_answer", prompts=256, samples_per_prompt=8, pairs_per_prompt=2,
                 steps=50, batch_size=32, learning_rate=1e-4, replay=0.1, nll_coef=1.0, reset_reference=True)
# GRPO as in the plain demo, shorter (each step also runs the reward model), reward = RM score;
# held-out accuracy every 25 steps, so a dip below the warm start would show.
SEED_GRPO = {**GRPO, "max_steps": 100, "eval_steps": 25, "samples_steps": 0}
FEEDBACK = ("pairs", "ranking")
# Ranking feedback: one ranking per prompt of its 8 samples (the pairs' budget), by the verifier
# (right answers tied above the wrong ones: ordering the wrong ones by distance cost the reward
# model correct-vs-wrong accuracy, as closer-vs-farther pairs did), and about as many sequences
# per reward-model step as 64 pairs (a ranking holds about four distinct answers): with half as
# many, the listwise model's held-out accuracy wandered instead of climbing.
RANKING_PREFERENCES = dict(rankings=8, rank_by="verifier")
RANKING_REWARD_MODEL = dict(batch_size=32)
GENERATIONS = ("beam", "sample")
ZERO_VARIANCE_PROMPTS = 200


def _rewards(rm_dir: str) -> list[dict]:
    # Raw scores: group normalisation already removes their scale and offset. The verifier rides
    # along with weight 0 so `accuracy` is logged without being rewarded.
    return [{"model": rm_dir, "name": "reward_model"}, {"function": "exact_answer", "weight": 0.0}]


def describe_recipe(rm_settings: dict, grpo_settings: dict) -> tuple[str, str]:
    """(reward model, guard) in words, for the table."""
    kind = rm_settings.get("kind", "score_head")
    rm = {"score_head": "score head", "likelihood": "likelihood", "dpo": "DPO implicit"}[kind]
    if rm_settings.get("nll_coef"):
        rm += " + NLL"
    guards = []
    if grpo_settings.get("iterative_rl", {}).get("every"):
        guards.append("iterative RL")
    if grpo_settings.get("reward_kl_coef"):
        guards.append(f"KL in reward {grpo_settings['reward_kl_coef']}")
    if grpo_settings.get("early_stopping_patience") or grpo_settings.get("load_best_model_at_end"):
        guards.append("best held-out")
    return rm, ", ".join(guards) or "none"


@torch.no_grad()
def true_zero_variance_fraction(model_dir: str, rows: list[dict], strategy: str, group_size: int,
                                max_new_tokens: int, seed: int) -> float:
    """Fraction of groups whose exact-answer rewards are all equal (all right or all wrong).

    The trainer's `zero_variance_frac` is about the total reward, here a continuous reward-model
    score that almost never ties; what starves GRPO of signal is groups that do not differ in
    correctness, which is what this counts, for the policy GRPO starts from.
    """
    tokenizer = load_tokenizer(model_dir)
    device = pick_device("auto")
    backend = LocalBackend(load_causal_lm(model_dir, device, torch.float32, trainable=False), tokenizer)
    params = SamplingParams(group_size=group_size, max_new_tokens=max_new_tokens, strategy=strategy,
                            temperature=1.0, top_p=1.0, top_k=0)
    generator = torch.Generator(device=device).manual_seed(seed)
    zero = 0
    for i in range(0, len(rows), 50):
        chunk = rows[i:i + 50]
        ids, mask = tokenize_prompts(tokenizer, [format_prompt(tokenizer, r["prompt"]) for r in chunk], 16)
        out = backend.generate(ids, mask, params, generator)
        texts = decode_completions(tokenizer, out.completion_ids, out.completion_mask, stop_ids=backend.stop_token_ids)
        for p, row in enumerate(chunk):
            right = {is_exact_answer(t, row["answer"]) for t in texts[p * group_size:(p + 1) * group_size]}
            zero += len(right) == 1
    return zero / len(rows)


def _correct_pairs_file(preferences: Path, out: Path) -> Path:
    """The held-out correct-vs-wrong pairs: a preference file's, or every (right, wrong) pair of
    each ranking's labelled completions, so both kinds of feedback are judged on the same kind of
    pair."""
    rows = [json.loads(line) for line in preferences.read_text().splitlines() if line.strip()]
    pairs = [r for r in rows if r["kind"] == "correct"]
    for r in (r for r in rows if r["kind"] == "ranking"):
        flat = [c for e in r["completions"] for c in (e if isinstance(e, list) else [e])]
        pairs += [{"prompt": r["prompt"], "chosen": a, "rejected": b, "kind": "correct", "answer": r["answer"]}
                  for a, la in zip(flat, r["labels"]) for b, lb in zip(flat, r["labels"]) if la > lb]
    return write_jsonl(pairs, out)


def _variant_summary(run_dir: Path, rm_correct_margin: float) -> dict:
    run = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "reward/mean" in s]  # the training steps (step 0 is the warm start's evaluation)
    before, after = run["eval_before"], run["eval_after"]
    rm_gain = after["eval_reward"] - before["eval_reward"]
    acc_gain = after["eval_accuracy"] - before["eval_accuracy"]
    # Reward-model score gain in "accuracy units": how much accuracy would have had to rise to
    # raise the score this much, at the RM's held-out gap between a correct and a wrong answer.
    rm_gain_as_accuracy = rm_gain / rm_correct_margin if rm_correct_margin > 0 else float("nan")
    evals = [s["eval/accuracy"] for s in steps if "eval/accuracy" in s]
    return {
        "accuracy_before": before["eval_accuracy"], "accuracy_after": after["eval_accuracy"],
        # The lowest held-out accuracy at any evaluation during training (the warm start is before).
        "accuracy_lowest": min(evals) if evals else after["eval_accuracy"],
        "rm_score_before": before["eval_reward"], "rm_score_after": after["eval_reward"],
        "rm_gain_in_accuracy_units": rm_gain_as_accuracy,
        "pleased_rm_more_than_right": bool(rm_gain_as_accuracy > acc_gain + 0.05),
        "zero_variance_frac_total_reward": sum(s["rollout/zero_variance_frac"] for s in steps) / max(1, len(steps)),
        "train_seconds": run["train_seconds"],
        # Side by side per logged step: the reward the policy is trained on and the truth.
        "per_step": [{"step": s["step"], "rm_score": s.get("reward/reward_model/mean"),
                      "accuracy": s.get("reward/accuracy"), "eval_accuracy": s.get("eval/accuracy")} for s in steps],
    }


def run_seed_pipeline(output_dir: str = "runs/seed", seed: int = 0, quiet: bool = False,
                      sft_overrides: dict | None = None, preference_overrides: dict | None = None,
                      rm_overrides: dict | None = None, grpo_overrides: dict | None = None,
                      preference_prompts: int = PREFERENCE_PROMPTS,
                      heldout_preference_prompts: int = HELDOUT_PREFERENCE_PROMPTS,
                      generations: tuple[str, ...] = GENERATIONS,
                      zero_variance_prompts: int = ZERO_VARIANCE_PROMPTS, overwrite: bool = False,
                      feedback: str = "pairs", warm: WarmStart | None = None) -> dict:
    """Run the whole pipeline into output_dir; write and return summary.json's content.
    `feedback`: `pairs` (Bradley-Terry) or `ranking` (Plackett-Luce on K-way rankings). `warm`: a
    warm start made before by `grpo.recipes.addition.warm_start` with the same seed, to begin
    from instead of training one (stage 1), so that runs of other settings share it."""
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")
    if warm is not None and sft_overrides:
        raise ValueError("run_seed_pipeline: sft_overrides apply to a warm start it trains; `warm` is one made before")
    ranking = feedback == "ranking"
    preference_overrides = {**(RANKING_PREFERENCES if ranking else {}), **(preference_overrides or {})}
    rm_overrides = {**(RANKING_REWARD_MODEL if ranking else {}), **(rm_overrides or {})}
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    out = Path(output_dir)
    with claim_recipe_dir(out, "seed pipeline", overwrite):  # locked until the recipe ends
        start = time.time()
        say = (lambda *a: None) if quiet else print
        timings = {}

        # 1. The tiny model, the addition data and the supervised warm start.
        t = time.time()
        if warm is None:
            say(f"[seed] 1/4 tiny model, addition data and supervised warm start under {out}")
            task = warm_start(out, seed, sft_overrides, quiet=True)
        else:
            say(f"[seed] 1/4 the warm start made before: {warm.sft_dir}")
            task = warm
        sft_dir, train_file, heldout_file = task.sft_dir, task.train_file, task.heldout_file
        heldout_rows = task.heldout_rows
        timings["sft"] = time.time() - t

        # 2. Preference pairs from the warm policy's own samples.
        say(f"[seed] 2/4 {'rankings' if ranking else 'preference pairs'} from the warm policy's samples")
        t = time.time()
        prefs = {}
        for name, data, n in (("train", train_file, preference_prompts),
                              ("heldout", heldout_file, heldout_preference_prompts)):
            prefs[name] = make_preferences(build(PreferenceConfig, {
                "model": str(sft_dir), "dataset": str(data), "num_prompts": n, "seed": seed,
                "output_file": str(out / "data" / f"preferences_{name}.jsonl"),
                **PREFERENCES, **(preference_overrides or {})}, "seed preferences"), quiet=quiet)
        timings["preferences"] = time.time() - t

        # 3. The reward model, its backbone the warm policy; held-out pairs come from held-out prompts.
        say(f"[seed] 3/4 reward model from the {'rankings (Plackett-Luce)' if ranking else 'pairs (Bradley-Terry)'}")
        t = time.time()
        rm_dir = out / "reward_model"
        rm = train_reward_model(build(RewardModelConfig, {
            "model": str(sft_dir), "dataset": prefs["train"]["output_file"],
            "eval_dataset": prefs["heldout"]["output_file"], "output_dir": str(rm_dir), "seed": seed,
            **REWARD_MODEL, **(rm_overrides or {})}, "seed reward model"), quiet=quiet)
        # The RM's gap between a right and a wrong answer, to put its score gains in accuracy units.
        correct_only = _correct_pairs_file(Path(prefs["heldout"]["output_file"]),
                                           out / "data" / "heldout_correct_pairs.jsonl")
        rm_correct = eval_reward_model(build(RewardModelEvalConfig, {"model": str(rm_dir), "dataset": str(correct_only),
                                                                     "max_length": REWARD_MODEL["max_length"]}),
                                       quiet=True)
        timings["reward_model"] = time.time() - t

        # 4. GRPO on the reward model's score, beam groups then sampled groups, from the same start.
        heldout_sample = load_rows(heldout_file)[:zero_variance_prompts]
        rm_settings = REWARD_MODEL | (rm_overrides or {})
        grpo_settings = {**SEED_GRPO, "iterative_rl": {**ITERATIVE, "replay_dataset": prefs["train"]["output_file"]},
                         **(grpo_overrides or {})}
        rm_kind, guard = describe_recipe(rm_settings, grpo_settings)
        rm_kind += ", rankings (PL)" if ranking else ""
        variants = {}
        for generation in generations:
            say(f"[seed] 4/4 GRPO with reward = reward-model score ({rm_kind}; guard: {guard}), groups by {generation}")
            run_dir = out / generation
            cfg = build(TrainConfig, {
                "model": str(sft_dir), "dataset": str(train_file), "eval_dataset": str(heldout_file),
                "eval_max_prompts": len(heldout_rows), "output_dir": str(run_dir), "seed": seed,
                "generation": generation, **grpo_settings,
                "rewards": (grpo_overrides or {}).get("rewards", _rewards(str(rm_dir)))}, f"seed grpo {generation}")
            t = time.time()
            train(cfg, quiet=quiet)
            timings[f"grpo_{generation}"] = time.time() - t
            variants[generation] = _variant_summary(run_dir, rm_correct["margin"])
            variants[generation].update(reward_model=rm_kind, guard=guard)
            if (run_dir / "reward_model").is_dir():  # the reward model as iterative RL left it
                variants[generation]["rm_correct_vs_wrong_after"] = eval_reward_model(build(RewardModelEvalConfig, {
                    "model": str(run_dir / "reward_model"), "dataset": str(correct_only),
                    "max_length": REWARD_MODEL["max_length"]}), quiet=True)["accuracy"]
            variants[generation]["zero_variance_frac_true_reward_at_start"] = true_zero_variance_fraction(
                str(sft_dir), heldout_sample, generation, cfg.group_size, cfg.max_completion_length, seed)

        summary = {
            "feedback": feedback,
            "reward_model": {"kind": rm_kind, "heldout_pairwise_accuracy": rm["eval_accuracy"],
                             "heldout_kendall_tau": rm.get("eval_kendall_tau"),
                             "heldout_margin": rm["eval_margin"],
                             "heldout_correct_vs_wrong_accuracy": rm_correct["accuracy"],
                             "heldout_correct_vs_wrong_margin": rm_correct["margin"],
                             "train_pairs": rm["train_pairs"], "heldout_pairs": rm["eval_pairs"], "model": str(rm_dir)},
            "preferences": prefs,
            "variants": variants,
            "heldout_prompts": len(heldout_rows),
            "seconds": {**timings, "total": time.time() - start},
            "settings": {"sft": (SFT | (sft_overrides or {})) if warm is None else {"made_before": str(warm.sft_dir)},
                         "preferences": PREFERENCES | (preference_overrides or {}),
                         "reward_model": rm_settings,
                         "grpo": {k: v for k, v in grpo_settings.items() if k != "rewards"}},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(format_table(summary))
        say(f"[seed] summary: {out / 'summary.json'}")
        return summary


def format_table(summary: dict) -> str:
    rm = summary["reward_model"]
    width = max([19] + [len(v["reward_model"]) + 2 for v in summary["variants"].values()])
    lines = [f"[seed] reward model ({rm['kind']}): held-out pairwise accuracy {rm['heldout_pairwise_accuracy']:.1%}, "
             f"correct vs wrong {rm['heldout_correct_vs_wrong_accuracy']:.1%}",
             f"{'groups':<8}{'reward model':<{width}}{'guard':<15}{'RM c-v-w end':>13}{'acc before':>12}"
             f"{'acc after':>11}{'lowest':>8}{'RM before':>11}{'RM after':>10}{'zero-var (true)':>17}"]
    for name, v in summary["variants"].items():
        end = v.get("rm_correct_vs_wrong_after")
        lines.append(f"{name:<8}{v['reward_model']:<{width}}{v['guard']:<15}{'-' if end is None else f'{end:.1%}':>13}"
                     f"{v['accuracy_before']:>12.1%}{v['accuracy_after']:>11.1%}{v['accuracy_lowest']:>8.1%}"
                     f"{v['rm_score_before']:>11.3f}{v['rm_score_after']:>10.3f}"
                     f"{v['zero_variance_frac_true_reward_at_start']:>17.2f}")
    lines.append(f"[seed] total {summary['seconds']['total']:.0f}s")
    return "\n".join(lines)
