"""Bradley-Terry reward models: the loss, bad rows, training to accuracy, save/load, the CLI."""

import json
import math

import pytest
import torch
import yaml

from conftest import single_thread
from grpo.cli import main
from grpo.data import DataError
from grpo.algorithm import bradley_terry_loss
from grpo.rewards.preferences import load_preferences
from grpo.rewards import RewardModelScorer, reward_model_text
from grpo.recipes.tasks import build_char_tokenizer




# ----------------------------------------------------------------------------------------------
# The loss against hand-worked values

def test_bradley_terry_loss_hand_worked():
    # r_c - r_r = 0 -> -log(1/2) = log 2
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    # diff = 2: -log sigmoid(2) = log(1 + e^-2) = 0.126928
    assert bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(0.126928, abs=1e-6)
    # diff = -1: log(1 + e) = 1.313262
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(1.313262, abs=1e-6)
    # the mean over pairs, with margins: diffs 2 - 1 = 1 and 0 - 0 = 0 -> (0.313262 + 0.693147) / 2
    loss = bradley_terry_loss(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-6)
    # a huge negative difference stays finite (logsigmoid, not log(sigmoid))
    assert math.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item())


def test_bradley_terry_gradient():
    # d/dr_c [-log sigmoid(r_c - r_r)] = -(1 - sigmoid(diff)) = -sigmoid(-diff)
    c, r = torch.tensor([0.5], requires_grad=True), torch.tensor([-0.5], requires_grad=True)
    bradley_terry_loss(c, r).backward()
    assert c.grad.item() == pytest.approx(-torch.sigmoid(torch.tensor(-1.0)).item())
    assert r.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())


# ----------------------------------------------------------------------------------------------
# Bad preference rows

def test_bad_rows_reported_with_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "1+2=", "chosen": "3"},                          # line 2: no rejected
            {"prompt": "1+3=", "chosen": "", "rejected": "5"},          # line 3: empty chosen
            {"prompt": "1+4=", "chosen": "5", "rejected": "5"},         # line 4: chosen == rejected
            {"prompt": "1+5=", "chosen": "6", "rejected": "7", "margin": "x"},  # line 5: bad margin
            {"prompt": "1+6=", "chosen": "7", "rejected": "8", "margin": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    pairs = load_preferences(str(path), build_char_tokenizer(), log=messages.append)
    assert [p.chosen for p in pairs] == ["2", "7"] and pairs[1].margin == 0.5
    text = "\n".join(messages)
    assert f"{path}:2: missing column 'rejected'" in text
    assert f"{path}:3: empty 'chosen'" in text
    assert f"{path}:4: 'chosen' == 'rejected'" in text
    assert f"{path}:5: 'margin' is not a number" in text


def test_all_bad_file_stops(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\n1+1=,2,2\n1+2=,,4\n")
    with pytest.raises(DataError, match="no usable preference pairs.*prefs.csv:2"):
        load_preferences(str(path), build_char_tokenizer(), log=lambda *a: None)


def test_chat_messages_use_the_template():
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(json.dumps({"prompt": [{"role": "user", "content": "1+1"}],
                            "chosen": [{"role": "assistant", "content": "2"}],
                            "rejected": [{"role": "assistant", "content": "3"}]}) + "\n")
    (pair,) = load_preferences(f.name, tok, log=lambda *a: None)
    assert reward_model_text(pair.prompt, pair.chosen) == "1+1=2"


# ----------------------------------------------------------------------------------------------
# Training on the built-in task, through the CLI

@pytest.fixture(scope="session")
def trained_rm(tmp_path_factory, addition_files):
    """Preference pairs sampled from an untrained tiny policy (chosen: the reference answer when no
    sample is right), and a reward model trained on them with `grpo reward-model train`."""
    from grpo.recipes.tasks import save_tiny_model

    with single_thread():
        d = tmp_path_factory.mktemp("rm")
        base = str(save_tiny_model(d / "base", hidden_size=64, num_layers=2, intermediate_size=256))
        for name, n in (("train", 300), ("heldout", 100)):
            assert main(["reward-model", "make-preferences", "--quiet", "--set", f"model={base}",
                         "--set", f"dataset={addition_files[name]}", "--set", f"num_prompts={n}",
                         "--set", "samples_per_prompt=4", "--set", "max_completion_length=4",
                         "--set", "closer_pairs_per_prompt=0", "--set", f"output_file={d / name}.jsonl"]) == 0
        config = d / "rm.yaml"
        config.write_text(yaml.safe_dump(dict(
            model=base, dataset=str(d / "train.jsonl"), eval_dataset=str(d / "heldout.jsonl"),
            output_dir=str(d / "rm"), max_steps=100, batch_size=32, learning_rate=1e-3, eval_steps=50,
            logging_steps=25, max_length=16, seed=0)))
        assert main(["reward-model", "train", "--config", str(config), "--quiet"]) == 0
    return {"dir": d / "rm", "heldout": d / "heldout.jsonl", "base": base}


def test_reward_model_reaches_heldout_accuracy(trained_rm):
    metrics = [json.loads(l) for l in (trained_rm["dir"] / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 100 and len(evals) == 3  # during and after
    assert any("loss/total" in m and "loss/accuracy" in m for m in metrics)                     # training curve
    summary = json.loads((trained_rm["dir"] / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.9, summary


def test_save_from_pretrained_identical_scores(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["12+34=46", "12+34=47", "5+5=10"]  # the texts the scorer builds from prompt + completion
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm["dir"]).eval()
    assert model.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(trained_rm["dir"])
    with torch.no_grad():  # one at a time: no padding involved at all
        plain = [model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item() for t in texts]
    scorer = RewardModelScorer(str(trained_rm["dir"]), torch.device("cpu"), torch.float32, batch_size=2)
    batched = scorer(["12+34=", "12+34=", "5+5="], ["46", "47", "10"])  # padded batches
    assert batched == pytest.approx(plain, abs=1e-5)


def test_bf16_scorer_keeps_a_float32_score(trained_rm):
    """A bf16 reward model's score is read through a float32 head: not rounded to bf16's ~3 digits
    (which ties completions the model ranks apart), close to the fp32 score, and the same inside
    an outer autocast (held-out evaluation runs under one)."""
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(4)]
    completions = [str(a + b + d) for a in range(8) for b, d in zip(range(4), (0, 1, 0, 2))]
    full = RewardModelScorer(str(trained_rm["dir"]), torch.device("cpu"), torch.float32)(prompts, completions)
    bf16 = RewardModelScorer(str(trained_rm["dir"]), torch.device("cpu"), torch.bfloat16)
    half = torch.tensor(bf16(prompts, completions))
    assert (half.to(torch.bfloat16).float() != half).sum() > len(half) // 2
    spread = torch.tensor(full).std()
    torch.testing.assert_close(half, torch.tensor(full), atol=0.1 * spread.item(), rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bf16(prompts, completions) == half.tolist()
        # Training and held-out pair scoring under autocast (grpo reward-model train --set dtype=bfloat16).
        from grpo.rewards.models import load_reward_model
        from grpo.rewards.preferences import Pair, pair_scores
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(trained_rm["dir"])
        rm = load_reward_model(str(trained_rm["dir"]), torch.device("cpu"), torch.float32, tok, max_length=16)
        pairs = [Pair(prompt=p, chosen=c, rejected=c + "1", margin=0.0, where="") for p, c in zip(prompts, completions)]
        chosen, _ = pair_scores(rm, pairs)
    assert chosen.dtype == torch.float32 and (chosen.to(torch.bfloat16).float() != chosen).sum() > len(chosen) // 2


def test_eval_and_score_commands(trained_rm, tmp_path, capsys, one_thread):
    assert main(["reward-model", "eval", "--set", f"model={trained_rm['dir']}",
                 "--set", f"dataset={trained_rm['heldout']}"]) == 0
    assert "pairwise accuracy" in capsys.readouterr().out
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,completion\n12+34=,46\n12+34=,47\n")
    out = tmp_path / "scores.jsonl"
    assert main(["reward-model", "score", "--quiet", "--set", f"model={trained_rm['dir']}",
                 "--set", f"dataset={rows}", "--set", f"output_file={out}"]) == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["completion"] for r in scored] == ["46", "47"] and all(isinstance(r["score"], float) for r in scored)


def test_cli_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}) + "\n")
    assert main(["reward-model", "train", "--set", "model=x", "--set", f"dataset={bad}", "--set", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_grpo_with_reward_model_through_cli(trained_rm, addition_files, tmp_path, one_thread):
    out = tmp_path / "grpo"
    rewards = [{"model": str(trained_rm["dir"]), "name": "rm", "normalize": True},
               {"function": "exact_answer", "weight": 0.0}]
    assert main(["train", "--quiet", "--set", f"model={trained_rm['base']}",
                 "--set", f"dataset={addition_files['train']}", "--set", f"output_dir={out}",
                 "--set", f"rewards={json.dumps(rewards)}", "--set", "max_steps=2", "--set", "prompts_per_step=2",
                 "--set", "group_size=4", "--set", "max_completion_length=4", "--set", "generation=beam",
                 "--set", "report_to=[]", "--set", "beta=0"]) == 0
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in l]
    assert len(steps) == 2
    for s in steps:
        assert "reward/rm/mean" in s and "reward/accuracy" in s and "reward/exact_answer/mean" in s
        # weight 0: the total reward is the reward model's (normalised) score alone
        assert s["reward/mean"] == pytest.approx(s["reward/rm/mean"], abs=1e-5)
