"""The GRPO maths: advantages, importance ratios, policy losses, KL penalty, aggregation.

Pure functions over tensors and masks; nothing here loads a model, reads a file or knows about
processes. The choices users extend are registered by name (`register_adv_est`,
`register_policy_loss`); the small fixed ones (KL estimator, aggregation, ratio level and anchor)
are plain branches. The names are the config values (docs/design.md, "The maths").

- `advantages`: group / batch / none (DeepSeekMath, Dr. GRPO), rloo, reinforce_pp(_baseline),
  priority (stochastic-beam groups)
- `ranks`: rank (centred ranks within the group, Salimans et al. 2017), rankings as scores
- `process`: process supervision, per-token advantages [N, T] from step rewards (DeepSeekMath 4.1.3)
- `policy_losses`: importance ratio (token, or sequence as GSPO), PPO's clipped surrogate, CISPO, GMPO
- `token_weights`: truncated importance sampling (off-policy correction), high-entropy token selection
- `kl`: the k1 / k2 / k3 estimators of KL(pi_theta || pi_ref)
- `objective`: aggregation over the batch and the full per-batch loss `policy_loss`
- `preference`: the Bradley-Terry and Plackett-Luce losses of reward models
"""

from .advantages import (ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, compute_advantages, group_advantages,
                         register_adv_est, zero_variance_groups)
from .kl import KL_ESTIMATORS, KL_LOG_RATIO_CLAMP, kl_penalised_rewards, kl_penalty
from .objective import AGGREGATIONS, RATIO_ANCHORS, aggregate, loss_mask, policy_loss
from .policy_losses import (POLICY_LOSSES, RATIO_LEVELS, Surrogate, clipped_surrogate, importance_ratio,
                            register_policy_loss)
from .preference import bradley_terry_loss, plackett_luce_loss
from .process import StepRewards, process_advantages
from .ranks import centred_ranks, mean_ranks, tiers_to_scores
from .token_weights import (OFF_POLICY_CORRECTIONS, entropy_threshold, high_entropy_mask, sampler_mismatch,
                            truncated_is_weights)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "ADVANTAGE_SCALES", "AGGREGATIONS", "KL_ESTIMATORS", "KL_LOG_RATIO_CLAMP",
    "OFF_POLICY_CORRECTIONS", "POLICY_LOSSES", "RATIO_ANCHORS", "RATIO_LEVELS", "Surrogate", "aggregate",
    "bradley_terry_loss", "centred_ranks", "clipped_surrogate", "compute_advantages", "entropy_threshold",
    "group_advantages", "high_entropy_mask", "importance_ratio", "kl_penalised_rewards", "kl_penalty", "loss_mask",
    "mean_ranks", "plackett_luce_loss", "policy_loss", "process_advantages", "register_adv_est",
    "register_policy_loss", "sampler_mismatch", "StepRewards", "tiers_to_scores", "truncated_is_weights",
    "zero_variance_groups",
]
