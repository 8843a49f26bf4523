"""The scoring forward written for groups: log-prob logits of G completions per prompt, packed.

`completion_logprobs` needs, for every completion token it will score, the logits that predict
it: for the policy in the update (with grad) and for pi_ref / pi_old (without). Run through
`model(...)` on a padded batch [N, Lp + T], that costs

- the prompt G times (every row of a group carries the same prompt), and
- every row padded to the longest completion: with EOS at ~12 of 16 tokens, a quarter of the
  completion columns are padding whose forward and backward are paid for and thrown away.

Here, for Llama-style decoders (the models `llama.supported` accepts), one forward runs over a packed
token list instead: each distinct prompt once, then each row's completion tokens up to the last
one that is scored, nothing else. Every projection and MLP (all but a few percent of the FLOPs)
runs on that list. Attention alone uses a padded layout: each row's completion queries attend,
in one call of PyTorch's fused attention, to their group's prompt keys followed by their own
earlier completion tokens. Gradients flow through all of it, so the prompt's projections and MLP,
forward and backward, are paid once per group.

Same numbers as `model(...)` on the padded batch (fp32 tolerance; tests/test_fastpaths.py checks
log-probs, entropy and gradients against it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .llama import attention_shape, rope, rope_tables


class PackedGroups:
    """Where every token of a packed batch sits: the index bookkeeping, computed once per call.

    prompts/prompt_mask [U, Lp]: the distinct prompts, left-padded. inverse [N]: each row's prompt
    (rows of one prompt are consecutive). targets [N, T]: completion tokens. lengths [N]: how many
    leading completion tokens of each row are scored (0 .. T).

    Packed order: the U*Lp prompt tokens (padding included: U*Lp is small and a fixed layout makes
    the prompt's attention a plain view), then row 0's fed completion tokens, row 1's, ... Row i
    feeds lengths[i] - 1 of them: its last scored token predicts nothing that is needed.
    """

    def __init__(self, prompts: Tensor, prompt_mask: Tensor, inverse: Tensor, targets: Tensor, lengths: Tensor):
        device = prompts.device
        U, Lp = prompts.shape
        N, T = targets.shape
        self.U, self.Lp = U, Lp
        fed = (lengths - 1).clamp(min=0)                                 # completion tokens fed per row
        self.Tc = max(int(fed.max()), 1) if N else 1
        # Each row's slot in its group: rows of prompt u are consecutive, slot = rank among them.
        counts = torch.bincount(inverse, minlength=U)
        self.Gmax = max(int(counts.max()), 1)
        group_start = torch.cumsum(counts, 0) - counts
        slot = inverse * self.Gmax + (torch.arange(N, device=device) - group_start[inverse])

        # Fed completion tokens: (row, column) pairs in packed order.
        col = torch.arange(self.Tc, device=device)
        feeds = col[None, :] < fed[:, None]                              # [N, Tc]
        row_of, col_of = feeds.nonzero(as_tuple=True)
        prompt_len = prompt_mask.sum(-1)
        self.input_ids = torch.cat([prompts.reshape(-1), targets[row_of, col_of]])
        self.position_ids = torch.cat([(prompt_mask.cumsum(-1) - 1).clamp(min=0).reshape(-1),
                                       prompt_len[inverse][row_of] + col_of])
        # Where each fed token goes in the attention layout [U * Gmax * Tc].
        self.layout_index = slot[row_of] * self.Tc + col_of
        # Attention masks (True = may attend). Prompts: causal within the prompt, padding keys
        # hidden; a padding query would see no key at all (NaN), so it sees itself.
        key_real = prompt_mask != 0                                      # [U, Lp]
        causal = torch.ones(Lp, Lp, dtype=torch.bool, device=device).tril()
        self.prompt_attend = (causal & (key_real[:, None, :] | torch.eye(Lp, dtype=torch.bool, device=device)))[:, None]
        # Completions: the group's real prompt tokens, then the row's own tokens causally; one
        # mask per row of the attention layout [U * Gmax, 1, Tc, Lp + Tc].
        own = torch.ones(self.Tc, self.Tc, dtype=torch.bool, device=device).tril()
        self.completion_attend = torch.cat([key_real[:, None, :].expand(U, self.Tc, Lp),
                                            own.expand(U, self.Tc, self.Tc)], dim=-1)[:, None] \
            .repeat_interleave(self.Gmax, dim=0)

        # The hidden states that predict scored token t of row i: the prompt's last position for
        # t = 0, fed completion token t - 1 otherwise. `score_index` picks them out of the packed
        # list; (score_row, score_col) is where each lands in the [N, T] result.
        scored = torch.arange(T, device=device)[None, :] < lengths[:, None]
        srow, scol = scored.nonzero(as_tuple=True)
        fed_start = torch.cumsum(fed, 0) - fed                           # packed offset of each row
        from_prompt = inverse[srow] * Lp + (Lp - 1)
        from_completion = U * Lp + fed_start[srow] + scol - 1
        self.score_index = torch.where(scol == 0, from_prompt, from_completion)
        self.score_row, self.score_col = srow, scol
        self.score_targets = targets[srow, scol]


def _attention(q: Tensor, k: Tensor, v: Tensor, pk: PackedGroups, scale: float) -> Tensor:
    """q [M, H, hd], k/v [M, Hkv, hd] in packed order -> attention output [M, H * hd].

    Two calls of PyTorch's fused attention (no [.., T, T] probabilities kept for the backward):
    the prompts among themselves, then every row's completion against its group's prompt keys
    followed by its own keys. The prompt keys are expanded to the G rows of a group, not copied
    into the packed list: its projections, like everything else about the prompt, ran once."""
    _, H, hd = q.shape
    rep = H // k.shape[1]
    if rep > 1:  # grouped-query attention: each key/value head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    U, Lp, Gmax, Tc = pk.U, pk.Lp, pk.Gmax, pk.Tc
    n_prompt, rows = U * Lp, U * Gmax
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def heads_first(x, n):  # [n * L, H, hd] -> [n, H, L, hd]
        return x.reshape(n, -1, H, hd).transpose(1, 2)

    qp, kp, vp = heads_first(q[:n_prompt], U), heads_first(k[:n_prompt], U), heads_first(v[:n_prompt], U)
    out_prompt = sdpa(qp, kp, vp, attn_mask=pk.prompt_attend, scale=scale).transpose(1, 2).reshape(n_prompt, H * hd)

    # The completions, scattered into [U * Gmax rows, Tc] (empty slots stay zero, never read).
    def layout(x):
        return heads_first(x.new_zeros(rows * Tc, H, hd).index_copy(0, pk.layout_index, x[n_prompt:]), rows)
    keys = torch.cat([kp.repeat_interleave(Gmax, dim=0), layout(k)], dim=2)   # [rows, H, Lp + Tc, hd]
    values = torch.cat([vp.repeat_interleave(Gmax, dim=0), layout(v)], dim=2)
    out = sdpa(layout(q), keys, values, attn_mask=pk.completion_attend, scale=scale)  # [rows, H, Tc, hd]
    out_completion = out.transpose(1, 2).reshape(rows * Tc, H * hd).index_select(0, pk.layout_index)
    return torch.cat([out_prompt, out_completion])


def scored_logits(model, pk: PackedGroups) -> Tensor:
    """Logits [K, V] predicting `pk.score_targets` (K scored tokens), from one packed forward."""
    base = model.model
    H, Hkv, hd, scale = attention_shape(model)
    x = base.embed_tokens(pk.input_ids)                                  # [M, D]
    cos, sin = rope_tables(model, x, pk.position_ids)                   # [M, 1, hd]
    M = x.shape[0]
    for layer in base.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = rope(a.q_proj(h).view(M, H, hd), cos, sin)
        k = rope(a.k_proj(h).view(M, Hkv, hd), cos, sin)
        v = a.v_proj(h).view(M, Hkv, hd)
        x = x + a.o_proj(_attention(q, k, v, pk, scale))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(base.norm(x.index_select(0, pk.score_index)))
