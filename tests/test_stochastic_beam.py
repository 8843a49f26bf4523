"""Stochastic beam search (Kool et al. 2019) against brute-force enumeration of every completion
of a tiny model: the ordered groups are successive sampling without replacement (chi-square),
each completion's inclusion probability is right, and the priority weights are unbiased. Fixed
seeds: every test is deterministic."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from grpo.engine.generation import generate_groups
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.stochastic_beam import priority_weights, truncated_gumbel
import test_generation
from test_generation import EOS, PAD, check_layout, completions_by_row, recompute_logprobs, tiny_peaked_llama

# test_generation's fixtures, found here as module attributes (bound by assignment, not import, so
# that the tests' own `model` arguments and variables do not read as redefinitions of them).
model, prompts, tokenizer = test_generation.model, test_generation.prompts, test_generation.tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT, PROMPT_MASK = torch.tensor([[2, 0, 2]]), torch.ones(1, 3, dtype=torch.long)


def sbs(model, n, G, L, seed, prompt=PROMPT, prompt_mask=PROMPT_MASK, **kw):
    """n independent groups: the same prompt n times in one batch."""
    return generate_groups(model, prompt.expand(n, -1), prompt_mask.expand(n, -1), group_size=G, max_new_tokens=L,
                           eos_token_id=EOS, pad_token_id=PAD, strategy="stochastic_beam",
                           generator=torch.Generator().manual_seed(seed), **kw)


def every_completion(model, V, L):
    """All completions (EOS-terminated, or L tokens long) and their exact probabilities."""
    live = [v for v in range(V) if v != EOS]
    leaves = [s + (EOS,) for n in range(L) for s in itertools.product(live, repeat=n)]
    leaves += list(itertools.product(live, repeat=L))
    ids = torch.full((len(leaves), L), PAD)
    mask = torch.zeros(len(leaves), L, dtype=torch.long)
    for i, s in enumerate(leaves):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        lp, _ = completion_logprobs(model, PROMPT.expand(len(leaves), -1), PROMPT_MASK.expand(len(leaves), -1),
                                    ids, mask)
    p = (lp.double() * mask).sum(-1).exp()
    return leaves, (p / p.sum()).tolist()


def ordered_probs(p, k):
    """Successive sampling without replacement: P(y1..yk) = prod_j p_yj / (1 - p_y1 - ... - p_y(j-1))."""
    out = {}
    for tup in itertools.permutations(range(len(p)), k):
        prob, rest = 1.0, 1.0
        for j in tup:
            prob, rest = prob * p[j] / rest, rest - p[j]
        out[tup] = prob
    return out


def chi2_critical(df, z=3.09):
    """Wilson-Hilferty: the chi-square quantile at one-sided normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_truncated_gumbel_by_hand():
    # -log(exp(-T) - exp(-Z) + exp(-g)) directly, on values where the direct form is accurate.
    T, z = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
    g = torch.tensor([1.2, 0.5, -2.0, -40.0], dtype=torch.float64)
    direct = -torch.log(torch.exp(-T) - torch.exp(-z) + torch.exp(-g))
    out = truncated_gumbel(T, z, g)
    assert torch.allclose(out, direct, rtol=0, atol=1e-12)
    assert out[0] == T and (out[1:] < T).all() and (out[:-1] > out[1:]).all()  # max -> T, order kept


def test_groups_are_successive_sampling_without_replacement():
    """V = 3, at most 2 tokens: 7 completions, 210 ordered groups of 3; 4000 groups drawn."""
    V, L, G, n = 3, 2, 3, 4000
    model = tiny_peaked_llama(V, seed=2, init=0.15)
    leaves, p = every_completion(model, V, L)
    gen = sbs(model, n, G, L, seed=0)
    check_layout(gen, [EOS], L)
    index = {s: i for i, s in enumerate(leaves)}
    rows = [index[r] for r in completions_by_row(gen)]
    counts = Counter(tuple(rows[k * G:(k + 1) * G]) for k in range(n))
    chi2, bins, rare_obs, rare_exp = 0.0, 0, 0, 0.0
    for tup, prob in ordered_probs(p, G).items():
        if n * prob < 5:  # pooled, so that every bin expects at least 5
            rare_obs, rare_exp = rare_obs + counts.get(tup, 0), rare_exp + n * prob
            continue
        chi2, bins = chi2 + (counts.get(tup, 0) - n * prob) ** 2 / (n * prob), bins + 1
    chi2 += (rare_obs - rare_exp) ** 2 / rare_exp
    assert sum(counts.values()) == n and all(len(set(tup)) == G for tup in counts)  # distinct
    assert bins > 100 and chi2 < chi2_critical(bins)


def test_inclusion_probabilities_and_unbiased_priority_weights():
    """V = 4, at most 3 tokens: 40 completions, groups of 3, 20000 groups. Each completion is in
    a group as often as enumeration says, and sum_i w_i f(o_i) is unbiased for E_p[f]: per
    completion (f = its indicator), for f = 1 and for f = length. (With the root's Gumbel fixed at
    0 instead of drawn, the weights come out ~8% low: z ~ -29 on sum_i w_i here.)"""
    V, L, G, n = 4, 3, 3, 20000
    model = tiny_peaked_llama(V, seed=2, init=0.15)
    leaves, p = every_completion(model, V, L)
    inclusion = [0.0] * len(leaves)
    for tup, prob in ordered_probs(p, G).items():
        for j in tup:
            inclusion[j] += prob
    gen = sbs(model, n, G, L, seed=1)
    index = {s: i for i, s in enumerate(leaves)}
    idx = torch.tensor([index[r] for r in completions_by_row(gen)]).view(n, G)
    w = priority_weights(gen).view(n, G)
    assert ((gen.inclusion_probs > 0) & (gen.inclusion_probs <= 1)).all()

    def z(samples, expected):  # z-score of a sample mean
        return float((samples.mean() - expected) / (samples.std() / math.sqrt(n) + 1e-300))

    for y in range(len(leaves)):
        hit = idx == y
        assert abs(z(hit.any(1).double(), inclusion[y])) < 4.5, leaves[y]
        assert abs(z((w * hit).sum(1), p[y])) < 4.5, leaves[y]
    assert abs(z(w.sum(1), 1.0)) < 4.5
    length = torch.tensor([len(s) for s in leaves], dtype=torch.float64)
    assert abs(z((w * length[idx]).sum(1), float((torch.tensor(p) * length).sum()))) < 4.5


def test_whole_space_drawn_gives_the_exact_expectation_and_too_many_is_an_error():
    """G = the number of completions: nothing is left out, kappa = -inf, q = 1, and the weights
    are the probabilities themselves; one more than exists is an error (as for beam search)."""
    V, L = 3, 1
    model = tiny_peaked_llama(V, seed=0)
    leaves, p = every_completion(model, V, L)
    gen = sbs(model, 2, len(leaves), L, seed=0)
    assert (gen.inclusion_probs == 1).all()
    got = dict(zip(completions_by_row(gen)[:len(leaves)], priority_weights(gen)[:len(leaves)].tolist()))
    assert sorted(got) == sorted(leaves)
    assert all(abs(got[s] - q) < 1e-6 for s, q in zip(leaves, p))
    with pytest.raises(ValueError, match="group_size"):
        sbs(model, 1, len(leaves) + 1, L, seed=0)


def test_distinct_reproducible_and_its_logprobs(model, prompts):
    ids, mask = prompts
    G, L = 8, 6
    kw = dict(group_size=G, max_new_tokens=L, eos_token_id=EOS, pad_token_id=PAD, strategy="stochastic_beam")
    gen = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(3), temperature=1.3, **kw)
    check_layout(gen, [EOS], L)
    rows = completions_by_row(gen)
    assert all(len(set(rows[p * G:(p + 1) * G])) == G for p in range(ids.shape[0]))
    again = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(3), temperature=1.3, **kw)
    other = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(4), temperature=1.3, **kw)
    assert torch.equal(gen.completion_ids, again.completion_ids) and torch.equal(gen.logprobs, again.logprobs)
    assert not torch.equal(gen.completion_ids, other.completion_ids)
    # Recorded log-probs are the trainer's (tempered), and without filters the sampled ones too.
    torch.testing.assert_close(gen.logprobs, recompute_logprobs(model, ids, mask, gen, G, 1.3), atol=1e-5, rtol=0)
    assert torch.equal(gen.sampling_logprobs, gen.logprobs)
    # The plain decode loop (the model's own cache) draws the same groups.
    plain = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(3), temperature=1.3,
                            engine="plain", **kw)
    assert torch.equal(plain.completion_ids, gen.completion_ids)
    # With top-k every token is among the k most likely, and its sampled log-prob is renormalised.
    top = generate_groups(model, ids, mask, generator=torch.Generator().manual_seed(3), top_k=3, **kw)
    assert (top.sampling_logprobs >= top.logprobs).all() and (top.sampling_logprobs > top.logprobs).any()
