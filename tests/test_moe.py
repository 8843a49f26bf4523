"""The router's load-balancing loss of mixture-of-experts models (TRL's router_aux_loss_coef term),
from the scoring forward itself: equal to the model's own `aux_loss` on the plain path, to a
naive loop over the Switch Transformer formula, and the same on the packed and KV-cache paths
(which count each group's prompt once)."""

import pytest
import torch

from grpo.engine import logprobs as logprobs_module
from grpo.engine.logprobs import completion_logprobs
from grpo.engine.models import position_ids_from_mask
from tiny_archs import build, group_batch

pytestmark = pytest.mark.usefixtures("one_thread_module")
MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


def naive_switch_loss(router_logits, mask, experts, top_k):
    """E * sum_e f_e P_e over every (layer, counted token): f_e = top-k slots sent to e per token,
    P_e = mean router probability of e (Switch Transformer eqs. 4-6, as transformers counts them)."""
    f, p, n = torch.zeros(experts), torch.zeros(experts), 0
    for layer in router_logits:
        for logits, counted in zip(layer, mask.reshape(-1)):
            if counted:
                probs = torch.softmax(logits.float(), -1)
                for e in probs.topk(top_k).indices:
                    f[e] += 1
                p += probs
                n += 1
    return experts * ((f / n) * (p / n)).sum()


def plain_inputs(batch):
    pids, pmask, comp, cmask, _ = batch
    lengths = (cmask * torch.arange(1, cmask.shape[1] + 1)).amax(-1).long()
    T_used = int(lengths.max())
    ids = torch.cat([pids, comp[:, :T_used - 1]], 1)
    attn = torch.cat([pmask, torch.ones(len(ids), T_used - 1, dtype=torch.long)], 1)
    fed = torch.arange(T_used - 1) < lengths[:, None] - 1
    return ids, attn, fed


@pytest.mark.parametrize("name", MOE)
def test_plain_path_aux_loss_is_the_models_own(name):
    model = build(name).train()
    batch = group_batch()
    aux = completion_logprobs(model, *batch[:4], engine="plain", router_aux_loss=True).aux_loss
    ids, attn, fed = plain_inputs(batch)
    counted = torch.cat([batch[1].bool(), fed], 1)
    out = model(input_ids=ids, attention_mask=counted.long(), position_ids=position_ids_from_mask(attn),
                output_router_logits=True)
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=1e-6)
    experts = getattr(model, "num_experts", None) or model.config.num_local_experts
    torch.testing.assert_close(aux, naive_switch_loss(out.router_logits, counted, experts, model.num_experts_per_tok),
                               atol=1e-5, rtol=1e-5)
    aux.backward()  # the router learns from it
    router = [p.grad for n, p in model.named_parameters() if n.endswith(".gate.weight")]
    assert router and all(g is not None and g.abs().sum() > 0 for g in router)


@pytest.mark.parametrize("name", MOE)
def test_packed_and_kv_cache_paths_count_each_prompt_once(name, monkeypatch):
    model = build(name).train()
    batch = group_batch(seed=1)
    pids, pmask = batch[:2]
    G = 3
    packed_aux = completion_logprobs(model, *batch[:4], router_aux_loss=True).aux_loss
    # The same tokens selected out of the padded forward: each group's prompt from its first row,
    # every row's fed completion tokens.
    ids, attn, fed = plain_inputs(batch)
    first_of_group = (torch.arange(len(ids)) % G == 0)[:, None]
    counted = torch.cat([pmask.bool() & first_of_group, fed], 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                    output_router_logits=True)
    experts = getattr(model, "num_experts", None) or model.config.num_local_experts
    expected = naive_switch_loss(out.router_logits, counted, experts, model.num_experts_per_tok)
    torch.testing.assert_close(packed_aux.detach(), expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(logprobs_module.packed, "supported", lambda m: False)  # the KV-cache hand-over
    cache_aux = completion_logprobs(model, *batch[:4], router_aux_loss=True).aux_loss
    torch.testing.assert_close(cache_aux.detach(), expected, atol=1e-5, rtol=1e-5)


def test_aux_loss_of_a_dense_model_is_an_error():
    with pytest.raises(ValueError, match="router_aux_loss"):
        completion_logprobs(build("llama"), *group_batch()[:4], router_aux_loss=True)


def moe_model_dir(tmp_path):
    """A tiny Mixtral with the character tokenizer, saved like a downloaded model."""
    from grpo.recipes.tasks import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = build("mixtral", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    return str(tmp_path / "moe")


def test_router_aux_loss_coef_adds_the_routers_loss_to_the_update(tmp_path, addition_files):
    """Same seed, same weights, same first rollout: the first step's loss with the coefficient is
    the loss without it plus coef * the router loss it logs (one micro-batch per minibatch)."""
    import json

    from grpo.config import TrainConfig, build as build_config
    from grpo.train.loop import train

    model = moe_model_dir(tmp_path)

    def first_step(out, coef):
        cfg = build_config(TrainConfig, dict(
            model=model, dataset=addition_files["train"], output_dir=str(tmp_path / out), rewards=["answer_distance"],
            prompts_per_step=2, group_size=4, max_completion_length=4, max_steps=1, max_prompt_length=16,
            report_to=[], router_aux_loss_coef=coef))
        train(cfg, quiet=True)
        return json.loads((tmp_path / out / "metrics.jsonl").read_text().splitlines()[0])

    plain, routed = first_step("plain", 0.0), first_step("routed", 0.5)
    assert "loss/router_aux" not in plain and routed["loss/router_aux"] > 0
    assert routed["reward/mean"] == plain["reward/mean"]
    assert routed["loss/total"] == pytest.approx(plain["loss/total"] + 0.5 * routed["loss/router_aux"], abs=1e-6)


def test_router_aux_loss_coef_on_a_dense_model_is_a_config_error(tiny_model_dir, addition_files, tmp_path):
    from grpo.config import TrainConfig, build as build_config
    from grpo.errors import ConfigError
    from grpo.train.loop import train

    cfg = build_config(TrainConfig, dict(model=tiny_model_dir, dataset=addition_files["train"],
                                         output_dir=str(tmp_path / "o"), rewards=["answer_distance"], max_steps=1,
                                         report_to=[], router_aux_loss_coef=0.02))
    with pytest.raises(ConfigError, match="router_aux_loss_coef: .*not a mixture-of-experts"):
        train(cfg, quiet=True)
