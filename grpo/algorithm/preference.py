"""The reward-model losses: Bradley-Terry on preference pairs, Plackett-Luce on rankings."""

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


def plackett_luce_loss(scores: torch.Tensor, tiers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over lists of the Plackett-Luce negative log-likelihood of a ranking, ties allowed.

    Plackett (1975), Luce (1959): a ranking is drawn best first, each next item chosen among those
    not yet placed with probability softmax of their scores, so for the order pi_1 > ... > pi_K

        -log P(pi) = - sum_{k < K} [ s_{pi_k} - log sum_{j >= k} exp(s_{pi_j}) ].

    Ties as in Breslow's (1974) form of Cox's partial likelihood, which is this likelihood: every
    item of a tie group is chosen against the same set, the items of its group and of every group
    below it; the last group is chosen against itself alone and adds nothing. At K = 2 without a
    tie this is -log sigmoid(s_1 - s_2), the Bradley-Terry loss.

    scores [B, K]; tiers [B, K] integers, each item's tie group (0 = best; lower is better);
    mask [B, K] bool, False for padding (lists of different K). A list whose items are all tied
    says nothing and contributes 0 (it still counts in the mean).
    """
    s = scores.float()
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.bool()
    t = tiers.long()
    # risk[b, i, j]: item j is still unplaced when item i's tie group is chosen.
    risk = valid[:, None, :] & (t[:, None, :] >= t[:, :, None])
    log_denominator = torch.logsumexp(s[:, None, :].masked_fill(~risk, float("-inf")), dim=-1)
    last = t.masked_fill(~valid, -1).max(dim=1, keepdim=True).values
    chosen = valid & (t < last)  # items of the last tie group are not chosen against anything
    terms = torch.where(chosen, s - log_denominator, 0.0)
    return -terms.sum(dim=1).mean()
