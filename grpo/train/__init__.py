"""The GRPO step and `grpo train`: rollout, update, evaluation, the loop that wires them."""
