"""The model engine: loading, generation behind the rollout-backend seam, log-probs.

- `models`: loading models and tokenizers, device and dtype, dropout off, activation checkpointing
- `backend`: `RolloutBackend` (generate, sync_weights, stop_token_ids) and the `local` implementation
- `vllm_backend`: `rollout_backend: vllm`, vLLM's engine in this process on a synced copy of the policy
- `generation`: sampling and exact beam search of G completions per prompt
- `decoders`: the decode states (the model's own KV cache; the group decoder with one prompt KV
  per group for Llama-style models)
- `logprobs`: per-token log-probs and entropy of completions, prompts shared per group
- `packed`: the packed scoring/update forward: the model's own layers over a packed token list,
  with a packed attention function registered in transformers' AttentionInterface
- `lmhead`: log-probs and entropy from the last hidden states, optionally chunk by chunk
- `llama`: what the hand-written Llama-style forwards share (group decoder, packed variant)
- `adapters`: LoRA through peft (the reference = the adapter switched off), merge for export
- `moe`: the router load-balancing loss of mixture-of-experts models

Nothing here knows about configs, rewards or training.
"""
