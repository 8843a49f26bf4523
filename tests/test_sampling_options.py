"""The sampler's TRL options (min_p, repetition_penalty, generation_kwargs) against hand-worked
values and Hugging Face's own processors, and the special tokens no policy may write: padding
and BOS are never sampled or beam-searched mid-completion, and the text a reward reads is every
token the model wrote."""

import pytest
import torch

from grpo.config import ConfigError, TrainConfig, build
from grpo.data import decode_completions
from grpo.engine.backend import blocked_token_ids
from grpo.engine.generation import _draw, filter_logits, generate_groups, penalize_repetition
from grpo.recipes.tasks import build_char_tokenizer

BASE = {"model": "m", "dataset": "d.jsonl", "rewards": ["exact_answer"]}


def test_min_p_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), min_p=0.2) > float("-inf")  # floor 0.2 * 0.5 = 0.1
    assert kept.tolist() == [[True, True, True, False]]
    kept = filter_logits(probs.log(), min_p=0.7) > float("-inf")  # floor 0.35
    assert kept.tolist() == [[True, False, False, False]]
    # After top-k the ratio test is unchanged: top_k=2 then min_p=0.7 keeps only the best.
    assert (filter_logits(probs.log(), top_k=2, min_p=0.7) > float("-inf")).tolist() == [[True, False, False, False]]


def test_min_p_matches_hugging_faces_warper():
    from transformers.generation.logits_process import MinPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ours = filter_logits(torch.log_softmax(logits, -1), min_p=0.1) > float("-inf")
    theirs = MinPLogitsWarper(0.1)(None, logits.clone()) > float("-inf")
    assert torch.equal(ours, theirs)


def test_repetition_penalty_by_hand_and_against_hugging_face():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 1]]), logits.clone())
    assert torch.equal(penalize_repetition(logits, seen, 2.0), theirs)


def test_draw_samples_the_penalised_distribution_but_records_the_models():
    logits = torch.tensor([[3.0, 2.0, -5.0]])
    seen = torch.tensor([[True, False, False]])
    token, logp = _draw(logits, 1.0, 1, 1.0, None, seen=seen, repetition_penalty=2.0)  # greedy: 3/2 < 2
    assert token.tolist() == [1]
    assert logp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())  # the model's own log-prob
    token, _ = _draw(logits, 1.0, 1, 1.0, None)
    assert token.tolist() == [0]


def test_categorical_draws_the_distribution_and_never_a_blocked_token():
    from grpo.engine.sequences import categorical

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 200_000
    logp = probs.log().expand(n, -1)  # the zero: -inf, as a filter leaves it
    token = categorical(logp, torch.Generator().manual_seed(0)).squeeze(-1)
    counts = torch.bincount(token, minlength=5).double()
    assert counts[4] == 0
    sigma = (n * probs * (1 - probs)).double().sqrt()
    assert ((counts - n * probs).abs() <= 5 * sigma + 1e-9).all(), counts.tolist()  # 5 sigma on every bin
    # Unnormalised log-probs draw the same: the race reads ratios only.
    again = categorical(logp + 3.0, torch.Generator().manual_seed(0)).squeeze(-1)
    assert torch.equal(token, again)
    # Each row draws from its own distribution.
    rows = categorical(torch.tensor([[0.0, float("-inf")], [float("-inf"), 0.0]]).repeat(50, 1), None)
    assert rows.squeeze(-1).tolist() == [0, 1] * 50


def test_standard_exponential_has_the_exponentials_mean_variance_and_no_zero():
    from grpo.engine.sequences import standard_exponential

    e = standard_exponential((400_000,), torch.Generator().manual_seed(1), "cpu").double()
    assert bool((e > 0).all())
    assert e.mean().item() == pytest.approx(1.0, abs=0.01)   # 6.3 standard errors of a mean of 4e5
    assert e.var().item() == pytest.approx(1.0, abs=0.03)
    assert (e > 2.0).double().mean().item() == pytest.approx(float(torch.tensor(-2.0).exp()), abs=0.003)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), build_char_tokenizer()


def prompt(tok, text="12+34="):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("engine", ["auto", "plain"])
def test_greedy_with_repetition_penalty_is_hugging_faces(tiny, engine):
    model, tok = tiny
    ids, mask = prompt(tok)
    theirs = model.generate(ids, attention_mask=mask, do_sample=False, repetition_penalty=1.5, max_new_tokens=8,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    ours = generate_groups(model, ids, mask, group_size=1, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, top_k=1, repetition_penalty=1.5, engine=engine)
    n = int(ours.completion_mask.sum())
    assert ours.completion_ids[0, :n].tolist() == theirs[:n].tolist()
    plain = generate_groups(model, ids, mask, group_size=1, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, top_k=1, engine=engine)
    assert plain.completion_ids.tolist() != ours.completion_ids.tolist()  # the penalty changed something


@pytest.mark.parametrize("engine", ["auto", "plain"])
def test_min_p_one_samples_the_greedy_completion(tiny, engine):
    model, tok = tiny
    ids, mask = prompt(tok)
    common = dict(group_size=4, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  engine=engine)
    greedy = generate_groups(model, ids, mask, top_k=1, **common)
    sampled = generate_groups(model, ids, mask, min_p=1.0, generator=torch.Generator().manual_seed(0), **common)
    free = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(0), **common)
    assert torch.equal(sampled.completion_ids, greedy.completion_ids)
    assert not torch.equal(free.completion_ids, greedy.completion_ids)


def test_generation_kwargs_set_the_sampling_keys_as_in_trl():
    cfg = build(TrainConfig, {**BASE, "top_p": 0.5,
                              "generation_kwargs": {"top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1,
                                                    "max_new_tokens": 32}})
    assert (cfg.top_p, cfg.min_p, cfg.repetition_penalty, cfg.max_completion_length) == (0.9, 0.05, 1.1, 32)
    with pytest.raises(ConfigError, match=r"generation_kwargs: \['num_beams'\] have no equivalent"):
        build(TrainConfig, {**BASE, "generation_kwargs": {"num_beams": 4}})
    with pytest.raises(ConfigError, match=r"min_p: must be in \[0, 1\]"):
        build(TrainConfig, {**BASE, "min_p": 2})
    assert build(TrainConfig, {**BASE, "min_p": None}).min_p == 0.0  # TRL's default spelling


# ---------------------------------------------------------------------------------------------
# Special tokens

@pytest.fixture(scope="module")
def pad_loving(tiny_model_dir):
    """The tiny model with an output bias that makes padding (+100) and then BOS (+50) by far the
    likeliest tokens: an unmasked sampler or beam search emits them at once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    tok = build_char_tokenizer()
    tok.bos_token = "<unk>"  # this tokenizer has none: give it one, id 2
    head.bias.data[tok.pad_token_id] = 100.0
    head.bias.data[tok.bos_token_id] = 50.0
    model.lm_head = head
    return model, tok


@pytest.mark.parametrize("strategy", ["sample", "beam"])
@pytest.mark.parametrize("engine", ["auto", "plain"])
def test_a_policy_cannot_emit_pad_or_bos_mid_completion(pad_loving, strategy, engine):
    model, tok = pad_loving
    blocked = blocked_token_ids(tok)
    assert blocked == [tok.pad_token_id, tok.bos_token_id]
    ids, mask = prompt(tok)
    common = dict(group_size=4, max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  strategy=strategy, engine=engine)
    free = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(0), **common)
    assert (free.completion_ids[free.completion_mask.bool()] == tok.pad_token_id).any()  # the test can fail
    out = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(0), blocked_token_ids=blocked,
                          **common)
    written = out.completion_ids[out.completion_mask.bool()]
    assert not torch.isin(written, torch.tensor(blocked)).any()
    # The recorded log-probs are still the model's own (padding keeps its probability mass).
    full = torch.log_softmax(model(torch.cat([ids, out.completion_ids[:1, :1]], 1)).logits[0, -2], -1)
    assert out.logprobs[0, 0].item() == pytest.approx(full[out.completion_ids[0, 0]].item(), abs=1e-5)


def test_pad_that_is_eos_and_bos_the_template_uses_stay_allowed():
    tok = build_char_tokenizer()
    tok.pad_token = tok.eos_token
    assert blocked_token_ids(tok) == []  # padding with EOS: EOS must stay writable
    tok = build_char_tokenizer()
    tok.bos_token = "<unk>"
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert blocked_token_ids(tok) == [tok.pad_token_id, tok.bos_token_id]  # BOS once, at the start: blocked
    tok.chat_template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert blocked_token_ids(tok) == [tok.pad_token_id]  # every turn opens with BOS: the format's own


def test_rewards_read_every_token_the_model_wrote():
    tok = build_char_tokenizer()
    one, two, pad, eos = (tok.convert_tokens_to_ids(t) for t in ("1", "2", "<pad>", "<eos>"))
    ids = torch.tensor([[one, pad, two, eos, pad], [two, two, two, two, two]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert decode_completions(tok, ids, mask) == ["1<pad>2", "22222"]  # nothing hidden, the EOS not text
    assert decode_completions(tok, ids) == ["1<pad>2", "22222"]         # without a mask: up to the first EOS
    assert tok.batch_decode(ids, skip_special_tokens=True)[0] == "12"   # what used to hide the <pad>
    assert decode_completions(tok, [[one, eos, two]]) == ["1"]            # nothing after the EOS
