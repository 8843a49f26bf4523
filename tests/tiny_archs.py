"""Tiny randomly initialised causal LMs of every architecture the engine's fast paths cover,
built from configs (no download), and one batch of GRPO groups to score with them."""

import torch
import transformers as tf

V, PAD, EOS = 37, 0, 1
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=None,
               eos_token_id=EOS)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

# name -> (model class, config class, config overrides). Sliding windows shorter than the batch's
# sequences (4, 5) check the packed masks' window; Mistral's 4096 is the "longer than the
# sequence" case; Gemma 2 has attention-logit and final-logit softcapping (and loads eager).
ARCHS = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, {}),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, {}),
    "qwen2_sliding": (tf.Qwen2ForCausalLM, tf.Qwen2Config,
                      dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, dict(head_dim=8)),
    "mistral_window_4096": (tf.MistralForCausalLM, tf.MistralConfig, dict(sliding_window=4096)),
    "mistral_window_4": (tf.MistralForCausalLM, tf.MistralConfig, dict(sliding_window=4)),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig, dict(head_dim=8)),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config,
               dict(head_dim=8, sliding_window=4, final_logit_softcapping=3.0, attn_logit_softcapping=5.0)),
    "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig,
               dict(head_dim=8, sliding_window=4, final_logit_softcapping=3.0,
                    layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, {}),
    "olmo2": (tf.Olmo2ForCausalLM, tf.Olmo2Config, {}),
    "smollm3": (tf.SmolLM3ForCausalLM, tf.SmolLM3Config, {}),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config, dict(n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64)),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, {}),
    "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig,
                  dict(num_experts=4, shared_expert_intermediate_size=16, **_MOE)),
    "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, dict(head_dim=8, num_experts=4, **_MOE)),
    "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
}


def build(name: str, seed: int = 0, **overrides):
    model_cls, config_cls, extra = ARCHS[name]
    common = _COMMON if name != "gpt2" else {k: _COMMON[k] for k in ("vocab_size", "pad_token_id", "bos_token_id",
                                                                        "eos_token_id")}
    kwargs = {**common, **extra, **overrides}
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs))


def group_batch(seed: int = 0, P: int = 3, G: int = 3, Lp: int = 6, T: int = 7):
    """P left-padded prompts (different lengths) x G completions, right-padded, with lengths
    0 .. T (one row not scored at all, one of a single token): (prompt_ids, prompt_mask,
    completion_ids, completion_mask, weights)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (P, Lp), generator=g)
    mask = torch.ones(P, Lp, dtype=torch.long)
    mask[0, :2] = 0
    mask[-1, :4] = 0
    comp = torch.randint(2, V, (P * G, T), generator=g)
    lengths = torch.randint(1, T + 1, (P * G,), generator=g)
    lengths[1], lengths[-1], lengths[2] = 1, 0, T
    cmask = (torch.arange(T) < lengths[:, None]).float()
    weights = torch.randn(P * G, T, generator=g)
    return ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), comp, cmask, weights


def record_decoders(monkeypatch) -> list[str]:
    """The decode state (`GroupDecoder` or `CacheDecoder`) each generate_groups call starts, in
    order: which engine a model got."""
    import grpo.engine.generation as generation
    from grpo.engine import decoders

    states = []

    def spy(*a, **k):
        out = decoders.start(*a, **k)
        states.append(type(out[0]).__name__)
        return out
    monkeypatch.setattr(generation, "start", spy)
    return states
