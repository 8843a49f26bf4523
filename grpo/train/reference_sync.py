"""TR-DPO's reference update (Gorbatovski et al. 2024, arXiv:2404.09656), as TRL's
`sync_ref_model`: every tau = ref_model_sync_steps optimizer steps the frozen reference moves
towards the policy,

    pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref        (alpha = ref_model_mixup_alpha)

parameter by parameter (TRL's SyncRefModelCallback), so the KL penalty anchors the policy to a
slowly moving copy of itself instead of the initial model. alpha = 1 is a hard copy.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def mix_into_reference(policy, reference, alpha: float) -> None:
    """pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref, in the reference's (float32) weights."""
    for ref_p, p in zip(reference.parameters(), policy.parameters(), strict=True):
        ref_p.mul_(1.0 - alpha).add_(p.detach().to(ref_p.dtype), alpha=alpha)


class ReferenceSync:
    """Counts optimizer steps (called after each) and mixes the policy into the reference on every
    `every`-th; `done` is the count a resumed run starts from."""

    def __init__(self, policy, reference, every: int, alpha: float, done: int = 0):
        self.policy, self.reference, self.every, self.alpha, self.steps = policy, reference, every, alpha, done

    def __call__(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            mix_into_reference(self.policy, self.reference, self.alpha)
