"""Run under torchrun by tests/test_vllm_backend.py: `grpo train` with rollout_backend: vllm, in
which every weight sync is checked: after it, this process's engine must score fixed sequences
as the trainer (gathered, when sharded) does. Writes rank<R>.json into the output directory:
the largest difference after each sync, the trainer's scores, and the prompts this process sampled.

    python -m torch.distributed.run --nproc_per_node 2 tests/vllm_torchrun.py CONFIG.json
"""

import json
import os
import sys
from pathlib import Path

import torch

from grpo.engine.logprobs import completion_logprobs
from grpo.engine.vllm_backend import VLLMBackend
from grpo.runtime.sharding import gathered
from grpo.train.loop import train

PROMPTS = [[5, 6, 7], [8, 9, 10, 11]]
COMPLETIONS = [[12, 13, 14, 1], [15, 16, 2, 3]]


def vllm_scores(backend) -> torch.Tensor:
    """vLLM's own log-probs of the fixed completions (its prompt log-probs of prompt + completion)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    texts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(PROMPTS, COMPLETIONS)]
    outs = backend.llm.generate(texts, SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                                use_tqdm=False)
    T = len(COMPLETIONS[0])
    return torch.tensor([[lp[t].logprob for lp, t in zip(o.prompt_logprobs[-T:], c)]
                         for o, c in zip(outs, COMPLETIONS)])


def trainer_scores(model) -> torch.Tensor:
    L = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in PROMPTS])
    completion = torch.tensor(COMPLETIONS)
    with gathered(model), torch.no_grad():
        lp, _ = completion_logprobs(model, ids, mask, completion, torch.ones_like(completion))
    return lp.float()


def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    record = {"diffs": [], "trainer": [], "prompts": []}
    sync, generate = VLLMBackend.sync_weights, VLLMBackend.generate

    def checked_sync(self, model):
        sync(self, model)
        trainer = trainer_scores(model)
        record["diffs"].append((vllm_scores(self) - trainer).abs().max().item())
        record["trainer"].append(trainer.tolist())

    def recorded_generate(self, prompt_ids, prompt_mask, *args, **kwargs):
        record["prompts"].append([ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)])
        return generate(self, prompt_ids, prompt_mask, *args, **kwargs)

    VLLMBackend.sync_weights, VLLMBackend.generate = checked_sync, recorded_generate
    train(cfg, quiet=True)
    (Path(cfg["output_dir"]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
