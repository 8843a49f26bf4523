"""Process supervision: the `process` estimator (DeepSeekMath 4.1.3), steps of a completion mapped
to its tokens, step rewards, and the step task. Hand-worked values, a naive loop, the reduction to
`group`, per-token advantages in the loss's gradient, and bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grpo.algorithm import StepRewards, compute_advantages, policy_loss, process_advantages
from grpo.data.steps import char_ends_to_tokens, char_ends_to_tokens_batch, delimiter_ends, splitter_ends, step_texts
from grpo.errors import ConfigError, RewardError
from grpo.rewards.scoring import Reward
from grpo.rewards.steps import score_steps

ROOT3 = math.sqrt(1 / 3)


def steps_of(scores, ends, lengths, width, outcome=False):
    """StepRewards from ragged lists."""
    S = max(len(s) for s in scores)
    return StepRewards(torch.tensor([s + [0.0] * (S - len(s)) for s in scores], dtype=torch.float64),
                       torch.tensor([e + [0] * (S - len(e)) for e in ends]),
                       torch.tensor([[j < len(s) for j in range(S)] for s in scores]),
                       torch.tensor(lengths), width, outcome)


def test_hand_worked_values():
    # o1: steps ending on tokens 1 and 3 with rewards 1, 0; o2: one step ending on token 2, reward 0.
    # R = {1, 0, 0}: mean 1/3, std (Bessel) sqrt(1/3); r~ = 2 sqrt(1/3) for the 1, -sqrt(1/3) for the 0s.
    st = steps_of([[1.0, 0.0], [0.0]], [[1, 3], [2]], [4, 3], 4)
    a = compute_advantages("process", torch.tensor([0.0, 0.0]), 2, eps=1e-12, steps=st)
    assert a.shape == (2, 4)
    expected = [[ROOT3, ROOT3, -ROOT3, -ROOT3], [-ROOT3, -ROOT3, -ROOT3, 0.0]]
    assert torch.allclose(a, torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_outcome_is_a_final_step_on_the_last_token():
    # o1: one step (reward 1) ending on token 0, outcome 1 on its last token 2; o2: a step 0 on token 1, outcome 0.
    # R = {1, 1, 0, 0}: mean 1/2, std sqrt(1/3); r~ = +-(1/2) / sqrt(1/3) = +-sqrt(3)/2.
    st = steps_of([[1.0], [0.0]], [[0], [1]], [3, 2], 3, outcome=True)
    a = compute_advantages("process", torch.tensor([1.0, 0.0]), 2, eps=1e-12, steps=st)
    h = math.sqrt(3) / 2
    assert torch.allclose(a, torch.tensor([[2 * h, h, h], [-2 * h, -2 * h, 0.0]]), atol=1e-6)


def naive_process(scores, ends, width, G, eps):
    """The paper's formulas as loops over plain floats."""
    out = []
    for p in range(len(scores) // G):
        R = [r for i in range(p * G, (p + 1) * G) for r in scores[i]]
        mean = sum(R) / len(R)
        std = math.sqrt(sum((r - mean) ** 2 for r in R) / (len(R) - 1)) if len(R) > 1 else 0.0
        tied = all(r == R[0] for r in R)
        for i in range(p * G, (p + 1) * G):
            normalised = [0.0 if tied else (r - mean) / (std + eps) for r in scores[i]]
            out.append([sum(n for n, e in zip(normalised, ends[i]) if e >= t) for t in range(width)])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_naive_loop(seed):
    rng = random.Random(seed)
    G, P, width = 3, 4, 9
    scores, ends, lengths = [], [], []
    for _ in range(G * P):
        length = rng.randint(1, width)
        k = rng.randint(1, 4)
        ends.append(sorted(rng.randint(0, length - 1) for _ in range(k - 1)) + [length - 1])
        scores.append([float(rng.choice([0, 1, 0.5, -2])) for _ in range(k)])
        lengths.append(length)
    if seed == 0:  # a tied group: exactly 0
        for i in range(G):
            scores[i] = [1.0] * len(scores[i])
    a = compute_advantages("process", torch.zeros(G * P), G, eps=1e-4, steps=steps_of(scores, ends, lengths, width))
    naive = torch.tensor(naive_process(scores, ends, width, G, 1e-4), dtype=torch.float64)
    assert torch.allclose(a.double(), naive, atol=1e-5)
    if seed == 0:
        assert bool((a[:G] == 0).all())


@pytest.mark.parametrize("seed", range(3))
def test_reduces_to_group_when_the_only_step_is_the_last_token(seed):
    g = torch.Generator().manual_seed(seed)
    G, N, width = 4, 16, 7
    rewards = torch.randint(0, 3, (N,), generator=g).float()
    lengths = torch.randint(1, width + 1, (N,), generator=g)
    group = compute_advantages("group", rewards, G, eps=1e-4)
    on = torch.arange(width)[None, :] < lengths[:, None]
    # The outcome alone (no step rewards) ...
    none = StepRewards(torch.zeros(N, 0), torch.zeros(N, 0, dtype=torch.long), torch.zeros(N, 0, dtype=torch.bool),
                       lengths, width, outcome=True)
    a = compute_advantages("process", rewards, G, eps=1e-4, steps=none)
    assert torch.equal(a, torch.where(on, group[:, None], 0.0))
    # ... and the same reward given as the one step, ending on the last token, without an outcome.
    last = StepRewards(rewards[:, None], (lengths - 1)[:, None], torch.ones(N, 1, dtype=torch.bool), lengths, width,
                       outcome=False)
    assert torch.equal(compute_advantages("process", rewards, G, eps=1e-4, steps=last), a)


def test_needs_steps_and_ends_inside_the_completion():
    with pytest.raises(ValueError, match="needs the completions' steps"):
        compute_advantages("process", torch.zeros(4), 2, eps=1e-4)
    with pytest.raises(ValueError, match="step ends must be token indices"):
        process_advantages(torch.ones(2, 1), torch.tensor([[5], [0]]), torch.ones(2, 1, dtype=torch.bool), 2, 5, 1e-4)


def test_per_token_advantages_reach_the_gradient():
    """With ratio 1 (one update per rollout), d loss / d l_(i,t) = -A_(i,t) * m_(i,t) / (|o_i| N)
    for sequence_mean: each token is pushed by its own advantage."""
    st = steps_of([[1.0, 0.0], [0.0], [2.0, 1.0, 0.0], [0.0]], [[1, 3], [2], [0, 1, 2], [0]], [4, 3, 3, 1], 4)
    adv = compute_advantages("process", torch.zeros(4), 2, eps=1e-4, steps=st)
    mask = (torch.arange(4)[None, :] < st.lengths[:, None]).float()
    logprobs = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    norm = dict(num_sequences=4, num_tokens=float(mask.sum()), group_size=2, max_completion_length=4)
    loss, _ = policy_loss(logprobs, None, None, adv.double(), mask, **norm)
    loss.backward()
    expected = -adv.double() * mask / (mask.sum(1, keepdim=True) * 4)
    assert torch.allclose(logprobs.grad, expected)
    assert not torch.allclose(adv[:, :1].expand(-1, 4) * mask, adv * mask)  # really per token

    # The normalisers are the whole batch's: two micro-batches' losses sum to the full batch's.
    for mode in ("sequence_mean", "token_mean", "constant_normalizer", "group_sum"):
        lp = logprobs.detach()
        old = lp - 0.1 * torch.randn_like(lp)
        full, _ = policy_loss(lp, old, None, adv.double(), mask, aggregation=mode, **norm)
        parts = sum(policy_loss(lp[s], old[s], None, adv.double()[s], mask[s], aggregation=mode, **norm)[0]
                    for s in (slice(0, 2), slice(2, 4)))
        assert torch.allclose(full, parts)


# --------------------------------------------------------------------------------------------
# Steps: text -> character ends -> tokens


def test_delimiter_steps():
    assert delimiter_ends("7*5-6\n35-6\n29", "\n") == [6, 11, 13]
    assert step_texts("7*5-6\n35-6\n29", [6, 11, 13]) == ["7*5-6\n", "35-6\n", "29"]
    assert delimiter_ends("a\nb\n", "\n") == [2, 4]  # ends with the delimiter: no empty step after it
    assert delimiter_ends("no delimiter", "\n") == [12]  # one step
    assert delimiter_ends("", "\n") == [0]  # an empty completion is one (empty) step
    assert delimiter_ends("x<step>y<step>z", "<step>") == [7, 14, 15]


def test_splitter_bad_input_names_the_function():
    def halves(text):
        return [len(text) // 2]

    assert splitter_ends("abcd", halves, "halves") == [2, 4]
    with pytest.raises(RewardError, match=r"step_splitter 'beyond' returned the step end 9 for a completion of 4"):
        splitter_ends("abcd", lambda t: [9], "beyond")
    with pytest.raises(RewardError, match=r"step_splitter 'backwards'.*increasing"):
        splitter_ends("abcd", lambda t: [3, 2], "backwards")
    with pytest.raises(RewardError, match=r"step_splitter 'text' returned"):
        splitter_ends("abcd", lambda t: "2", "text")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE fast tokenizer trained here (nothing downloaded): tokens span
    several characters, so a step end falls inside a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["First we add 3 and 4.\nThen we multiply by 5.\nSo the answer is 35.\n" * 3,
              "Step one: 12*3=36\nStep two: 36-6=30\nAnswer: 30", "héllo\nwörld\n\nünïcode\n" * 5]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("text", ["First we add 3 and 4.\nThen we multiply by 5.\nSo the answer is 35.",
                                  "Step one: 12*3=36\nStep two: 36-6=30\nAnswer: 30\n",
                                  "héllo\nwörld\n\nünïcode", "no newline at all"])
def test_step_ends_map_to_the_tokens_the_tokenizers_offsets_give(bpe_tokenizer, text):
    enc = bpe_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = enc["input_ids"]
    assert bpe_tokenizer.decode(ids) == text
    assert any(e - s > 1 for s, e in enc["offset_mapping"])  # multi-character tokens
    ends = delimiter_ends(text, "\n")
    length = len(ids) + 1  # the EOS after the text
    got = char_ends_to_tokens(bpe_tokenizer, ids, ends, length)
    # The offsets' answer: the token whose character span holds the step's last character.
    from_offsets = [next(k for k, (s, e) in enumerate(enc["offset_mapping"]) if s <= c - 1 < e) for c in ends[:-1]]
    assert got == from_offsets + [length - 1]


def _random_completions(tokenizer, seed: int, n: int = 40):
    """n completions of the BPE tokenizer's text, some not its own encoding (as a sampler writes),
    their step ends after each newline, and the answer read off the definition directly: the
    smallest k whose prefix decodes to at least the step's end, found by trying every k."""
    import random

    rng = random.Random(seed)
    pieces = ["12*3=36", "héllo", "wörld", "ünïcode", " then ", "\n", "\n\n", "Answer: 30", "é", "+", "7"]
    rows, ends, lengths, expected = [], [], [], []
    for _ in range(n):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if rng.random() < 0.3:
            ids = ids + tokenizer("wörld\n", add_special_tokens=False)["input_ids"][::-1]
        row_ends = delimiter_ends(tokenizer.decode(ids), "\n")
        length = len(ids) + rng.randrange(0, 2)  # with and without an EOS after the text
        prefix = [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]
        scan = [min(next(k for k in range(1, len(ids) + 1) if prefix[k] >= e) - 1, length - 1)
                for e in row_ends[:-1]]
        rows.append(ids), ends.append(row_ends), lengths.append(length)
        expected.append(scan + [max(length - 1, 0)])
    assert any(len(e) > 2 for e in ends) and any(len(e) == 1 for e in ends)
    return rows, ends, lengths, expected


def test_step_ends_of_a_batch_match_a_linear_scan_of_every_prefix(bpe_tokenizer):
    from grpo.data import steps as steps_module

    rows, ends, lengths, expected = _random_completions(bpe_tokenizer, 0)
    texts = bpe_tokenizer.batch_decode(rows)
    # The incremental decoder's pieces join into each text here, so the one-pass path decides.
    assert all(steps_module._streamed_characters(bpe_tokenizer, r, t) is not None for r, t in zip(rows, texts))
    assert char_ends_to_tokens_batch(bpe_tokenizer, rows, ends, lengths) == expected
    assert char_ends_to_tokens_batch(bpe_tokenizer, rows, ends, lengths, texts) == expected
    assert [char_ends_to_tokens(bpe_tokenizer, r, e, n) for r, e, n in zip(rows, ends, lengths)] == expected
    # The prefix bisection, which tokenizers without an incremental decoder take, gives the same.
    assert [[min(k, n - 1) for k in row] for row, n in zip(steps_module._prefix_ends(bpe_tokenizer, rows, ends),
                                                              lengths)] == [x[:-1] for x in expected]


def test_step_ends_fall_back_to_prefixes_without_an_incremental_decoder(bpe_tokenizer, monkeypatch):
    from grpo.data import steps as steps_module

    rows, ends, lengths, expected = _random_completions(bpe_tokenizer, 1, n=12)
    monkeypatch.setattr(steps_module, "DecodeStream", None)
    assert char_ends_to_tokens_batch(bpe_tokenizer, rows, ends, lengths) == expected


@pytest.mark.parametrize("path", ["one pass", "prefixes"])
def test_a_step_ends_on_the_token_that_completes_its_last_character(bpe_tokenizer, monkeypatch, path):
    """"é" written as its two bytes, one token each: the step "aé" ends on the second byte's token,
    on either path; a completion whose text the incremental decoder cannot reproduce (it ends on
    a lone byte) is mapped through its prefixes."""
    from grpo.data import steps as steps_module

    if path == "prefixes":
        monkeypatch.setattr(steps_module, "DecodeStream", None)
    vocab = bpe_tokenizer.get_vocab()
    a, first, second, b = vocab["a"], vocab["Ã"], vocab["©"], vocab["b"]  # byte-level symbols of 0xC3, 0xA9
    assert bpe_tokenizer.decode([a, first, second, b]) == "aéb"
    assert char_ends_to_tokens(bpe_tokenizer, [a, first, second, b], [2, 3], 5) == [2, 4]
    lone = [a, first, second, b, first]
    text = bpe_tokenizer.decode(lone)
    assert text == "aéb\ufffd"
    assert steps_module._streamed_characters(bpe_tokenizer, lone, text) is None
    assert char_ends_to_tokens(bpe_tokenizer, lone, [3, 4], 6) == [3, 5]


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    """SentencePiece-style (Llama 2, Mistral): a character the vocabulary lacks is written as its
    UTF-8 bytes, each its own <0xNN> token, which a decoded prefix shows as one U+FFFD per byte."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["First we add 3 and 4.\nThen we multiply by 5.\nSo the answer is 35.\n" * 3],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>", *bytes_]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("path", ["one pass", "prefixes"])
def test_step_ends_under_byte_fallback_land_on_the_newlines(byte_fallback_tokenizer, monkeypatch, path):
    """Characters written byte by byte make the decoded prefixes' lengths fall as well as rise;
    every step still ends on its newline's token."""
    from grpo.data import steps as steps_module

    if path == "prefixes":
        monkeypatch.setattr(steps_module, "DecodeStream", None)
    tok = byte_fallback_tokenizer
    text = "add 3 日本\n35. 日本\n\nwe 35.日本 and 4.\n日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text and sum(p.startswith("<0x") for p in pieces) == 24  # 4 x 日本, 3 bytes each
    newlines = [k for k, piece in enumerate(pieces) if "\n" in piece]  # one newline each
    assert len(newlines) == text.count("\n")
    assert char_ends_to_tokens(tok, ids, delimiter_ends(text, "\n"), len(ids) + 1) == newlines + [len(ids)]


def test_step_ends_on_the_character_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("12+3 4", add_special_tokens=False)["input_ids"]
    assert char_ends_to_tokens(tok, ids, delimiter_ends("12+3 4", " "), len(ids) + 1) == [4, 6]


# --------------------------------------------------------------------------------------------
# Step rewards


def test_step_rewards_are_summed_with_weights_per_step():
    def first(prompts, completions, steps, **_):
        return [[1.0] * len(s) for s in steps]

    def half(prompts, completions, steps, **_):
        return [[0.5 * j for j in range(len(s))] for s in steps]

    total, means = score_steps([Reward("first", first, 2.0, per="step"), Reward("half", half, 1.0, per="step")],
                               ["p", "p"], ["a\nb\nc", "d"], [["a\n", "b\n", "c"], ["d"]], {})
    assert total == [[2.0, 2.5, 3.0], [2.0]]
    assert torch.allclose(means["half"], torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("returned, message", [
    ([[1.0, 0.0], [1.0]], r"step reward 'short' returned 2 scores for completion 0, which has 3 steps"),
    ([[1.0, 0.0, 1.0]], r"step reward 'short' returned 1 lists; expected 2"),
    ([[1.0, "x", 1.0], [1.0]], r"step reward 'short' returned 'x' for step 1 of completion 0"),
    ([[1.0, float("nan"), 1.0], [1.0]], r"step reward 'short' returned 'nan' for step 1 of completion 0"),
    ([1.0, 1.0], r"step reward 'short' returned '1.0' for completion 0; expected a list of 3 scores"),
])
def test_bad_step_scores_name_the_function(returned, message):
    with pytest.raises(RewardError, match=message):
        score_steps([Reward("short", lambda prompts, completions, steps: returned, per="step")], ["p", "p"],
                    ["a\nb\nc", "d"], [["a\n", "b\n", "c"], ["d"]], {})


def test_config_ties_step_rewards_to_the_process_estimator():
    from grpo.config import TrainConfig, build

    base = dict(model="m", dataset="d.jsonl")
    step = {"function": "grpo.recipes.steps:step_verifier", "per": "step"}
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.per.*need advantage_estimator: process"):
        build(TrainConfig, {**base, "rewards": [step]}, "test")
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.per.*'each' is not one of completion, group, step"):
        build(TrainConfig, {**base, "rewards": [{"function": "exact_answer", "per": "each"}]}, "test")
    with pytest.raises(ConfigError, match=r"policy_loss.*not with advantage_estimator: process"):
        build(TrainConfig, {**base, "rewards": [step], "advantage_estimator": "process", "policy_loss": "gmpo"},
              "test")
    cfg = build(TrainConfig, {**base, "rewards": ["exact_answer", step], "advantage_estimator": "process"}, "test")
    assert cfg.step_delimiter == "\n"


# --------------------------------------------------------------------------------------------
# The step task and a run


def test_step_task_chains_and_verifier():
    from grpo.recipes.steps import chain, final_answer, problems, reduce_once, step_verifier

    assert chain("(3+4)*5-6") == ["7*5-6", "35-6", "29"]
    assert reduce_once("2*(3+4*2)") == "2*(3+8)" and reduce_once("2*(3+8)") == "2*11"
    assert reduce_once("9-2-3") == "7-3"  # left to right
    good, wrong_second, shortcut = ["7*5-6\n", "35-6\n", "29"], ["7*5-6\n", "36-6\n", "30"], ["29"]
    assert step_verifier(["(3+4)*5-6="] * 3, [None] * 3, [good, wrong_second, shortcut]) == \
        [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0]]
    assert step_verifier(["1+2="], [None], [["3\n", "3"]]) == [[1.0, 0.0]]  # nothing left to reduce
    assert step_verifier(["1+2="], [None], [["(("]]) == [[0.0]]
    assert final_answer(["7*5-6\n35-6\n29", "7*5-6\n35-6\n29\n", "29\n30"], ["29"] * 3) == [1.0, 1.0, 0.0]
    train, heldout = problems(seed=0, heldout=50, total=400)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    # Every chain and its EOS fit the recipe's completion length (one token per character).
    from grpo.recipes.steps import GRPO, SFT
    longest = max(len(r["chain"]) for r in problems(seed=0)[0])
    assert longest + 1 <= min(SFT["max_completion_length"], GRPO["max_completion_length"])
    assert all(r["chain"].split("\n") == chain(r["prompt"][:-1]) for r in train + heldout)
    # Longer expressions (the process bench's --operators): one line per operation, and a completion
    # length that holds the longest chain and its EOS.
    from grpo.recipes.steps import completion_tokens
    assert completion_tokens(problems(seed=0)[0]) == SFT["max_completion_length"]
    longer = sum(problems(seed=0, heldout=50, total=400, operators=4), [])
    assert all(len(r["chain"].split("\n")) == 4 and r["chain"].split("\n") == chain(r["prompt"][:-1]) for r in longer)
    assert max(len(r["chain"]) for r in longer) + 1 <= completion_tokens(longer) > SFT["max_completion_length"]


def test_training_with_step_rewards_from_python(tiny_model_dir, tmp_path, one_thread):
    """Process supervision end to end: the step function sees each completion's steps (cut at the
    delimiter), and the run trains on per-token advantages."""
    from grpo.train.loop import train

    seen = []

    def per_char(prompts, completions, steps, **_):
        seen.append((list(completions), [list(s) for s in steps]))
        return [[float(t.strip().isdigit()) for t in s] for s in steps]

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    out = tmp_path / "run"
    train(dict(model=tiny_model_dir, dataset=rows, output_dir=str(out), max_steps=2, prompts_per_step=2,
               group_size=4, max_completion_length=6, learning_rate=1e-3, logging_steps=1, samples_steps=0,
               advantage_estimator="process", step_delimiter=" ",
               rewards=["exact_answer", {"function": per_char, "per": "step"}]), quiet=True)
    assert len(seen) == 2
    for completions, steps in seen:
        assert all("".join(s) == c for s, c in zip(steps, completions))
    import json
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("reward/per_char/mean" in m for m in metrics)


def test_steps_demo_end_to_end(tmp_path, one_thread, monkeypatch):
    """`grpo demo --task steps`, shortened: warm start, process-supervised GRPO, held-out accuracy."""
    from grpo.cli import main
    from grpo.recipes import steps

    monkeypatch.setitem(steps.SFT, "max_steps", 5)

    out = tmp_path / "steps"
    assert main(["demo", "--task", "steps", "--output-dir", str(out), "--quiet", "--set", "max_steps=2",
                 "--set", "eval_max_prompts=8", "--set", "eval_steps=0", "--set", "prompts_per_step=2"]) == 0
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["accuracy_after"] <= 1 and summary["grpo"]["advantage_estimator"] == "process"
    metrics = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/step_verifier/mean" in metrics[-1]


def test_process_from_yaml_with_a_splitter_and_a_step_reward_file(tiny_model_dir, addition_files, tmp_path,
                                                                   one_thread, capsys):
    """The YAML way: a step reward and a step splitter from a file; a splitter that returns an
    offset outside the completion stops the run with one line naming it."""
    from grpo.cli import main

    (tmp_path / "steps.py").write_text(
        "def digits(completion):\n"
        "    return list(range(1, len(completion)))  # a step per character\n"
        "def beyond(completion):\n"
        "    return [len(completion) + 5]\n"
        "def per_step(prompts, completions, steps, answer, **kwargs):\n"
        "    return [[float(s in a) for s in ss] for ss, a in zip(steps, answer)]\n")
    config = tmp_path / "process.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndataset: {addition_files['train']}\noutput_dir: {tmp_path / 'run'}\n"
        "max_steps: 1\nprompts_per_step: 2\ngroup_size: 3\nmax_completion_length: 4\nlogging_steps: 1\n"
        "samples_steps: 0\nadvantage_estimator: process\nstep_splitter: steps.py:digits\n"
        "rewards:\n  - exact_answer\n  - {function: steps.py:per_step, per: step}\n")
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("reward/per_step/mean") == 1
    bad = config.read_text().replace("steps.py:digits", "steps.py:beyond").replace("'run'", "'run2'")
    config.write_text(bad.replace(str(tmp_path / "run"), str(tmp_path / "run2")))
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_splitter 'beyond' returned the step end" in err[0]


# --------------------------------------------------------------------------------------------
# Multi-turn: a turn is a step

from test_agent_training import tool_model  # noqa: E402, F401  (the fixture: a tiny model with a tool template)


def test_turn_ends_and_turn_steps():
    from grpo.agents import Episode
    from grpo.train.agent_rollout import turn_ends, turn_steps

    assert turn_ends([0, 1, 1, 0, 0, 1, 0, 1, 1]) == [2, 5, 8]
    assert turn_ends([1, 1, 1]) == [2] and turn_ends([]) == []

    def episode(mask, turn_rewards):
        n = len(mask)
        return Episode(prompt_ids=[1], completion_ids=list(range(n)), loss_mask=mask, logprobs=[0.0] * n,
                       turn_rewards=turn_rewards)

    # Episode 0: turns ending on tokens 1 and 4 with rewards 1, 0; episode 1: one turn ending on 2, reward 0.
    st = turn_steps([episode([1, 1, 0, 1, 1], [1.0, 0.0]), episode([1, 1, 1, 0, 0], [0.0])], 5, has_outcome=False)
    a = compute_advantages("process", torch.zeros(2), 2, eps=1e-12, steps=st)
    assert torch.allclose(a, torch.tensor([[ROOT3, ROOT3, -ROOT3, -ROOT3, -ROOT3], [-ROOT3] * 3 + [0.0, 0.0]]),
                          atol=1e-6)
    with pytest.raises(RewardError, match="episode 0: 2 per-turn rewards for 1 model turns"):
        turn_steps([episode([1, 1, 0], [1.0, 0.0])], 3, has_outcome=False)


def test_per_turn_environment_rewards_are_steps_of_the_rollout(tool_model, tmp_path, one_thread):  # noqa: F811
    from test_agent_training import ROWS, ScriptedBackend, build_rewards, config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.agents import check_setup
    from grpo.train.agent_rollout import AgentSetup, turn_ends
    from grpo.train.rollout import collect_rollout

    made = []

    class Twice:
        """A text environment of two turns: each turn's reward is 1 for every other episode."""

        def reset(self, **_):
            made.append(self)
            self.n, self.k = 0, len(made)
            return None

        def step(self, text):
            self.n += 1
            return "again", float(self.k % 2), self.n == 2

    model_dir = tool_model
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = config(model_dir, tmp_path, tools=[], environment_factory=Twice, rewards=[], advantage_estimator="process")
    setup = AgentSetup(*check_setup(tok, [], Twice))
    try:
        rollout = collect_rollout(policy, None, tok, ROWS * 2, build_rewards(cfg), cfg,
                                  torch.Generator().manual_seed(0), backend=ScriptedBackend(tok, first="7"),
                                  agent=setup)
    finally:
        setup.close()
    st = rollout.steps
    assert st is not None and st.scores.shape[1] == 2 and not st.outcome  # no reward functions, no get_reward
    mask = rollout.completion_mask
    for i in range(len(rollout)):
        assert st.ends[i].tolist() == turn_ends([int(m) for m in mask[i].tolist()])
    assert rollout.advantages.shape == mask.shape
    odd = [i for i in range(len(rollout)) if st.scores[i, 0] == 1]
    assert odd and all(rollout.advantages[i, 0] > 0 for i in odd)


# --------------------------------------------------------------------------------------------
# A process reward model: grpo reward-model train --kind process


def test_a_process_reward_model_trains_loads_and_scores_steps(tmp_path, one_thread):
    import json

    from transformers import AutoModelForTokenClassification

    from grpo.cli import main
    from grpo.recipes.steps import build_tokenizer, prm_rows, problems
    from grpo.recipes.tasks import build_tiny_model
    from grpo.rewards import build_rewards

    tok = build_tokenizer()
    base = tmp_path / "base"
    build_tiny_model(len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "prm.jsonl"
    rows = prm_rows(problems(seed=0, heldout=0, total=600)[0], seed=0)
    assert any(not all(r["labels"]) for r in rows) and any(all(r["labels"]) for r in rows)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prm"
    assert main(["reward-model", "train", "--quiet", "--set", f"model={base}", "--set", f"dataset={data}",
                 "--set", "kind=process", "--set", f"output_dir={out}", "--set", "max_steps=150",
                 "--set", "batch_size=32", "--set", "learning_rate=3e-3", "--set", "eval_steps=0",
                 "--set", "eval_fraction=0.2", "--set", "max_length=64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["eval_step_accuracy"] <= 1 and 0 < summary["eval_good_fraction"] < 1
    # the overall accuracy is the per-class accuracies weighted by the held-out steps of each class
    g = summary["eval_good_fraction"]  # hard labels here: the share of good steps
    assert summary["eval_step_accuracy"] == pytest.approx(
        g * summary["eval_good_step_accuracy"] + (1 - g) * summary["eval_bad_step_accuracy"])
    losses = [m["loss/total"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss/total" in m]
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert AutoModelForTokenClassification.from_pretrained(out).config.num_labels == 2

    [prm] = build_rewards([{"model": str(out), "per": "step"}], torch.device("cpu"), torch.float32)
    scores = prm.fn(["(3+4)*5-6=", "(3+4)*5-6="], [None, None], [["7*5-6\n", "35-6\n", "29"], ["8*5-6\n", "40-6"]])
    assert [len(s) for s in scores] == [3, 2] and all(0 <= x <= 1 for s in scores for x in s)

    # In a run, as a step reward from YAML-style entries: {model: DIR, per: step}.
    from grpo.train.loop import train
    train(dict(model=str(base), dataset=problems(seed=1, heldout=0, total=20)[0], output_dir=str(tmp_path / "run"),
               max_steps=1, prompts_per_step=2, group_size=3, max_completion_length=12, logging_steps=1,
               samples_steps=0, advantage_estimator="process",
               rewards=["grpo.recipes.steps:final_answer", {"model": str(out), "per": "step", "name": "prm"}]),
          quiet=True)
    assert "reward/prm/mean" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_prm_step_accuracy_by_class_hand_worked():
    """A stub PRM that calls a step good when its last token id is odd: counted by hand, 3 good
    steps of which 2 are called good, 3 bad of which 1 is called bad; a soft label counts as good
    from 0.5 on."""
    from types import SimpleNamespace

    from grpo.supervised.process_reward_model import StepExample, step_accuracy

    class OddIsGood(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            odd = (input_ids % 2).float()
            return SimpleNamespace(logits=torch.stack([1 - odd, odd], -1))

    examples = [StepExample([2, 3, 5], [1, 2], [1.0, 0.0]),
                StepExample([4, 6, 7, 9], [1, 3, -1], [1.0, 0.0, 1.0]),  # the third step cut off
                StepExample([1, 8], [0, 1], [0.5, 0.2])]
    got = step_accuracy(OddIsGood(), examples, pad=0, device=torch.device("cpu"), batch_size=2)
    # good steps end on 3 (called good), 6 (bad), 1 (good); bad steps on 5 (good), 9 (good), 8 (bad)
    assert got["eval_good_step_accuracy"] == pytest.approx(2 / 3)
    assert got["eval_bad_step_accuracy"] == pytest.approx(1 / 3)
    assert got["eval_step_accuracy"] == pytest.approx(3 / 6)
    assert got["eval_good_fraction"] == pytest.approx((1 + 0 + 1 + 0 + 0.5 + 0.2) / 6)
    first = step_accuracy(OddIsGood(), examples[:1], pad=0, device=torch.device("cpu"))
    assert first["eval_good_step_accuracy"] == 1.0 and first["eval_bad_step_accuracy"] == 0.0
    no_bad = step_accuracy(OddIsGood(), [StepExample([3], [0], [1.0])], pad=0, device=torch.device("cpu"))
    assert no_bad["eval_good_step_accuracy"] == 1.0 and "eval_bad_step_accuracy" not in no_bad


def test_a_prm_file_whose_labels_do_not_match_its_steps_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    import json

    from grpo.cli import main

    data = tmp_path / "prm.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=", "completions": ["3"], "labels": [True]}) + "\n" +
                    json.dumps({"prompt": "1+2=", "completions": ["1+2", "3"], "labels": [True]}) + "\n")
    assert main(["reward-model", "train", "--set", f"model={tiny_model_dir}", "--set", f"dataset={data}",
                 "--set", "kind=process", "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}:2: 'labels' has 1 entries for 2 steps" in err[0]


def test_the_process_bench_runs_its_three_arms(tmp_path, monkeypatch, capsys, one_thread):
    """bench/process_vs_outcome.py end to end, shortened: every arm, its curves and the report."""
    import json

    from bench import process_vs_outcome as bench
    from grpo.recipes import steps

    monkeypatch.setitem(steps.SFT, "max_steps", 5)
    monkeypatch.setitem(bench.PRM, "max_steps", 3)
    monkeypatch.setitem(bench.PRM_DATA, "policy_prompts", 3)
    monkeypatch.setitem(bench.PRM_DATA, "copies", 1)
    monkeypatch.setitem(steps.GRPO, "prompts_per_step", 2)
    bench.main(["--seeds", "0", "--max-steps", "2", "--eval-every", "1", "--heldout", "30",
                "--output-dir", str(tmp_path), "--set", "learning_rate=3e-4", "--sft-steps", "4",
                "--json", str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["runs"]) == {"outcome", "process", "prm"}
    assert result["sft_steps"] == 4 and (tmp_path / "warm" / "sft").is_dir()
    # --set reaches every arm's run.
    for arm in result["runs"]:
        assert json.loads((tmp_path / f"{arm}_0" / "train_config.json").read_text())["learning_rate"] == 3e-4
    assert result["heldout"] == 30 and json.loads((tmp_path / "outcome_0" / "train_config.json").read_text())[
        "eval_max_prompts"] == 30
    assert all([p["step"] for p in result["runs"][a]["0"]] == [0, 1, 2] for a in result["runs"])
    assert "| prm | 0 |" in capsys.readouterr().out
    # The PRM's data: one corrupted copy of every training chain and the warm start's samples
    # (3 prompts x policy_samples), each step labelled.
    prm_data = [json.loads(line) for line in (tmp_path / "prm_data.jsonl").read_text().splitlines()]
    n_train = len(steps.problems(0)[0])
    assert len(prm_data) == n_train + 3 * bench.PRM_DATA["policy_samples"]
    assert all(len(r["labels"]) == len(r["completions"]) for r in prm_data)
    # A result with one arm only (--arms prm) reports against a given budget.
    only = {**result, "runs": {"prm": result["runs"]["prm"]}, "budget": 1e9}
    (tmp_path / "prm_only.json").write_text(json.dumps(only))
    bench.main(["--report", str(tmp_path / "prm_only.json")])
    assert "| prm |" in capsys.readouterr().out
    # Results merged: a later file's run of an arm and seed replaces the earlier one's, and the
    # budget is the shortest run kept.
    again = [{**p, "seconds": p["seconds"] / 2, "accuracy": 0.5} for p in result["runs"]["outcome"]["0"]]
    (tmp_path / "again.json").write_text(json.dumps({**result, "runs": {"outcome": {"0": again}}}))
    both = bench.merged([result, json.loads((tmp_path / "again.json").read_text())])
    assert both["runs"]["outcome"]["0"] == again and both["runs"]["process"] == result["runs"]["process"]
    assert both["budget"] == min(again[-1]["seconds"], *(r["0"][-1]["seconds"] for r in result["runs"].values()))
    bench.main(["--report", str(tmp_path / "result.json"), str(tmp_path / "again.json")])
    assert "| outcome | 50.0% |" in capsys.readouterr().out


def test_the_process_bench_pools_invocations_each_at_its_own_budget(capsys):
    """--pooled, hand-worked: seed 0 judged at its file's budget of 10 s, seed 1 at 20 s."""
    from bench import process_vs_outcome as bench

    def points(*rows):
        return [{"step": a, "seconds": b, "accuracy": c} for a, b, c in rows]

    first = {"budget": 10.0, "runs": {"outcome": {"0": points((0, 0, .1), (10, 5, .2), (20, 10, .3))},
                                      "process": {"0": points((0, 0, .1), (10, 6, .3), (20, 12, .4))}}}
    second = {"budget": 20.0, "runs": {"outcome": {"1": points((0, 0, .1), (10, 10, .2))},
                                       "process": {"1": points((0, 0, .1), (10, 10, .4))}}}
    third = {"budget": 5.0, "runs": {"outcome": {"2": points((0, 0, .3), (10, 5, .2))},
                                     "process": {"2": points((0, 0, .3), (10, 5, .4))}}}
    bench.pooled([first, second])
    out = capsys.readouterr().out
    # seed 0: outcome 30% at 10 s, process 30% (its step 20 is past the budget); process first
    # reaches 30% at 6 s, outcome at 10 s; at the last step +10 points
    assert "| 0 | 10.0 | 30.0% | 30.0% | +0.0 | +10.0 | 6.0 s (step 10) | 10.0 s | 60% |" in out
    assert "| 1 | 20.0 | 20.0% | 40.0% | +20.0 | +20.0 | 10.0 s (step 10) | 10.0 s | 100% |" in out
    # gaps 0 and 20: mean 10, standard error stdev / sqrt(2) = 10
    assert ("gap +10.0 points (standard error 10.0), +15.0 at the last step; "
            "half outcome's seconds or less on 0 of 2") in out
    # an outcome run that ends below its warm start has no seconds to halve: shown, not counted
    bench.pooled([third])
    out = capsys.readouterr().out
    assert "| 2 | 5.0 | 20.0% | 40.0% | +20.0 | +20.0 | 0.0 s (step 0) | 0.0 s | - (outcome at or below" in out
    assert "half outcome's seconds or less on 0 of 1" in out


def test_the_prm_data_bench_trains_and_judges_each_recipe(tmp_path, monkeypatch, capsys, one_thread):
    """bench/prm_data.py end to end, shortened: a PRM per recipe, judged on the same held-out steps."""
    import json

    from bench import prm_data
    from grpo.recipes import steps

    monkeypatch.setattr(prm_data, "RECIPES", [("corrupted", 1, 0, 2, 1e-3), ("own", 0, 3, 2, 1e-3),
                                              ("both", 1, 3, 2, 1e-3)])
    prm_data.main(["--sft-steps", "4", "--heldout", "5", "--threads", "1", "--output-dir", str(tmp_path),
                   "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    n_train = len(steps.problems(0)[0])
    assert [r["rows"] for r in results] == [n_train, 3 * prm_data.SAMPLES, n_train + 3 * prm_data.SAMPLES]
    assert len((tmp_path / "heldout_steps.jsonl").read_text().splitlines()) == 5 * prm_data.SAMPLES
    assert all(r["eval_rows"] == 5 * prm_data.SAMPLES for r in results)
    # the own samples are drawn once: the third recipe's are the second's
    own = (tmp_path / "data_1.jsonl").read_text().splitlines()
    assert (tmp_path / "data_2.jsonl").read_text().splitlines()[-len(own):] == own
    out = capsys.readouterr().out
    assert out.count("| corrupted |") == 1 and "| own |" in out and "| both |" in out


class RolloutScript:
    """A backend that answers by script: a sample with a wrong second line, then, from the end of
    each of its steps, continuations of which half reach the answer from a right first line."""

    def __init__(self, tokenizer):
        self.tokenizer, self.stop_token_ids = tokenizer, [tokenizer.eos_token_id]

    def continuation(self, context: str, g: int) -> str:
        if context.endswith("="):
            return "7*5-6\n36-6\n30"
        if context.endswith("=7*5-6\n"):
            return "35-6\n29" if g % 2 == 0 else "35-6\n28"
        return "30"

    def generate(self, prompt_ids, prompt_mask, params, generator=None):
        from grpo.engine.generation import Generation

        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            context = self.tokenizer.decode([t for t, m in zip(ids, mask) if m])
            for g in range(params.group_size):
                text = self.continuation(context, g)
                rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.stop_token_ids)
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.tokenizer.pad_token_id] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        return Generation(ids, mask, -0.1 * mask.float(), torch.zeros(len(rows), dtype=torch.bool), None)


@pytest.mark.parametrize("estimate, labels", [("hard", [True, False, False]), ("soft", [0.5, 0.0, 0.0])])
def test_math_shepherd_step_labels_by_rollouts(tmp_path, estimate, labels):
    import json

    from grpo.config import StepLabelConfig, build
    from grpo.recipes.step_labels import make_step_labels
    from grpo.recipes.steps import build_tokenizer

    from grpo.recipes.tasks import build_tiny_model

    tok = build_tokenizer()
    model = tmp_path / "model"
    build_tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32).save_pretrained(model)
    tok.save_pretrained(model)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "(3+4)*5-6=", "answer": "29"}) + "\n")
    cfg = build(StepLabelConfig, {"model": str(model), "dataset": str(data), "rollouts_per_step": 4,
                                  "estimate": estimate, "output_file": str(tmp_path / "labels.jsonl")}, "test")
    stats = make_step_labels(cfg, quiet=True, backend=RolloutScript(tok))
    [row] = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert row == {"prompt": "(3+4)*5-6=", "completions": ["7*5-6", "36-6", "30"], "labels": labels}
    assert stats["steps"] == 3
