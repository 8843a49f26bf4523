"""completion_logprobs against the plainest possible reference: one unpadded row at a time."""

import pytest
import torch

from grpo.engine.logprobs import completion_logprobs
from grpo.recipes.tasks import build_tiny_model

V, PAD, EOS = 19, 0, 1


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_llama():
    return build_tiny_model(V, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).eval()


def tiny_gpt2():
    # Learned absolute position embeddings: wrong position ids under left padding would show.
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_batch(seed=0):
    """Prompts of 2..5 tokens, left-padded to 7 (so two columns are padding on every row), and
    completions of 1..6 tokens, right-padded to 8 (two all-padding columns), some ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, completion_lens = [2, 5, 3, 4], [6, 1, 4, 3]
    ends_in_eos = [True, True, False, False]
    N, Lp, T = len(prompt_lens), 7, 8
    prompt_ids = torch.full((N, Lp), PAD)
    prompt_mask = torch.zeros(N, Lp, dtype=torch.long)
    completion_ids = torch.full((N, T), PAD)
    completion_mask = torch.zeros(N, T, dtype=torch.long)
    for i, (lp, lc) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, Lp - lp:] = torch.randint(3, V, (lp,), generator=g)
        prompt_mask[i, Lp - lp:] = 1
        completion_ids[i, :lc] = torch.randint(2, V, (lc,), generator=g)
        if ends_in_eos[i]:
            completion_ids[i, lc - 1] = EOS
        completion_mask[i, :lc] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def reference(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """Per row: drop the padding, full forward, full log_softmax, pick the completion tokens."""
    logprobs, entropies = [], []
    for i in range(prompt_ids.shape[0]):
        prompt = prompt_ids[i][prompt_mask[i].bool()]
        completion = completion_ids[i][completion_mask[i].bool()]
        ids = torch.cat([prompt, completion]).unsqueeze(0)
        logits = model(input_ids=ids).logits[0].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]  # rows predicting completion
        logprobs.append(logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return logprobs, entropies


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_unpadded_reference(arch, temperature):
    model = MODELS[arch]()
    batch = make_batch()
    mask = batch[3]
    with torch.no_grad():
        logprobs, entropy = completion_logprobs(model, *batch, temperature=temperature, compute_entropy=True)
        ref_lp, ref_ent = reference(model, *batch, temperature=temperature)
    assert logprobs.shape == entropy.shape == mask.shape
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        torch.testing.assert_close(logprobs[i, :n], ref_lp[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :n], ref_ent[i], atol=1e-5, rtol=0)
    # The trimmed completion columns come back as zeros.
    assert (logprobs[:, 6:] == 0).all()


def test_entropy_is_optional():
    model = tiny_llama()
    with torch.no_grad():
        logprobs, entropy = completion_logprobs(model, *make_batch())
    assert entropy is None and logprobs.shape == (4, 8)


def test_gradients_match_reference():
    model = tiny_llama()
    batch = make_batch(seed=1)
    mask = batch[3]

    logprobs, entropy = completion_logprobs(model, *batch, temperature=0.8, compute_entropy=True)
    assert logprobs.requires_grad
    ((logprobs + 0.1 * entropy) * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ref_lp, ref_ent = reference(model, *batch, temperature=0.8)
    sum(lp.sum() + 0.1 * h.sum() for lp, h in zip(ref_lp, ref_ent)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_all_completions_empty():
    model = tiny_llama()
    prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch()
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids,
                                          torch.zeros_like(completion_mask))
    assert logprobs.shape == (4, 8) and (logprobs == 0).all()


def test_rejects_bad_temperature():
    model = tiny_llama()
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, *make_batch(), temperature=0.0)


def test_mask_is_only_a_loss_mask():
    """A float mask with one row zeroed (a truncated completion kept out of the loss) changes
    nothing for the other rows; the zeroed row is not scored at all (zeros, no NaN)."""
    model = tiny_llama()
    prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch()
    zeroed = completion_mask.float()
    zeroed[2] = 0
    with torch.no_grad():
        full, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        part, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, zeroed)
    m = zeroed.bool()
    torch.testing.assert_close(part[m], full[m], atol=1e-5, rtol=0)
    assert torch.isfinite(part).all() and not part[2].any() and full[2].any()
