"""The options a TRL user reaches for, each checked for what it changes: delta, sync_ref_model,
num_generations_eval, shuffle_dataset, warmup_ratio, optim, the model card, TRL's key names;
and the friction fixes: held-out accuracy for any 0/1 reward, presets that say which keys they
did not set, `grpo sft` with an eval_dataset, --help that points at `grpo config`."""

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo import algorithm as A
from grpo.cli import main, parser
from grpo.config import ConfigError, SFTConfig, TrainConfig, build, describe
from grpo.data import PromptSampler
from grpo.runs.inputs import say_preset
from grpo.runtime.distributed import World
from grpo.runtime.optim import make_optimizer, make_scheduler
from grpo.train.evaluate import AccuracyReward
from grpo.train.loop import train
from grpo.train.reference_sync import mix_into_reference

BASE = {"model": "m", "dataset": "d.jsonl", "rewards": ["exact_answer"]}


def make(**kw):
    return build(TrainConfig, {**BASE, **kw}, "test.yaml")


def small(tiny_model_dir, addition_files, out, **kw):
    values = dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(out),
                  rewards=["exact_answer", "answer_distance"], prompts_per_step=2, group_size=4,
                  max_completion_length=4, max_steps=2, learning_rate=1e-3, max_prompt_length=16)
    return build(TrainConfig, {**values, **kw})


# ---------------------------------------------------------------------------------------------
# delta: two-sided clipping

def test_delta_caps_the_unclipped_ratio_by_hand():
    ratio = torch.tensor([[0.5, 1.0, 1.5, 5.0]], dtype=torch.float64)
    negative, positive = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    loss, low, high = A.clipped_surrogate(ratio, negative, 0.2, 0.2, delta=2.0)
    # -min(min(rho, 2) A, clip(rho, 0.8, 1.2) A) with A = -1: max(min(rho, 2), clip(rho)).
    assert loss.tolist() == [[0.8, 1.0, 1.5, 2.0]]
    assert A.clipped_surrogate(ratio, negative, 0.2, 0.2)[0].tolist() == [[0.8, 1.0, 1.5, 5.0]]
    assert high.tolist() == [[False, False, False, True]] and low.tolist() == [[True, False, False, False]]
    # With A > 0 the clipped branch already bounds it: delta changes nothing.
    assert torch.equal(A.clipped_surrogate(ratio, positive, 0.2, 0.2, delta=2.0)[0],
                       A.clipped_surrogate(ratio, positive, 0.2, 0.2)[0])


def test_delta_zeroes_the_gradient_of_a_huge_ratio_with_negative_advantage():
    logprobs = torch.tensor([[0.0, math.log(5.0)]], requires_grad=True)  # ratios 1 and 5 to a zero anchor
    anchor, mask, adv = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([-1.0])
    norm = dict(num_sequences=1, num_tokens=2, group_size=1, max_completion_length=2)
    grads = {}
    for delta in (None, 2.0):
        loss, _ = A.policy_loss(logprobs, anchor, None, adv, mask, delta=delta, aggregation="token_mean", **norm)
        grads[delta] = torch.autograd.grad(loss, logprobs)[0]
    # rho = e^l: d(-A rho / 2)/dl = rho / 2 = 2.5 at rho = 5 without delta, 0 with it.
    assert grads[None][0, 1].item() == pytest.approx(2.5, rel=1e-5)
    assert grads[2.0][0, 1].item() == 0.0 and grads[2.0][0, 0] == grads[None][0, 0]


def test_delta_reaches_the_loss_and_is_checked(tiny_model_dir, addition_files, tmp_path, monkeypatch):
    import grpo.train.update as update_module

    seen = []
    real = update_module.algorithm.policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["delta"])
        return real(*args, **kwargs)

    monkeypatch.setattr(update_module.algorithm, "policy_loss", spy)
    train(small(tiny_model_dir, addition_files, tmp_path / "r", delta=4.0, max_steps=1), quiet=True)
    assert seen and set(seen) == {4.0}
    with pytest.raises(ConfigError, match="delta: caps the ratio from above: must be > 1"):
        make(delta=0.5)
    with pytest.raises(ConfigError, match="delta: two-sided clipping is for policy_loss ppo_clip"):
        make(delta=2.0, preset="cispo")


# ---------------------------------------------------------------------------------------------
# sync_ref_model (TR-DPO)

def test_mix_into_reference_by_hand():
    policy, reference = torch.nn.Linear(2, 1).double(), torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        policy.weight.fill_(1.0), policy.bias.fill_(2.0), reference.weight.fill_(0.0), reference.bias.fill_(-2.0)
    mix_into_reference(policy, reference, 0.6)
    assert reference.weight.tolist() == [[0.6, 0.6]] and reference.bias.item() == pytest.approx(0.4)


def test_sync_ref_model_moves_the_reference_and_resumes_with_it(tiny_model_dir, addition_files, tmp_path):
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    kw = dict(beta=0.04, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6, save_steps=1,
              max_steps=3)
    train(small(tiny_model_dir, addition_files, tmp_path / "full", **kw), quiet=True)
    state = torch.load(tmp_path / "full" / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    policy = load_file(str(tmp_path / "full" / "checkpoint-1" / "model.safetensors"))
    for name, ref in state["reference"].items():  # pi_ref = 0.6 pi_theta + 0.4 pi_ref(0) after one step
        key = name if name in policy else "lm_head.weight"  # a tied head is saved once
        assert torch.allclose(ref, 0.6 * policy[key] + 0.4 * initial[name], atol=1e-6), name
    # Every other step: after one optimizer step the reference is still the initial model.
    train(small(tiny_model_dir, addition_files, tmp_path / "every2", **{**kw, "ref_model_sync_steps": 2}), quiet=True)
    state = torch.load(tmp_path / "every2" / "checkpoint-1" / "trainer_state.pt", weights_only=False)
    assert all(torch.equal(v, initial[k]) for k, v in state["reference"].items())
    # A resumed run continues with the moved reference: the same weights as the run never stopped.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", part / "checkpoint-2")
    train(small(tiny_model_dir, addition_files, part, **kw), resume=True, quiet=True)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="sync_ref_model: there is no reference model to update at beta 0"):
        make(sync_ref_model=True, beta=0.0)


# ---------------------------------------------------------------------------------------------
# num_generations_eval, shuffle_dataset, the model card, accuracy for any 0/1 reward

def test_eval_generations_shuffle_model_card_and_accuracy_of_a_users_reward(tiny_model_dir, addition_files, tmp_path,
                                                                             capsys):
    calls = []

    def right(prompts, completions, answer, **kw):  # 0/1, and not called exact_answer
        calls.append(list(prompts))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    heldout = [json.loads(l) for l in open(addition_files["heldout"])][:5]
    out = tmp_path / "run"
    train(small(tiny_model_dir, addition_files, out, rewards=[right, "answer_distance"], eval_dataset=heldout,
                num_generations_eval=3, shuffle_dataset=False, max_steps=2, logging_steps=1))
    printed = capsys.readouterr().out
    assert "accuracy: reward 'right', whose values on the held-out set are all 0 or 1" in printed
    assert "held-out before training: eval_reward " in printed and "{" not in printed.split("held-out before")[1][:80]
    rows = [json.loads(l) for l in open(addition_files["train"])]
    # Evaluation: 3 sampled completions per held-out prompt; training: the rows in file order.
    assert calls[0] == [r["prompt"] for r in heldout for _ in range(3)]
    assert calls[1] == [r["prompt"] for r in rows[:2] for _ in range(4)]
    assert calls[2] == [r["prompt"] for r in rows[2:4] for _ in range(4)]
    summary = json.loads((out / "summary.json").read_text())
    assert "eval_accuracy" in summary["eval_before"] and "eval_accuracy" in summary["eval_after"]
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert "reward/accuracy" in metrics[1]
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "grpo" in meta["tags"] and "base_model" not in meta  # local model
    after = summary["eval_after"]
    assert f"| after | {after['eval_reward']:.4f} | {after['eval_accuracy']:.4f} |" in card
    assert "| group_size | 4 |" in card


def test_accuracy_reward_choice():
    world = World(distributed=False)

    class R:
        def __init__(self, name):
            self.name = name

    said = []
    chooser = AccuracyReward([R("dense"), R("binary"), R("exact_answer")], "", said.append)
    chooser.decide({"dense": torch.tensor([0.5, 1.0]), "binary": torch.tensor([0.0, float("nan")]),
                    "exact_answer": torch.tensor([1.0, 0.0])}, world, "the held-out set")
    assert chooser.name == "exact_answer"  # exact_answer first, then config order
    assert chooser.of({"exact_answer": torch.tensor([1.0, 0.0, 1.0, 1.0])}) == 0.75
    chooser = AccuracyReward([R("dense"), R("binary")], "", said.append)
    chooser.decide({"dense": torch.tensor([0.5, 1.0]), "binary": torch.tensor([0.0, float("nan")])}, world, "x")
    assert chooser.name == "binary"  # None (NaN) entries do not count against it
    chooser = AccuracyReward([R("dense")], "", said.append)
    chooser.decide({"dense": torch.tensor([0.5])}, world, "x")
    assert chooser.name is None and "not reported" in said[-1]
    assert AccuracyReward([R("dense")], "dense", said.append).name == "dense"  # named: used as it is


def test_a_bad_accuracy_reward_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert main(["train", "--set", "model=/nope", "--set", f"dataset={data}", "--set", "rewards=[exact_answer]",
                 "--set", "accuracy_reward=exact", "--set", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accuracy_reward: 'exact' is not one of the run's rewards ['exact_answer']" in err


def test_prompt_sampler_in_file_order():
    s = PromptSampler(5, seed=0, shuffle=False)
    assert s.next(7) == [0, 1, 2, 3, 4, 0, 1] and s.epochs_done == 1.4


# ---------------------------------------------------------------------------------------------
# warmup_ratio, optim

def test_warmup_ratio_is_a_share_of_all_optimizer_steps():
    cfg = make(warmup_ratio=0.25, learning_rate=1.0, lr_scheduler="linear", max_steps=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    # ceil(0.25 * 10) = 3 warm-up steps, then linear decay over the other 7.
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0]) and lrs[4] == pytest.approx(6 / 7)
    with pytest.raises(ConfigError, match="give warmup_steps or warmup_ratio, not both"):
        make(warmup_ratio=0.1, warmup_steps=5)


def test_optim_choices():
    model = torch.nn.Linear(3, 2)
    for name, kind in (("adamw_torch", torch.optim.AdamW), ("adamw_torch_fused", torch.optim.AdamW),
                       ("adafactor", torch.optim.Adafactor), ("sgd", torch.optim.SGD),
                       ("rmsprop", torch.optim.RMSprop)):
        assert isinstance(make_optimizer(model, make(optim=name)), kind)
    # SGD is the textbook step: w <- w - lr * g.
    before = model.weight.detach().clone()
    optimizer = make_optimizer(model, make(optim="sgd", learning_rate=0.1))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert torch.allclose(model.weight, before - 0.1 * torch.ones_like(before))
    adam = make_optimizer(model, make(adam_epsilon=1e-3))
    assert adam.defaults["eps"] == 1e-3


def test_fused_adamw_runs_the_fused_kernel_on_cpu_and_takes_the_foreach_step():
    """adamw_torch_fused (TRL's default) is fused on CPU too, not silently foreach; same update."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = [p.detach().clone() for p in models[0].parameters()]
    opts = [make_optimizer(m, make(optim=name, learning_rate=1e-2, weight_decay=0.1))
            for m, name in zip(models, ("adamw_torch", "adamw_torch_fused"))]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    x = torch.randn(4, 5)
    for _ in range(3):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b, a0 in zip(models[0].parameters(), models[1].parameters(), before):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, a0, atol=1e-3)
    with pytest.raises(ConfigError, match="optim: 'lion' is not one of adamw_torch"):
        make(optim="lion")


# ---------------------------------------------------------------------------------------------
# TRL's names

def test_trls_names_map_onto_ours():
    cfg = make(num_generations=4, epsilon=0.3, loss_type="dr_grpo", scale_rewards=False,
               importance_sampling_level="sequence", lr_scheduler_type="constant_with_warmup", steps_per_generation=2,
               prompts_per_step=4, bf16=True)
    assert (cfg.group_size, cfg.epsilon_low, cfg.epsilon_high, cfg.loss_aggregation, cfg.advantage_estimator,
            cfg.ratio_level, cfg.lr_scheduler, cfg.num_minibatches, cfg.dtype) == \
        (4, 0.3, 0.3, "constant_normalizer", "none", "sequence", "constant", 2, "bfloat16")
    assert make(epsilon=0.2, epsilon_high=0.28).epsilon_high == 0.28
    assert make(scale_rewards=True).advantage_estimator == "group"
    cispo = make(loss_type="cispo")
    assert (cispo.policy_loss, cispo.loss_aggregation) == ("cispo", "token_mean")
    with pytest.raises(ConfigError, match="loss_type: 'sapo' has no equivalent here"):
        make(loss_type="sapo")
    with pytest.raises(ConfigError, match="loss_type .TRL's name. sets loss_aggregation"):
        make(loss_type="dapo", loss_aggregation="sequence_mean")
    with pytest.raises(ConfigError, match="reward_weights: expected one number per entry of rewards"):
        make(reward_weights=[1.0, 2.0])


def test_trls_peft_config_becomes_our_peft_key():
    import peft

    lora = make(peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    assert lora.peft == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert make(peft_config={"r": 2, "lora_alpha": 4}).peft == {"r": 2, "alpha": 4}
    assert make(peft_config=peft.LoraConfig(r=2)).peft["target_modules"] is None  # peft's default per architecture
    with pytest.raises(ConfigError, match=r"peft_config: \['use_dora'\] are not supported here"):
        make(peft_config=peft.LoraConfig(r=2, use_dora=True))
    with pytest.raises(ConfigError, match="peft_config .TRL's name. sets peft"):
        make(peft_config={"r": 2}, peft={"r": 4})


def test_trls_model_config_keys_become_ours():
    """A TRL script's YAML recipe holds its ModelConfig too: model_name_or_path, use_peft with
    lora_* (TRL's defaults where one is missing), load_in_4bit (QLoRA), attn_implementation."""
    values = {k: v for k, v in BASE.items() if k != "model"}
    cfg = build(TrainConfig, {**values, "model_name_or_path": "Qwen/Qwen2.5-0.5B", "use_peft": True, "lora_r": 8,
                              "lora_target_modules": ["q_proj", "v_proj"], "load_in_4bit": True,
                              "use_bnb_nested_quant": True, "attn_implementation": "sdpa",
                              "trust_remote_code": False}, "test.yaml")
    assert cfg.model == "Qwen/Qwen2.5-0.5B"
    assert cfg.peft == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                        "quantization": "nf4", "double_quant": True}
    assert cfg.model_init_kwargs == {"attn_implementation": "sdpa", "trust_remote_code": False}
    assert make(use_peft=True).peft == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None}
    assert make(use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="fp4").peft["quantization"] == "fp4"
    assert make(use_peft=False, lora_r=8).peft == {}  # as TRL: LoRA fields without use_peft are unused
    for kw, message in [(dict(lora_r=8), r"lora_r .TRL's ModelConfig. take effect only with use_peft: true"),
                        (dict(use_peft=False, load_in_4bit=True), "a 4-bit base trains only through an adapter"),
                        (dict(load_in_8bit=True), "8-bit bases are not offered"),
                        (dict(use_peft="yes"), "use_peft: expected true or false"),
                        (dict(use_peft=True, load_in_4bit="false"), "load_in_4bit: expected true or false"),
                        (dict(use_peft=False, peft={"r": 4}), "use_peft: false .TRL's name. contradicts peft"),
                        (dict(use_peft=True, peft={"r": 4}), "use_peft .TRL's name. sets peft"),
                        (dict(attn_implementation="eager", model_init_kwargs={"attn_implementation": "sdpa"}),
                         "attn_implementation .TRL's ModelConfig. is also in model_init_kwargs")]:
        with pytest.raises(ConfigError, match=message):
            make(**kw)


def test_peft_config_with_peft_s_default_modules_trains_an_adapter_on_q_and_v(tiny_model_dir, addition_files,
                                                                             tmp_path):
    import peft
    from safetensors.torch import load_file

    from grpo.train.loop import train
    cfg = build(TrainConfig, dict(model=tiny_model_dir, dataset=addition_files["train"], output_dir=str(tmp_path / "o"),
                                  rewards=["answer_distance"], prompts_per_step=2, group_size=4, max_steps=1,
                                  max_completion_length=4, max_prompt_length=16, report_to=[],
                                  peft_config=peft.LoraConfig(r=2, lora_alpha=4)))
    names = load_file(str(train(cfg, quiet=True) / "adapter_model.safetensors")).keys()
    assert names and {n.split(".")[-3] for n in names} == {"q_proj", "v_proj"}  # peft's Llama default


def test_preset_says_which_of_its_keys_it_did_not_set():
    said = []
    say_preset(make(preset="dapo", beta=0.04), said.append)
    assert said == ["preset dapo: your config sets beta: 0.04 (the preset's 0.0); the preset's value of that key "
                    "is not used"]
    said.clear()
    say_preset(make(preset="dapo"), said.append)
    assert said == []


# ---------------------------------------------------------------------------------------------
# grpo sft with a held-out set

def test_sft_heldout_loss_is_the_completion_loss(tiny_model_dir, addition_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo.engine.models import load_tokenizer
    from grpo.supervised.sft import collate, completion_loss, encode_pairs, train_sft

    heldout = [{**json.loads(l), "completion": json.loads(l)["answer"]} for l in open(addition_files["heldout"])][:6]
    cfg = build(SFTConfig, dict(model=tiny_model_dir, dataset=addition_files["train"], eval_dataset=heldout,
                                output_dir=str(tmp_path / "sft"), max_steps=2, batch_size=4, eval_steps=1,
                                max_completion_length=8, max_prompt_length=16))
    train_sft(cfg, quiet=True)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    pairs = encode_pairs(load_tokenizer(tiny_model_dir), heldout, cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = completion_loss(model, *collate(pairs, 0, torch.device("cpu"))).item()
    assert summary["eval_before"]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert summary["eval_before"]["eval_accuracy"] == 0.0  # a random model
    metrics = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 1]
    assert (tmp_path / "sft" / "README.md").is_file()


# ---------------------------------------------------------------------------------------------
# The reference and --help

@pytest.mark.parametrize("command", ["train", "sft", "demo", "reward-model", "config"])
def test_help_shows_examples_and_points_at_grpo_config(command, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and ("grpo config" in text)


def test_config_reference_is_a_config_that_builds():
    text = describe(TrainConfig, "grpo train")
    values = yaml.safe_load(text)
    assert values["rename_columns"] == {} and values["generation_kwargs"] == {}
    build(TrainConfig, {**values, **BASE})  # every default, as printed, is valid
    assert "Also accepted as\n# `num_generations`" in text and "loss_type:" in text


def test_every_key_of_every_command_is_documented():
    from grpo.config import COMMANDS, field_docs
    from grpo.config.loading import defaults

    for name, (cls, _) in COMMANDS.items():
        docs = field_docs(cls)
        assert [k for k in defaults(cls) if not docs.get(k)] == [], name
