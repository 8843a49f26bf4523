"""The TRL script this example starts from (for reference: it needs `pip install trl` and is not
run by the tests). grpo.yaml and grpo_python.py train the same thing with grpo."""

from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer

from rewards import brevity, correct

dataset = load_dataset("json", data_files="data/addition.jsonl", split="train")

args = GRPOConfig(
    output_dir="runs/trl",
    num_generations=4,                # completions per prompt
    per_device_train_batch_size=8,    # completions per step: 2 prompts x 4
    max_completion_length=4,
    learning_rate=1e-4,
    beta=0.04,
    loss_type="grpo",
    scale_rewards="group",
    reward_weights=[1.0, 0.5],
    temperature=1.0,
    max_steps=2,
    seed=0,
)
trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[correct, brevity], args=args,
                      train_dataset=dataset)
trainer.train()
