"""generate_groups: sampling and beam search against plain references, HF generate and brute force."""

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.engine.generation import Generation, filter_logits, generate_groups
from grpo.engine.logprobs import completion_logprobs
from grpo.recipes.tasks import build_char_tokenizer, build_tiny_model

PAD, EOS = 0, 1


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    enc = tokenizer(["1+2=", "12+34=", "7*8=", "5-3="], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def tiny_peaked_llama(vocab_size, seed=0, init=0.5):
    """A very small random Llama with large weights, so next-token distributions are far from
    uniform (beam search and greedy then have clear winners, not near-ties)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, initializer_range=init)
    return LlamaForCausalLM(config).eval()


def tiny_other_arch(arch, vocab_size):
    """Small random models of other families: GPT-2 (learned absolute positions, its own cache
    layout) and Qwen2 (grouped-query attention, qkv biases)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
        return GPT2LMHeadModel(config).eval()
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                                        bos_token_id=None)).eval()


def rows_of(ids, mask, i):
    """Prompt i without its padding, as a [1, L] batch."""
    return ids[i:i + 1, mask[i].bool()], torch.ones(1, int(mask[i].sum()), dtype=torch.long)


def greedy_reference(model, prompt, max_new_tokens, eos):
    """Argmax decoding with a full forward over the whole sequence each step: no cache, no padding."""
    ids, out = prompt, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def recompute_logprobs(model, prompt_ids, prompt_mask, gen: Generation, group_size, temperature=1.0):
    with torch.no_grad():
        lp, _ = completion_logprobs(model, prompt_ids.repeat_interleave(group_size, 0),
                                    prompt_mask.repeat_interleave(group_size, 0), gen.completion_ids,
                                    gen.completion_mask, temperature=temperature)
    return lp * gen.completion_mask


def check_layout(gen: Generation, eos_ids, max_new_tokens):
    """Masks are 1 up to and including the first EOS and 0 after, pad ids after, flags agree."""
    N, T = gen.completion_ids.shape
    assert T <= max_new_tokens
    assert gen.completion_mask.shape == gen.logprobs.shape == (N, T) and gen.truncated.shape == (N,)
    assert gen.logprobs.dtype == torch.float32 and gen.truncated.dtype == torch.bool
    assert int(gen.completion_mask.sum(-1).max()) == T  # trimmed to the longest completion
    rows = zip(gen.completion_ids.tolist(), gen.completion_mask.tolist(), gen.truncated.tolist())
    for ids, mask, truncated in rows:
        n = sum(mask)
        assert mask == [1] * n + [0] * (T - n)
        assert ids[n:] == [PAD] * (T - n)
        eos_at = [t for t in range(n) if ids[t] in eos_ids]
        if truncated:
            assert eos_at == [] and n == max_new_tokens
        else:
            assert eos_at == [n - 1]


# ----------------------------------------------------------------------------------------------
# Sampling

def test_top_k_1_is_greedy_and_matches_hf_and_uncached_reference(model, prompts):
    ids, mask = prompts
    # Pick as EOS a token that greedy decoding of prompt 0 emits at step 3, so that rows end early
    # (a random model almost never picks the real EOS as its argmax).
    eos = greedy_reference(model, rows_of(ids, mask, 0)[0], 6, eos=-1)[3]
    G, max_new = 3, 10
    gen = generate_groups(model, ids, mask, group_size=G, max_new_tokens=max_new, eos_token_id=eos,
                          pad_token_id=PAD, top_k=1, generator=torch.Generator().manual_seed(0))
    check_layout(gen, [eos], max_new)
    assert not gen.truncated[0]
    for p in range(ids.shape[0]):
        prompt, prompt_mask = rows_of(ids, mask, p)
        expected = greedy_reference(model, prompt, max_new, eos)
        hf = model.generate(prompt, attention_mask=prompt_mask, do_sample=False, max_new_tokens=max_new,
                            eos_token_id=eos, pad_token_id=PAD)[0, prompt.shape[1]:].tolist()
        assert hf[:len(expected)] == expected
        for g in range(G):  # rows p*G .. p*G+G-1 are prompt p's
            row = gen.completion_ids[p * G + g]
            assert row[:len(expected)].tolist() == expected
            assert int(gen.completion_mask[p * G + g].sum()) == len(expected)


def test_left_padded_batch_equals_each_prompt_alone(model, prompts):
    ids, mask = prompts
    kwargs = dict(group_size=2, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, top_k=1)
    batch = generate_groups(model, ids, mask, **kwargs)
    for p in range(ids.shape[0]):
        alone = generate_groups(model, *rows_of(ids, mask, p), **kwargs)
        rows = slice(2 * p, 2 * p + 2)
        T = alone.completion_ids.shape[1]
        assert torch.equal(batch.completion_ids[rows, :T], alone.completion_ids)
        torch.testing.assert_close(batch.logprobs[rows, :T], alone.logprobs, atol=1e-5, rtol=0)


def test_seed_reproducibility(model, prompts):
    ids, mask = prompts
    kwargs = dict(group_size=4, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=1.3)
    a = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    b = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    c = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.completion_ids.shape != c.completion_ids.shape or \
        not torch.equal(a.completion_ids, c.completion_ids)
    # Samples of one group differ from each other (i.i.d., not G copies of one sample).
    assert len({tuple(r) for r in a.completion_ids[:4].tolist()}) > 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 5, 0.9)])
def test_logprobs_equal_full_forward_and_layout(model, prompts, temperature, top_k, top_p):
    ids, mask = prompts
    G, max_new = 8, 16
    gen = generate_groups(model, ids, mask, group_size=G, max_new_tokens=max_new, eos_token_id=EOS,
                          pad_token_id=PAD, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=torch.Generator().manual_seed(0))
    check_layout(gen, [EOS], max_new)
    # Both kinds of row occur, so the checks above test something (EOS is ~1/19 per step here).
    assert gen.truncated.any() and (~gen.truncated).any()
    torch.testing.assert_close(gen.logprobs, recompute_logprobs(model, ids, mask, gen, G, temperature),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures(arch, tokenizer, prompts):
    model = tiny_other_arch(arch, len(tokenizer))
    ids, mask = prompts
    kwargs = dict(group_size=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    greedy = generate_groups(model, ids, mask, top_k=1, **kwargs)
    for p in range(ids.shape[0]):
        expected = greedy_reference(model, rows_of(ids, mask, p)[0], 6, EOS)
        assert greedy.completion_ids[2 * p, :len(expected)].tolist() == expected
    sampled = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(sampled.logprobs, recompute_logprobs(model, ids, mask, sampled, 2),
                               atol=1e-4, rtol=0)
    beams = generate_groups(model, ids, mask, strategy="beam", **kwargs)
    torch.testing.assert_close(beams.logprobs, recompute_logprobs(model, ids, mask, beams, 2),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ["plain", "auto"])
def test_multiple_eos_ids_and_early_stop(model, prompts, engine):
    ids, mask = prompts
    eos_ids = list(range(1, 17))  # 16 of 19 tokens end a completion: every row ends within a few steps
    calls = []
    # The LM head runs once per forward pass in both engines (the group engine does not call
    # model.forward for its decode steps).
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        gen = generate_groups(model, ids, mask, group_size=4, max_new_tokens=50, eos_token_id=eos_ids,
                              pad_token_id=PAD, generator=torch.Generator().manual_seed(0), engine=engine)
    finally:
        handle.remove()
    check_layout(gen, eos_ids, 50)
    T = gen.completion_ids.shape[1]
    assert T < 10 and not gen.truncated.any()
    assert len(calls) == T  # one prefill + one step per new token but the last
    torch.testing.assert_close(gen.logprobs, recompute_logprobs(model, ids, mask, gen, 4), atol=1e-4, rtol=0)


def test_top_p_tiny_is_greedy(model, prompts):
    ids, mask = prompts
    kwargs = dict(group_size=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    nucleus = generate_groups(model, ids, mask, top_p=1e-6, generator=torch.Generator().manual_seed(3),
                              **kwargs)
    greedy = generate_groups(model, ids, mask, top_k=1, **kwargs)
    assert torch.equal(nucleus.completion_ids, greedy.completion_ids)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()
    assert keep(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert keep(filter_logits(logits, top_p=0.5)) == [False, True, False, True]   # 0.4 < 0.5 <= 0.7
    assert keep(filter_logits(logits, top_p=0.4)) == [False, True, False, False]  # 0.4 reaches it
    assert keep(filter_logits(logits, top_p=0.75)) == [False, True, True, True]
    assert keep(filter_logits(logits, top_k=3, top_p=0.95)) == [False, True, True, True]
    assert torch.equal(filter_logits(logits), logits)


def test_restores_training_mode(model, prompts):
    model.train()
    try:
        for strategy in ("sample", "beam"):
            generate_groups(model, *prompts, group_size=2, max_new_tokens=2, eos_token_id=EOS,
                            pad_token_id=PAD, strategy=strategy)
            assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs,name", [
    (dict(strategy="greedy"), "strategy"), (dict(group_size=0), "group_size"),
    (dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_token_id=[]), "eos_token_id"),
])
def test_validation(model, prompts, kwargs, name):
    args = dict(group_size=2, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD) | kwargs
    with pytest.raises(ValueError, match=name):
        generate_groups(model, *prompts, **args)


def test_rejects_right_padding(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        generate_groups(model, ids.flip(1), mask.flip(1), group_size=2, max_new_tokens=4,
                        eos_token_id=EOS, pad_token_id=PAD)


# ----------------------------------------------------------------------------------------------
# Beam search

def beam(model, ids, mask, G, max_new, eos=EOS):
    return generate_groups(model, ids, mask, group_size=G, max_new_tokens=max_new, eos_token_id=eos,
                           pad_token_id=PAD, strategy="beam")


def completions_by_row(gen):
    return [tuple(r[:int(m.sum())]) for r, m in zip(gen.completion_ids.tolist(), gen.completion_mask)]


@pytest.mark.parametrize("eos_ids", [[EOS], [EOS, 3]])
def test_beam_is_exact_on_tiny_vocab(eos_ids):
    """With G >= V^(L-1) no prefix is ever pruned, so beam search must return exactly the G most
    likely of all possible completions (EOS-terminated, or max_new_tokens long)."""
    V, L = 4, 3
    G = V ** (L - 1)
    model = tiny_peaked_llama(V, seed=1)
    ids = torch.tensor([[PAD, 2, 3], [3, 2, 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    gen = beam(model, ids, mask, G, L, eos=eos_ids)
    check_layout(gen, eos_ids, L)

    live = [v for v in range(V) if v not in eos_ids]
    everything = [seq + (e,) for n in range(L) for seq in itertools.product(live, repeat=n) for e in eos_ids]
    everything += list(itertools.product(live, repeat=L))
    for p in range(2):
        prompt, prompt_mask = rows_of(ids, mask, p)
        comp = torch.full((len(everything), L), PAD)
        comp_mask = torch.zeros(len(everything), L, dtype=torch.long)
        for i, seq in enumerate(everything):
            comp[i, :len(seq)], comp_mask[i, :len(seq)] = torch.tensor(seq), 1
        with torch.no_grad():
            lp, _ = completion_logprobs(model, prompt.expand(len(everything), -1),
                                        prompt_mask.expand(len(everything), -1), comp, comp_mask)
        scores = (lp * comp_mask).sum(-1)
        top = scores.argsort(descending=True)[:G].tolist()
        rows = slice(p * G, (p + 1) * G)
        assert completions_by_row(gen)[rows] == [everything[i] for i in top]
        torch.testing.assert_close(gen.logprobs[rows].sum(-1), scores[top], atol=1e-5, rtol=0)
        assert gen.truncated[rows].tolist() == [everything[i][-1] not in eos_ids for i in top]


def test_beam_ordered_distinct_deterministic(model, prompts):
    ids, mask = prompts
    G, max_new = 4, 8
    gen = beam(model, ids, mask, G, max_new)
    check_layout(gen, [EOS], max_new)
    scores = recompute_logprobs(model, ids, mask, gen, G).sum(-1)
    torch.testing.assert_close(gen.logprobs.sum(-1), scores, atol=1e-4, rtol=0)
    by_row = completions_by_row(gen)
    for p in range(ids.shape[0]):
        group = scores[p * G:(p + 1) * G]
        assert (group[:-1] >= group[1:] - 1e-6).all()
        assert len(set(by_row[p * G:(p + 1) * G])) == G
    again = beam(model, ids, mask, G, max_new)
    assert torch.equal(gen.completion_ids, again.completion_ids) and torch.equal(gen.logprobs, again.logprobs)


@pytest.mark.parametrize("seed", range(6))
def test_beam_matches_hf_canonical_beam_search(seed):
    """HF's `early_stopping="never"` with `length_penalty=0` is textbook beam search (its docs say
    so), the algorithm implemented here. HF's `early_stopping=True` instead stops as soon as G
    hypotheses have finished, even when an alive beam could still beat them, so it can return
    lower-scoring groups; it is not compared."""
    V, G, L = 8, 3, 8
    model = tiny_peaked_llama(V, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (2, 4), generator=g)
    ids[0, :2], mask = PAD, torch.ones(2, 4, dtype=torch.long)
    mask[0, :2] = 0
    gen = beam(model, ids, mask, G, L)
    for p in range(2):
        prompt, prompt_mask = rows_of(ids, mask, p)
        hf = model.generate(prompt, attention_mask=prompt_mask, num_beams=G, num_return_sequences=G,
                            length_penalty=0.0, early_stopping="never", do_sample=False, max_new_tokens=L,
                            eos_token_id=EOS, pad_token_id=PAD, output_scores=True,
                            return_dict_in_generate=True)
        hf_rows = [tuple(r) for r in hf.sequences[:, prompt.shape[1]:].tolist()]
        hf_rows = [r[:r.index(EOS) + 1] if EOS in r else r for r in hf_rows]
        assert completions_by_row(gen)[p * G:(p + 1) * G] == hf_rows
        torch.testing.assert_close(gen.logprobs[p * G:(p + 1) * G].sum(-1), hf.sequences_scores,
                                   atol=1e-4, rtol=0)


def test_beam_rejects_more_beams_than_completions():
    model = tiny_peaked_llama(3)
    with pytest.raises(ValueError, match="group_size"):  # V=3, one token long: only 3 completions
        beam(model, torch.tensor([[2, 2]]), torch.ones(1, 2, dtype=torch.long), 4, 1)


def test_top_k_1_is_greedy_even_with_tied_maxima():
    # bf16 logits tie often; greedy (evaluation's top_k=1) takes the first maximum, without a draw.
    from grpo.engine.generation import _draw
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]]).repeat(64, 1)
    token, logp = _draw(logits, 1.0, 1, 1.0, torch.Generator().manual_seed(0))
    assert (token == 1).all()
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[:, 1])


# ----------------------------------------------------------------------------------------------
# Every EOS of the model's generation config stops a completion (a chat model's end of turn)

def test_stop_token_ids_are_the_tokenizers_eos_and_the_generation_configs(tokenizer):
    from grpo.engine.models import stop_token_ids

    model = build_tiny_model(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    for declared, expected in ((EOS, [EOS]), (5, [EOS, 5]), ([5, EOS, 7], [EOS, 5, 7]), (None, [EOS])):
        model.generation_config.eos_token_id = declared
        assert stop_token_ids(tokenizer, model) == expected  # the tokenizer's first, no repeats
    assert stop_token_ids(tokenizer) == [EOS]


@pytest.mark.parametrize("strategy", ["sample", "beam", "stochastic_beam"])
def test_a_completion_ends_at_any_eos_of_the_generation_config(tokenizer, prompts, strategy):
    """A model whose generation_config lists a second EOS id X (as Qwen's <|im_end|>): the backend
    stops there, the mask covers through X, the row is not truncated, and the text a reward reads
    ends before it."""
    from grpo.data import decode_completions
    from grpo.engine.backend import LocalBackend, SamplingParams

    ids, mask = prompts
    model = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             seed=2).eval()  # a seed whose greedy completion of prompt 0 does not end at once
    greedy = SamplingParams.greedy(8)
    before = LocalBackend(model, tokenizer).generate(ids, mask, greedy)
    x = int(before.completion_ids[0, 0])  # what the model writes first for prompt 0
    assert x not in (EOS, PAD) and int(before.completion_mask[0].sum()) > 1

    model.generation_config.eos_token_id = [EOS, x]
    backend = LocalBackend(model, tokenizer)
    assert backend.stop_token_ids == [EOS, x]
    first = backend.generate(ids, mask, greedy)
    assert first.completion_ids[0, :1].tolist() == [x] and first.completion_mask[0].sum() == 1
    assert not first.truncated[0]

    G, L = 6, 10
    params = SamplingParams(group_size=G, max_new_tokens=L, strategy=strategy, temperature=1.0, top_p=1.0, top_k=0)
    gen = backend.generate(ids, mask, params, torch.Generator().manual_seed(0))
    check_layout(gen, [EOS, x], L)  # every stop id ends a row; its mask covers through it
    ends = [row[int(m.sum()) - 1] for row, m in zip(gen.completion_ids.tolist(), gen.completion_mask)]
    assert x in [e for e, t in zip(ends, gen.truncated.tolist()) if not t]
    if strategy == "beam":  # the best hypothesis of prompt 0 is X alone: the greedy first token, then stop
        assert completions_by_row(gen)[0] == (x,)
    # The text a reward reads ends before X; without the stop ids only the tokenizer's EOS is cut.
    texts = decode_completions(tokenizer, gen.completion_ids, gen.completion_mask, stop_ids=backend.stop_token_ids)
    kept = decode_completions(tokenizer, gen.completion_ids, gen.completion_mask)
    char = tokenizer.convert_ids_to_tokens(x)
    for row, (end, truncated) in enumerate(zip(ends, gen.truncated.tolist())):
        n = int(gen.completion_mask[row].sum())
        if not truncated and end == x:
            assert texts[row] == tokenizer.decode(gen.completion_ids[row, :n - 1]) and kept[row] == texts[row] + char
        else:
            assert texts[row] == kept[row]
