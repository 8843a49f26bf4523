"""The other training commands: `grpo sft` and reward-model training, evaluation and scoring."""
