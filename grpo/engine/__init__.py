"""The model engine: loading, generation behind the rollout-backend seam, log-probs.

- `models`: loading models and tokenizers, device and dtype
- `backend`: `RolloutBackend` (generate, sync_weights) and the `local` implementation
- `generation`: sampling and exact beam search of G completions per prompt
- `decoders`: the decode states (the model's own KV cache; the group decoder with one prompt KV
  per group for Llama-style models)
- `logprobs`: per-token log-probs and entropy of completions, prompts shared per group
- `packed`: the packed scoring/update forward for Llama-style models
- `llama`: what the two hand-written Llama-style forwards share

Nothing here knows about configs, rewards or training.
"""
