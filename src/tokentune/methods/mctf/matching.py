"""MCTF's multi-criteria bidirectional matching as pure functions (Lee et al., CVPR 2024).

Adapted from the official code, mlvlab/MCTF @ 2004da0c (MIT licence), ``utils/mctf.py``
(``mctf``, ``bipartite_soft_matching``, ``merge_wavg``). Notation of the paper (Sec. 3)::

    W_sim(i, j)  = ((cos(x_i, x_j) + 1) / 2) ^ (1 / tau_sim)                 similarity
    W_info(i, j) = (a_i^-1 a_j^-1) ^ (1 / tau_info),  a = attention a token receives (mean over
                   heads and queries), a^-1 scaled by its maximum over the tokens   informativeness
    W_size(i, j) = (s_i^-1 s_j^-1) ^ (1 / tau_size),  s = token size, s^-1 scaled likewise     size
    W = W_sim * W_info * W_size                                               (computed without gradient)

Set A = even token positions, B = odd ones. Bidirectional matching (``bidirection``): the
``r1 = r // 2`` A tokens whose best B partner scores highest merge into it; then the
``r2 = r - r1`` B tokens whose best *remaining* A partner scores highest merge into that A token,
the scores of the first pass reused (not recomputed after it). The merges are pooled by the
weights ``w_i`` (``pooling``: ``"attention"``: ``a_i s_i / max s``, the reference's default;
``"size"``: ``s_i``; ``"mean"``: 1)::

    x'_k = sum_{i -> k} w_i x_i / sum_{i -> k} w_i,     s'_k = sum_{i -> k} s_i

Output order (the reference's, so that later blocks split A/B alike): prefix tokens, the A tokens
left (in their order; score order when the model has no prefix token, as the reference), each
holding what merged into it, then the B tokens left in the order of the second pass's scores.

Both passes together are one map ``dest`` [B, N]: the output token every input token ends in (a
chain A -> B -> A resolves to the last A token). Every merge (tokens, sizes, source map, the
one-step-ahead attention) is then one ``index_add_`` by that map.

Deviation (prefix tokens): the reference protects the first ``num_protected`` rows of A, i.e. the
CLS token, and for more than one prefix token the wrong ones; here every prefix token (CLS,
registers, distillation token, VPT prompts) stays out of the matching and at the front, which is
the reference exactly when the CLS token is the only prefix token.
"""
from __future__ import annotations

from typing import Optional

import torch

POOLINGS = ("size", "attention", "mean")    # the reference's pooling_type 0, 1, 3


def merge_count(r: float, num_tokens: int, num_prefix: int) -> int:
    """Tokens one MCTF step merges (reference ``mctf.py:25-26``): a whole ``r``, or a fraction
    ``r < 1`` of the non-prefix tokens; at least 10 tokens stay, at most half the non-prefix
    tokens merge. (The reference's ``t - r < 10`` rule gives a negative count below 10 tokens:
    clamped to 0 here.)"""
    t = num_tokens
    if t - r < 10:
        r = t - 10
    r = min(int((t - num_prefix) * r) if r < 1 else int(r), (t - num_prefix) // 2)
    return max(int(r), 0)


def scores(metric: torch.Tensor, info: Optional[torch.Tensor], size: Optional[torch.Tensor], num_prefix: int,
           tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """The multi-criteria weights W [B, |A|, |B|] between the non-prefix A and B tokens (no gradient).

    ``metric`` [B, N, C] the tokens, ``info`` [B, N] the attention every token receives (mean over
    heads and queries) or None, ``size`` [B, N, 1] or None (= all ones: no size term).
    """
    p = num_prefix
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, p + (p % 2)::2], metric[:, p + 1 - (p % 2)::2]
        if tau_sim:
            w = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
        else:
            w = metric.new_ones(a.shape[0], a.shape[1], b.shape[1])
        for value, tau in ((info, tau_info), (None if size is None else size[..., 0], tau_size)):
            if not tau or value is None:
                continue
            inv = 1 / value
            inv = inv / inv.max(dim=1, keepdim=True)[0]          # over every token, prefix included
            ia, ib = inv[:, p + (p % 2)::2], inv[:, p + 1 - (p % 2)::2]
            w = w * (ia[:, :, None] * ib[:, None, :]) ** (1 / tau)
    return w


def _positions(n: int, p: int, device) -> tuple:
    """Token positions of the non-prefix A (even) and B (odd) tokens."""
    start_a, start_b = p + (p % 2), p + 1 - (p % 2)
    return torch.arange(start_a, n, 2, device=device), torch.arange(start_b, n, 2, device=device)


def match(w: torch.Tensor, r: int, num_tokens: int, num_prefix: int, bidirection: bool = True) -> torch.Tensor:
    """The output token of every input token [B, N] (int64) after merging ``r`` tokens by the
    weights ``w`` [B, |A|, |B|] (:func:`scores`); the output has ``N - r`` tokens."""
    B, n_a, n_b = w.shape
    p, device = num_prefix, w.device
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    with torch.no_grad():
        node_max, node_idx = w.max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True)
        src1, unm1 = edge[:, :r1], edge[:, r1:]
        if p:
            unm1 = unm1.sort(dim=1)[0]                     # the reference sorts when a token is protected
        dst1 = node_idx.gather(1, src1)
        n_unm = n_a - r1
        out_a = torch.empty(B, n_a, dtype=torch.long, device=device)
        out_b = torch.empty(B, n_b, dtype=torch.long, device=device)
        out_a.scatter_(1, unm1, torch.arange(p, p + n_unm, device=device).expand(B, n_unm))
        if bidirection:
            w2 = w.gather(1, unm1[:, :, None].expand(B, n_unm, n_b)).transpose(1, 2)   # [B, |B|, A left]
            node_max2, node_idx2 = w2.max(dim=-1)
            edge2 = node_max2.sort(dim=-1, descending=True)[1]
            src2, unm2 = edge2[:, :r2], edge2[:, r2:]
            dst2 = node_idx2.gather(1, src2)
            out_b.scatter_(1, unm2, torch.arange(p + n_unm, p + n_unm + n_b - r2, device=device).expand(B, n_b - r2))
            out_b.scatter_(1, src2, dst2 + p)
        else:
            out_b.copy_(torch.arange(p + n_unm, p + n_unm + n_b, device=device).expand(B, n_b))
        out_a.scatter_(1, src1, out_b.gather(1, dst1))
        pos_a, pos_b = _positions(num_tokens, p, device)
        dest = torch.arange(num_tokens, device=device).repeat(B, 1)     # prefix tokens stay where they are
        dest = dest.index_copy(1, pos_a, out_a).index_copy(1, pos_b, out_b)
    return dest


def _rows(dest: torch.Tensor, out_tokens: int) -> torch.Tensor:
    """Flat output rows [B * N] of ``dest`` [B, N] into a (B * out_tokens, ...) view."""
    B = dest.shape[0]
    return (dest + torch.arange(B, device=dest.device)[:, None] * out_tokens).reshape(-1)


def merge_sum(x: torch.Tensor, rows: torch.Tensor, out_tokens: int) -> torch.Tensor:
    """Sum ``x`` [B, N, C] into ``out_tokens`` tokens along the flat map ``rows`` [B * N]."""
    B, N, C = x.shape
    out = x.new_zeros(B * out_tokens, C)
    return out.index_add_(0, rows, x.reshape(B * N, C)).view(B, out_tokens, C)


def merge_amax(x: torch.Tensor, rows: torch.Tensor, out_tokens: int) -> torch.Tensor:
    """Elementwise maximum of non-negative ``x`` [B, N, C] (the source map) along ``rows``."""
    B, N, C = x.shape
    out = x.new_zeros(B * out_tokens, C)
    return out.scatter_reduce_(0, rows[:, None].expand(-1, C), x.reshape(B * N, C), "amax").view(B, out_tokens, C)


def pool_weights(pooling: str, info: Optional[torch.Tensor], size: Optional[torch.Tensor],
                 like: torch.Tensor) -> torch.Tensor:
    """The pooling weights w [B, N, 1] (no gradient; reference ``merge_wavg``)."""
    with torch.no_grad():
        s = size if size is not None else like.new_ones(like.shape[0], like.shape[1], 1)
        if pooling == "size":
            return s
        if pooling == "mean":
            return torch.ones_like(s)
        return info.unsqueeze(-1) * (s / s.amax(dim=-2, keepdim=True))
