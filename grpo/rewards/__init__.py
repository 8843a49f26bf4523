"""Rewards: functions (`functions`), reward models (`models`), the weighted sum of a step
(`scoring`) and preference pairs (`preferences`)."""

from grpo.errors import RewardError

from .functions import (BUILTIN, answer_distance, exact_answer, first_number, is_exact_answer, load_function,
                        think_format)
from .models import (EnsembleScorer, RewardModelScorer, RunningMoments, load_reward_model, reward_model_text,
                     score_batches)
from .scoring import Reward, build_rewards, load_reward_states, reward_states, score

__all__ = ["BUILTIN", "Reward", "RewardError", "RewardModelScorer", "RunningMoments", "answer_distance",
           "build_rewards", "exact_answer", "first_number", "is_exact_answer", "load_function",
           "load_reward_model", "load_reward_states", "reward_model_text", "reward_states", "score",
           "score_batches", "think_format", "EnsembleScorer"]
