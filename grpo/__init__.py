"""grpo: Group Relative Policy Optimization for Hugging Face causal language models.

GRPO was introduced in DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) and used with rule-based
rewards by DeepSeek-R1 (DeepSeek-AI 2025, arXiv:2501.12948). The maths lives in `grpo.algorithm`
as small pure functions; `grpo.trainer` wires generation, rewards and the update together.
"""

__version__ = "0.1.0"
