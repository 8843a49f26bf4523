"""The Bradley-Terry loss of a reward model on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin).

    Bradley-Terry (1952): P(chosen preferred) = sigmoid(r_chosen - r_rejected); the loss is its
    negative log-likelihood (InstructGPT, Ouyang et al. 2022, eq. 1). A margin m > 0 asks for
    r_chosen to exceed r_rejected by at least about m (Llama 2, Touvron et al. 2023).
    logsigmoid is used instead of log(sigmoid(.)) so large negative differences do not give -inf.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()
