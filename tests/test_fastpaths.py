"""The fast paths give the same results as the plain ones (speed itself is measured by bench/).

- The group decoder (`engine.decoders.GroupDecoder`: shared prompt KV, preallocated completion
  KV, finished groups dropped) against the model's own KV cache (`CacheDecoder`): the same tokens
  under the same seed, the same masks, log-probs equal within fp32 tolerance, also with left
  padding, grouped-query attention, qkv biases (Qwen2), top-k/top-p, temperature and early EOS.
  Beam search on the group decoder returns the same beams as on the model's own cache.
- Greedy decoding through the group engine equals a plain uncached argmax loop.
- The log-prob forward used by the update (`grpo.engine.packed`'s packed forward for Llama-style
  models, the KV-cache hand-over for others) against a plain untrimmed full forward with a full
  log-softmax: the same log-probs, entropy, GRPO loss and gradients, also when a micro-batch cuts
  groups, rows are not scored at all, or the mask has holes.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo import algorithm
from grpo.engine.generation import generate_groups
from grpo.engine.llama import supported as fast_engine_supported
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import position_ids_from_mask

PAD, EOS, V = 0, 1, 19


pytestmark = pytest.mark.usefixtures("one_thread_module")


def llama(kv_heads=4, init=0.02, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def qwen2():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).eval()


def prompts(P=4, seed=0, max_len=7):
    """Left-padded random prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (P,), generator=g)
    lengths[0] = max_len
    ids = torch.full((P, max_len), PAD, dtype=torch.long)
    mask = torch.zeros(P, max_len, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, max_len - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, max_len - n:] = 1
    return ids, mask


def both(model, ids, mask, **kw):
    out = {}
    for engine in ("plain", "auto"):
        out[engine] = generate_groups(model, ids, mask, pad_token_id=PAD,
                                      generator=torch.Generator().manual_seed(123), engine=engine, **kw)
    return out["plain"], out["auto"]


def assert_same(plain, fast):
    assert torch.equal(plain.completion_ids, fast.completion_ids)
    assert torch.equal(plain.completion_mask, fast.completion_mask)
    assert torch.equal(plain.truncated, fast.truncated)
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,model", [("llama", llama()), ("llama_gqa", llama(kv_heads=2)),
                                        ("qwen2_bias_gqa", qwen2())])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.3, top_p=0.8)])
def test_group_engine_samples_like_plain_loop(name, model, sampling):
    assert fast_engine_supported(model)
    ids, mask = prompts()
    plain, fast = both(model, ids, mask, group_size=4, max_new_tokens=12, eos_token_id=EOS, **sampling)
    assert_same(plain, fast)


def test_group_engine_with_early_eos_drops_groups_exactly():
    # Many EOS ids: rows end at different steps, whole groups finish while others run on.
    model = llama(init=0.5, seed=3)
    ids, mask = prompts(P=6, seed=1)
    plain, fast = both(model, ids, mask, group_size=3, max_new_tokens=20, eos_token_id=list(range(1, 8)))
    assert plain.completion_mask.sum(1).unique().numel() > 2  # lengths really differ
    assert_same(plain, fast)


def test_group_engine_greedy_equals_uncached_argmax():
    model = llama(init=0.5, seed=1)
    ids, mask = prompts(P=3, seed=2)
    gen = generate_groups(model, ids, mask, group_size=2, max_new_tokens=10, eos_token_id=EOS,
                          pad_token_id=PAD, top_k=1, generator=torch.Generator().manual_seed(0))
    for p in range(3):
        seq = ids[p][mask[p] == 1].tolist()
        expected = []
        for _ in range(10):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            nxt = int(logits.argmax())
            expected.append(nxt)
            seq.append(nxt)
            if nxt == EOS:
                break
        for g in range(2):
            row = gen.completion_ids[p * 2 + g][gen.completion_mask[p * 2 + g] == 1].tolist()
            assert row == expected


def test_plain_engine_for_other_models_is_unchanged():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)).eval()
    assert not fast_engine_supported(gpt2)
    ids, mask = prompts()
    plain, auto = both(gpt2, ids, mask, group_size=2, max_new_tokens=6, eos_token_id=EOS)
    assert_same(plain, auto)


# ----------------------------------------------------------------------------------------------
# The update's log-prob forward (prompt padding trimmed, completion trimmed to the longest row,
# LM head on T columns only, gather minus logsumexp) against the plainest possible computation.

def plain_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Untrimmed: the full padded sequence, full logits, full log-softmax, then gather."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    Lp = prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, Lp - 1:-1].float(), -1)
    return logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask


@pytest.mark.parametrize("recompute_mlp", [False, True])
def test_update_loss_and_gradients_equal_plain_full_forward(recompute_mlp):
    model = llama(init=0.1).train()
    ids, mask = prompts(P=4)
    # Extra all-padding prompt columns and completion columns beyond every row: trimmed away.
    ids = torch.cat([torch.full((4, 3), PAD), ids], 1)
    mask = torch.cat([torch.zeros(4, 3, dtype=torch.long), mask], 1)
    G = 2
    gen = generate_groups(model, ids, mask, group_size=G, max_new_tokens=8, eos_token_id=[1, 5, 7],
                          pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    comp = torch.cat([gen.completion_ids, torch.full((8, 4), PAD)], 1)
    cmask = torch.cat([gen.completion_mask, torch.zeros(8, 4, dtype=torch.long)], 1).float()
    pids, pmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    ref = torch.randn(8, comp.shape[1]) * 0.1 - 3
    adv = torch.randn(8)

    def loss_and_grads(fn):
        model.zero_grad()
        lp = fn()
        loss, _ = algorithm.policy_loss(lp, None, ref, adv, cmask, beta=0.04, num_sequences=8,
                                        num_tokens=float(cmask.sum()), group_size=G, max_completion_length=12)
        loss.backward()
        return lp.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]

    lp_fast, loss_fast, g_fast = loss_and_grads(
        lambda: completion_logprobs(model, pids, pmask, comp, cmask, recompute_mlp=recompute_mlp)[0])
    lp_plain, loss_plain, g_plain = loss_and_grads(lambda: plain_logprobs(model, pids, pmask, comp, cmask))
    torch.testing.assert_close(lp_fast * cmask, lp_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_fast, loss_plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # Generation's own log-probs are the same quantity (fp32 tolerance).
    torch.testing.assert_close(gen.logprobs, lp_plain[:, :gen.logprobs.shape[1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2+recompute_mlp", "gpt2"])
def test_shared_prompt_forward_equals_one_forward_per_row(arch):
    """Groups' prompts run once vs every row's full forward: the packed group forward (Llama,
    Qwen2 with qkv biases and grouped-query attention) and the KV-cache hand-over (GPT-2)."""
    if arch == "llama":
        model = llama(init=0.1, kv_heads=2).train()
    elif arch.startswith("qwen2"):
        model = qwen2().train()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                           pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
                                           resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).train()
    ids, mask = prompts(P=3, seed=4)
    G = 3
    pids, pmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    g = torch.Generator().manual_seed(1)
    comp = torch.randint(2, V, (9, 6), generator=g)
    lengths = torch.tensor([6, 1, 3, 5, 6, 2, 4, 6, 1])
    cmask = (torch.arange(6) < lengths[:, None]).long()
    weights = torch.randn(9, 6, generator=g)

    def run(share):
        model.zero_grad()
        lp, ent = completion_logprobs(model, pids, pmask, comp, cmask, temperature=0.8,
                                      compute_entropy=True, engine="auto" if share else "plain",
                                      recompute_mlp=arch.endswith("recompute_mlp"))
        (lp * cmask * weights).sum().backward()
        return lp.detach() * cmask, ent * cmask, [p.grad.clone() for p in model.parameters()]

    lp_s, ent_s, g_s = run(True)
    lp_p, ent_p, g_p = run(False)
    torch.testing.assert_close(lp_s, lp_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_s, ent_p, atol=1e-5, rtol=0)
    for a, b in zip(g_s, g_p):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_forward_with_uneven_groups_and_unscored_rows():
    """A micro-batch that cuts groups (3, 2 and 1 rows of three prompts), rows whose mask is all
    zero, rows of one token, and a mask with holes: every scored token equals the plain forward,
    gradients included; nothing is NaN."""
    model = llama(init=0.1, kv_heads=2).train()
    assert fast_engine_supported(model)
    ids, mask = prompts(P=3, seed=7)
    pids, pmask = ids[[0, 0, 0, 1, 1, 2]], mask[[0, 0, 0, 1, 1, 2]]
    g = torch.Generator().manual_seed(3)
    comp = torch.randint(2, V, (6, 7), generator=g)
    lengths = torch.tensor([7, 0, 1, 4, 0, 5])
    cmask = (torch.arange(7) < lengths[:, None]).float()
    cmask[3, 1] = 0  # a hole: column 1 of row 3 is not counted, column 3 still is
    weights = torch.randn(6, 7, generator=g)

    def run(engine):
        model.zero_grad()
        lp, ent = completion_logprobs(model, pids, pmask, comp, cmask, temperature=1.3,
                                      compute_entropy=True, engine=engine)
        (lp * cmask * weights).sum().backward()
        return lp.detach(), ent, [p.grad.clone() for p in model.parameters()]

    lp_a, ent_a, g_a = run("auto")
    lp_p, ent_p, g_p = run("plain")
    m = cmask.bool()
    assert torch.isfinite(lp_a).all() and torch.isfinite(ent_a).all()
    torch.testing.assert_close(lp_a[m], lp_p[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_a[m], ent_p[m], atol=1e-5, rtol=0)
    for a, b in zip(g_a, g_p):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,model", [("llama_gqa", llama(kv_heads=2, init=0.5, seed=2)),
                                        ("qwen2_bias_gqa", qwen2())])
def test_beam_on_group_engine_equals_plain_beam(name, model):
    """Beam search on the group decoder (prompt KV once per prompt, beams reordered in the
    completion cache only) returns the same beams, in the same order, as on HF's cache."""
    ids, mask = prompts(P=3, seed=5)
    kw = dict(group_size=4, max_new_tokens=9, eos_token_id=[1, 4], pad_token_id=PAD, strategy="beam")
    plain = generate_groups(model, ids, mask, engine="plain", **kw)
    fast = generate_groups(model, ids, mask, **kw)
    assert plain.completion_mask.sum(1).unique().numel() > 1  # beams of different lengths
    assert_same(plain, fast)


@pytest.mark.parametrize("rows", [1024, 3])
@pytest.mark.parametrize("down", ["linear", "linear+bias", "wrapped"])
def test_the_mlp_keeping_two_tensors_equals_the_modules_own(down, rows, monkeypatch):
    """`llama.mlp` (the packed forward's MLP) has the value and the gradients of `module(x)`:
    for the input, gate/up/down weights and a down bias; with a down projection that is not a
    plain Linear (LoRA's) it wraps the product only. It saves gate(x) and up(x) for the
    backward and nothing else of size [M, I] (autograd's MLP saves four)."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    from grpo.engine import llama

    monkeypatch.setattr(llama, "ROWS", rows)  # 3: 7 tokens in chunks of 3, 3 and 1
    torch.manual_seed(0)
    module = LlamaMLP(LlamaConfig(hidden_size=6, intermediate_size=10, num_attention_heads=2,
                                  mlp_bias=down == "linear+bias"))
    if down == "wrapped":
        class Wrapped(torch.nn.Module):  # a stand-in for peft's lora.Linear: not a plain nn.Linear
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x) * 1.5
        module.down_proj = Wrapped(module.down_proj)
    x = torch.randn(7, 6, requires_grad=True)
    w = torch.randn(7, 6)

    def grads(fn):
        module.zero_grad()
        x.grad = None
        out = fn(x)
        (out * w).sum().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()]

    theirs = grads(module)
    for a, b in zip(grads(lambda t: llama.mlp(module, t)), theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        llama.mlp(module, x)
    wide = [s for s in saved if s[-1] == 10 and s[0] == 7]
    assert len(wide) == (2 if down != "wrapped" else 3)  # gate(x), up(x) (+ the product LoRA's down keeps)


def test_the_mlp_keeping_two_tensors_under_bfloat16_autocast():
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    from grpo.engine import llama

    torch.manual_seed(0)
    module = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2))
    x = torch.randn(9, 16, requires_grad=True)
    outs = []
    for fn in (module, lambda t: llama.mlp(module, t)):
        module.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
        out.float().square().sum().backward()
        outs.append([out.detach(), x.grad.clone(), module.down_proj.weight.grad.clone()])
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def scored_batch():
    """3 prompts x 3 completions of up to 6 tokens, ragged, and a weight per token."""
    ids, mask = prompts(P=3, seed=4)
    G = 3
    pids, pmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    g = torch.Generator().manual_seed(1)
    comp = torch.randint(2, V, (9, 6), generator=g)
    cmask = (torch.arange(6) < torch.tensor([6, 1, 3, 5, 6, 2, 4, 6, 1])[:, None]).long()
    return pids, pmask, comp, cmask, torch.randn(9, 6, generator=g)


def scored_under(mode, model, batch, grad=True):
    """`completion_logprobs` (recompute_mlp) of a `scored_batch()` with the dispatch mode `mode`
    watching, and with grad the backward of its weighted sum: (log-probs, trainable gradients)."""
    pids, pmask, comp, cmask, weights = batch
    model.zero_grad()
    with mode:
        with torch.set_grad_enabled(grad):
            lp, _ = completion_logprobs(model, pids, pmask, comp, cmask, recompute_mlp=True)
        if grad:
            (lp * cmask * weights).sum().backward()
    return lp.detach() * cmask, [p.grad.clone() for p in model.parameters() if p.requires_grad] if grad else []


def test_the_hand_written_forward_checkpoints_its_layers_under_gradient_checkpointing(monkeypatch):
    """With Hugging Face's checkpointing on, the Llama-style packed forward still runs (it checkpoints
    each layer itself): the same log-probs and gradients, and far less kept for the backward."""
    from grpo.engine import packed
    from grpo.engine.models import enable_gradient_checkpointing

    model = qwen2().train()
    pids, pmask, comp, cmask, weights = scored_batch()
    taken = []
    real = packed.llama_hidden
    monkeypatch.setattr(packed, "llama_hidden", lambda *a, **k: taken.append(1) or real(*a, **k))

    def run():
        model.zero_grad()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            lp, _ = completion_logprobs(model, pids, pmask, comp, cmask, recompute_mlp=True)
        (lp * cmask * weights).sum().backward()
        return lp.detach() * cmask, [p.grad.clone() for p in model.parameters()], sum(kept)

    lp, grads, kept = run()
    enable_gradient_checkpointing(model)
    lp_c, grads_c, kept_c = run()
    assert len(taken) == 2
    torch.testing.assert_close(lp_c, lp, atol=0, rtol=0)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert kept_c < kept / 2, (kept_c, kept)


@pytest.mark.parametrize("lora", [False, True])
def test_the_mlp_by_rows_without_grad_and_under_checkpointing(lora, monkeypatch):
    """With `recompute_mlp`, where the MLP keeps nothing for the backward (no grad; checkpointed
    layers), the packed forward runs it `llama.ROWS` tokens at a time: the same log-probs and
    gradients as the whole-batch MLP, also for a LoRA-wrapped model, and no op, forward or
    backward, makes an [M, I] tensor wider than ROWS rows (the whole batch makes them)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from grpo.engine import llama
    from grpo.engine.adapters import add_lora
    from grpo.engine.models import enable_gradient_checkpointing

    D, I = 32, 64
    model = qwen2().train()
    if lora:
        model = add_lora(model, r=4, alpha=8, target_modules="all-linear")
        for p in model.parameters():  # the adapter's B starts at 0: give it a gradient-visible value
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
    pids, pmask, comp, cmask, weights = scored_batch()

    class WidestMLPTensor(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == I and t.shape[0] != D:
                    self.rows = max(self.rows, t.shape[0])  # [tokens, I] (not a transposed weight)
            return out

    def run(grad=True):
        widest = WidestMLPTensor()
        return *scored_under(widest, model, (pids, pmask, comp, cmask, weights), grad), widest.rows

    lp, grads, M = run()                       # not checkpointed: the whole batch at once
    assert M > 8
    monkeypatch.setattr(llama, "ROWS", 8)
    lp_nograd, _, rows_nograd = run(grad=False)
    enable_gradient_checkpointing(model)
    lp_c, grads_c, rows_c = run()
    assert rows_nograd <= 8 and rows_c <= 8, (rows_nograd, rows_c, M)
    torch.testing.assert_close(lp_nograd, lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(lp_c, lp, atol=1e-6, rtol=0)
    assert grads
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("per_call", [1, 2])
def test_the_packed_attention_runs_a_few_rows_at_a_time(grad, per_call, monkeypatch):
    """Where attention keeps nothing for the backward (no grad; checkpointed layers, with
    `recompute_mlp`) `packed._llama_attention` runs the completion rows `llama.ROWS // Tc` at a
    time (one or two rows per call here: 9 rows are no multiple of 2, and some runs hold a row
    that feeds no token): the same log-probs and gradients as all rows in one call, and no SDPA
    call, forward or backward, sees more completion rows than that."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from grpo.engine import llama
    from grpo.engine.models import enable_gradient_checkpointing

    model = qwen2().train()
    pids, pmask, comp, cmask, weights = scored_batch()
    Lp = int(pmask.shape[1])

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []  # batch size of each SDPA call on completion rows (keys longer than the prompt)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__ and args[1].shape[-2] > Lp:
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    def run(grad=True):
        calls = Calls()
        return *scored_under(calls, model, (pids, pmask, comp, cmask, weights), grad), calls.rows

    lp, grads, rows = run()                    # not checkpointed, with grad: all rows at once
    assert max(rows) == 9  # 3 prompts x 3 rows
    Tc = int(cmask.sum(1).max()) - 1  # completion tokens fed per row, at most
    monkeypatch.setattr(llama, "ROWS", per_call * Tc)
    if grad:
        enable_gradient_checkpointing(model)
    lp_r, grads_r, rows_r = run(grad)
    assert max(rows_r) == per_call and len(rows_r) >= 9 // per_call, rows_r
    torch.testing.assert_close(lp_r, lp, atol=1e-6, rtol=0)
    for a, b in zip(grads_r, grads if grad else []):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_keeps_neither_the_embedding_nor_an_input_gradient(lora):
    """Under activation checkpointing the packed forward's first checkpoint starts from the token
    ids: the [M, D] embedding is looked up again in the backward, not kept for it. And Hugging
    Face's switch no longer makes the embedding's output require grad (a hook only reentrant
    checkpointing needs): with a frozen embedding (LoRA) it would be a leaf kept to the end of
    the backward and given a .grad. Gradients are those of the unchecked forward."""
    from grpo.engine.adapters import add_lora
    from grpo.engine.models import enable_gradient_checkpointing, unwrap

    model = qwen2().train()
    if lora:
        model = add_lora(model, r=4, alpha=8, target_modules="all-linear")
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
    pids, pmask, comp, cmask, weights = scored_batch()
    embed = unwrap(model).model.embed_tokens
    outputs = []
    embed.register_forward_hook(lambda m, a, out: outputs.append(out) and None)

    def run():
        model.zero_grad()
        outputs.clear()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            lp, _ = completion_logprobs(model, pids, pmask, comp, cmask, recompute_mlp=True)
        (lp * cmask * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad], saved

    grads, _ = run()
    enable_gradient_checkpointing(model)
    grads_c, saved = run()
    embedded = outputs[0]
    assert not any(t.data_ptr() == embedded.data_ptr() for t in saved if t.numel())
    assert embedded.requires_grad == (not lora)
    if lora:
        assert embedded.grad is None
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_write_rows_hands_each_block_its_rows_of_the_gradient_without_copying_the_whole():
    """`packed._WriteRows`: disjoint row blocks written into one buffer give torch.cat's values and
    gradients, and the backward makes no tensor of the whole buffer's size (autograd's in-place
    copy would clone and zero the whole gradient once per write)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from grpo.engine import packed

    blocks = [torch.randn(n, 4, requires_grad=True) for n in (2, 3, 1)]
    out, a = torch.empty(6, 4), 0
    for block in blocks:
        out = packed._WriteRows.apply(out, block, a, a + len(block))
        a += len(block)
    torch.testing.assert_close(out, torch.cat(blocks), atol=0, rtol=0)
    grad = torch.randn(6, 4)

    class WholeSized(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if (isinstance(result, torch.Tensor) and result.shape == (6, 4)
                    and func is not torch.ops.aten.detach.default):
                self.made += 1
            return result

    with WholeSized() as whole:
        out.backward(grad)
    assert whole.made == 0
    for block, rows in zip(blocks, (slice(0, 2), slice(2, 5), slice(5, 6))):
        torch.testing.assert_close(block.grad, grad[rows], atol=0, rtol=0)


@pytest.mark.parametrize("path", ["hand_written", "general"])
def test_the_packed_attention_keeps_copies_not_its_inputs(path):
    """Neither packed attention keeps a view of its q, k or v for the backward: whatever it saves
    is its own copy (the laid-out rows, the prompts' few rows). A kept view keeps the whole
    tensor: `index_copy`'s backward keeps its source, and SDPA keeps its inputs, so a view of q
    there would keep every layer's [M, D] queries alive to the end of the backward (or, under
    checkpointing, to the end of the recompute, the backward's peak). Values and gradients are
    those of the same attention computed from copies."""
    from grpo.engine import packed

    g = torch.Generator().manual_seed(0)
    U, Lp, G, T, H, Hkv, hd = 2, 3, 2, 4, 4, 2, 8
    prompts_ = torch.randint(2, V, (U, Lp), generator=g)
    prompt_mask = torch.ones(U, Lp, dtype=torch.long)
    prompt_mask[0, 0] = 0
    pk = packed.PackedGroups(prompts_, prompt_mask, torch.tensor([0, 0, 1, 1]),
                             torch.randint(2, V, (U * G, T), generator=g), torch.tensor([4, 2, 3, 4]))
    M = int(pk.input_ids.shape[0])
    leaves = [torch.randn(M, h, hd, generator=g, requires_grad=True) for h in (H, Hkv, Hkv)]

    def attend(q, k, v):
        if path == "hand_written":
            return packed._llama_attention(q, k, v, pk, hd ** -0.5, per_call=1)
        return packed._packed_attention(None, *(x.transpose(0, 1)[None] for x in (q, k, v)), pk)[0].flatten(1)

    inputs = [x * 1 for x in leaves]  # non-leaf, as the model's projections are
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attend(*inputs)
    kept = {t.untyped_storage().data_ptr() for t in saved if t.numel()}
    assert not kept & {x.untyped_storage().data_ptr() for x in inputs}
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    copies = [x.detach().clone().requires_grad_() for x in leaves]
    (attend(*copies) * weights).sum().backward()
    for a, b in zip(grads, [x.grad for x in copies]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("model", [llama, qwen2])
def test_the_fused_rms_norm_is_the_modules_own_bit_for_bit(model):
    """The decoder's norms (`llama.rms_norm`): torch's fused op on float32, exactly the module's
    output; the module itself where that does not hold (bfloat16)."""
    from grpo.engine.llama import rms_norm

    m = model()
    torch.manual_seed(1)
    for norm in (m.model.layers[0].input_layernorm, m.model.norm):
        norm.weight.data = torch.randn_like(norm.weight)  # not the ones it starts from
        fused = rms_norm(norm, torch.float32)
        assert fused is not norm
        x = torch.randn(7, norm.weight.shape[0]) * 3
        assert torch.equal(fused(x), norm(x))
        assert rms_norm(norm, torch.bfloat16) is norm


def test_the_decoders_rope_table_rows_are_the_per_position_tables():
    """`llama.rope_table`, made once per generation call, holds at row p exactly what
    `rope_tables` gives at position p; a RoPE that rescales by the longest position asked gets none."""
    from grpo.engine.llama import rope_table, rope_tables

    m = llama()
    x = m.model.embed_tokens.weight[:0]
    cos, sin = rope_table(m, x, 40)
    positions = torch.tensor([[0], [5], [39], [17]])
    c, s = rope_tables(m, x, positions)
    assert torch.equal(cos[positions.view(-1)], c) and torch.equal(sin[positions.view(-1)], s)
    m.model.rotary_emb.rope_type = "dynamic"
    assert rope_table(m, x, 40) is None


@pytest.mark.parametrize("model", [llama, qwen2])
def test_the_decoders_projections_and_mlp_are_the_modules_own_bit_for_bit(model):
    """`llama.linear` and `llama.swiglu` call F.linear on the weights: the module's output exactly
    (Qwen2's biases included); a hooked module, or a projection that is not a plain Linear, is
    called as the module, so its hooks and wrappers run."""
    from grpo.engine.llama import linear, swiglu

    m = model()
    layer = m.model.layers[0]
    x = torch.randn(5, m.config.hidden_size)
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj, m.lm_head):
        h = torch.randn(5, proj.in_features)
        assert linear(proj) is not proj and torch.equal(linear(proj)(h), proj(h))
    assert swiglu(layer.mlp) is not layer.mlp and torch.equal(swiglu(layer.mlp)(x), layer.mlp(x))
    calls = []
    handle = layer.mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert linear(layer.mlp.up_proj) is layer.mlp.up_proj
        assert torch.equal(swiglu(layer.mlp)(x), layer.mlp(x)) and len(calls) == 2
    finally:
        handle.remove()
    handle = layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert swiglu(layer.mlp) is layer.mlp
    finally:
        handle.remove()

    class Wrapped(torch.nn.Linear):
        pass

    wrapped = Wrapped(3, 2)
    assert linear(wrapped) is wrapped


def test_kept_rows_gather_each_rows_prompt_then_completion_keys_right_aligned():
    from grpo.engine.decoders import KeptRows
    g = torch.Generator().manual_seed(0)
    P, G, Hkv, Lp, T, hd = 3, 2, 2, 7, 5, 4
    # Left padding, and a hole where an earlier continuation padded between kept and new tokens.
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 1]])
    layers = [tuple(torch.randn(*shape, generator=g) for shape in
                    ((P, Hkv, Lp, hd), (P, Hkv, Lp, hd), (P * G, Hkv, T, hd), (P * G, Hkv, T, hd)))
              for _ in range(2)]
    fed = [0, 3, 5, 1, 2, 4]
    kept = KeptRows(layers, mask, G, fed)
    rows = kept.rows()
    # The naive reference: per row, its prompt's real positions in order, then its fed completion tokens.
    naive = [[(torch.cat([kp[r // G][:, mask[r // G].bool()], kc[r, :, :fed[r]]], dim=1),
               torch.cat([vp[r // G][:, mask[r // G].bool()], vc[r, :, :fed[r]]], dim=1))
              for kp, vp, kc, vc in layers] for r in range(P * G)]
    assert [row.length for row in rows] == [k.shape[1] for (k, _), *_ in naive]
    pick = torch.tensor([5, 0, 2])
    width = max(rows[r].length for r in pick.tolist()) + 2  # room left of the longest: masked padding
    for j, (k, v) in enumerate(kept.gather(pick, width)):
        assert k.shape == v.shape == (3, Hkv, width, hd)
        for i, r in enumerate(pick.tolist()):
            n = rows[r].length
            assert torch.equal(k[i, :, width - n:], naive[r][j][0])
            assert torch.equal(v[i, :, width - n:], naive[r][j][1])


@pytest.mark.parametrize("make", [llama, lambda: llama(kv_heads=2), qwen2],
                         ids=["llama", "llama_gqa", "qwen2_bias_gqa"])
def test_a_prefill_after_kept_rows_gives_the_logits_of_a_whole_prefill(monkeypatch, make):
    """`decoders.start` with `past`: rows that continue an earlier call's rows (some from one
    call, one from another, one from none) read only their new tokens, and predict what a
    prefill of their whole context predicts; the decoder continues from its keys and values as
    from the whole prefill's."""
    import grpo.engine.decoders as decoders
    from grpo.engine.decoders import start

    fed = []
    prefill_after = decoders.prefill_after
    monkeypatch.setattr(decoders, "prefill_after", lambda *a: fed.append(1) or prefill_after(*a))

    m = make().eval()
    first, second = prompts(P=3, seed=1), prompts(P=2, seed=2)
    calls = []
    for ids, mask in (first, second):
        calls.append(generate_groups(m, ids, mask, group_size=2, max_new_tokens=5, eos_token_id=[EOS],
                                     pad_token_id=PAD, generator=torch.Generator().manual_seed(0), keep_cache=True))
    g = torch.Generator().manual_seed(3)
    contexts, past = [], []
    for (ids, mask), gen, rows in ((first, calls[0], (0, 3, 5)), (second, calls[1], (2,))):
        for r in rows:
            n = int(gen.completion_mask[r].sum())
            read = ids[r // 2][mask[r // 2].bool()].tolist() + gen.completion_ids[r, :n - 1].tolist()
            assert gen.cache[r].length == len(read)
            new = torch.randint(3, V, (r % 3 + 1,), generator=g).tolist()
            contexts.append(read + gen.completion_ids[r, n - 1:n].tolist() + new)
            past.append(gen.cache[r])
    contexts.append(torch.randint(3, V, (4,), generator=g).tolist())  # no kept rows
    past.append(None)
    L = max(map(len, contexts))
    ids = torch.tensor([[PAD] * (L - len(c)) + c for c in contexts])
    mask = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in contexts])
    with torch.no_grad():
        state_kept, kept, pos_kept = start(m, ids, mask, 1, 4, True, past)
        assert fed == [1]
        state_whole, whole, pos_whole = start(m, ids, mask, 1, 4, True, None)
        torch.testing.assert_close(kept, whole, atol=1e-5, rtol=0)
        assert torch.equal(pos_kept, pos_whole)
        token = torch.randint(3, V, (len(contexts),), generator=g)
        for t in range(3):  # the same next tokens fed to both: the same logits
            a, b = state_kept.step(token, pos_kept + t, t), state_whole.step(token, pos_whole + t, t)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            token = a.argmax(-1)
