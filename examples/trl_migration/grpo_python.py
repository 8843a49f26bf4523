"""The TRL script trl_grpo.py through grpo's Python API: `python grpo_python.py [MODEL]`.

A dict of keys (TRL's names accepted) with the reward functions themselves; the dataset may be a
path, a `datasets.Dataset` or a list of dicts.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rewards import brevity, correct  # noqa: E402

from grpo.train.loop import train  # noqa: E402


def run(model: str = "Qwen/Qwen2.5-0.5B-Instruct", output_dir: str = "runs/grpo-from-trl-python", **overrides):
    return train(dict(model=model, dataset=str(HERE / "data" / "addition.jsonl"), output_dir=output_dir,
                      reward_funcs=[correct, brevity], reward_weights=[1.0, 0.5], num_generations=4,
                      prompts_per_step=2, max_completion_length=4, learning_rate=1e-4, beta=0.04, loss_type="grpo",
                      scale_rewards="group", temperature=1.0, max_steps=2, seed=0, **overrides))


if __name__ == "__main__":
    run(*sys.argv[1:2])
