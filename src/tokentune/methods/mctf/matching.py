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
chain A -> B -> A resolves to the last A token). Every output token starts from one input token
(prefix, A left, B left) and the other ``r`` add into it (:class:`Fusion`): a merge (tokens, sizes,
the one-step-ahead attention) is one row selection and one ``index_add_`` of ``r`` rows, with the
pooling weights divided by their group's sum beforehand (``sum_i (w_i / W_k) x_i``, the same
average as ``sum_i w_i x_i / W_k``).

Deviation (prefix tokens): the reference protects the first ``num_protected`` rows of A, i.e. the
CLS token, and for more than one prefix token the wrong ones; here every prefix token (CLS,
registers, distillation token, VPT prompts) stays out of the matching and at the front, which is
the reference exactly when the CLS token is the only prefix token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
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


def token_factors(info: Optional[torch.Tensor], size: Optional[torch.Tensor], tau_info: float,
                  tau_size: float) -> Optional[torch.Tensor]:
    """The per-token factor ``u`` [B, N] with ``W_info(i, j) W_size(i, j) = u_i u_j`` (no gradient), or
    None when neither criterion acts: ``u = (a^-1 / max a^-1)^(1/tau_info) (s^-1 / max s^-1)^(1/tau_size)``
    (``(a_i^-1 a_j^-1)^(1/tau) = (a_i^-1)^(1/tau) (a_j^-1)^(1/tau)``: one power per token instead of
    one per pair; ``a^-1 / max a^-1 = min a / a``), the maxima over every token, prefix included."""
    u = None
    with torch.no_grad():
        for value, tau in ((info, tau_info), (None if size is None else size[..., 0], tau_size)):
            if not tau or value is None:
                continue
            inv = value.amin(dim=1, keepdim=True) / value
            factor = inv if tau == 1 else inv.pow(1 / tau)
            u = factor if u is None else u * factor
    return u


def scores(metric: torch.Tensor, info: Optional[torch.Tensor], size: Optional[torch.Tensor], num_prefix: int,
           tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """The multi-criteria weights W [B, |A|, |B|] between the non-prefix A and B tokens (no gradient).

    ``metric`` [B, N, C] the tokens, ``info`` [B, N] the attention every token receives (mean over
    heads and queries) or None, ``size`` [B, N, 1] or None (= all ones: no size term). The cosine is
    the tokens' dot products scaled by their inverse norms (``[B, |A|, |B|]``, not the ``[B, N, C]``
    tokens, is what gets scaled); the informativeness and size terms are per-token factors
    (:func:`token_factors`).
    """
    p = num_prefix
    ia, ib = slice(p + (p % 2), None, 2), slice(p + 1 - (p % 2), None, 2)
    with torch.no_grad():
        u = token_factors(info, size, tau_info, tau_size)
        if tau_sim:
            inv = metric.norm(dim=-1).reciprocal()                               # [B, N]
            w = metric[:, ia] @ metric[:, ib].transpose(-1, -2)                  # dot products [B, |A|, |B|]
            w = (w * ((inv[:, ia] * 0.5)[:, :, None] * inv[:, None, ib])).add_(0.5)    # (cos + 1) / 2
            if tau_sim != 1:
                w = w.pow_(1 / tau_sim)
            if u is not None:
                w = w.mul_(u[:, ia, None] * u[:, None, ib])
        elif u is not None:
            w = u[:, ia, None] * u[:, None, ib]
        else:
            w = metric.new_ones(metric.shape[0], len(range(*ia.indices(metric.shape[1]))),
                                len(range(*ib.indices(metric.shape[1]))))
    return w


@functools.lru_cache(maxsize=256)
def _layout(num_tokens: int, num_prefix: int, r: int, device: torch.device) -> tuple:
    """Index tables that depend on the shapes only (built once per shape): the output rows after the
    prefix tokens [N - r - p], the prefix tokens' own rows [p], and, for every token position, its
    place in the concatenation (prefix, A tokens, B tokens) [N]."""
    with torch.inference_mode(False), torch.no_grad():
        n, p = num_tokens, num_prefix
        start_a, start_b = p + (p % 2), p + 1 - (p % 2)
        order = torch.arange(n, device=device)
        order[start_a::2] = torch.arange(p, p + len(range(start_a, n, 2)), device=device)
        order[start_b::2] = torch.arange(p + len(range(start_a, n, 2)), n, device=device)
        return torch.arange(p, n - r, device=device), torch.arange(p, device=device), order


@dataclass
class Fusion:
    """One MCTF step as flat rows: input rows index ``x.reshape(B * N, C)``, output rows a
    ``(B * (N - r), C)`` result. Every output token starts from one input token (``keep``: a prefix
    token, an A token left or a B token left); the ``r`` others (``src``) add into the output token
    they end in (``dst``), so a pooling is one row selection and one ``index_add_`` of ``r`` rows.

    Attributes:
        rows: [B * N] output row of every input row (the map ``dest``, flattened).
        keep: [B * (N - r)] the input row every output row starts from (output order).
        src: [B * r] the input rows merged into another token.
        dst: [B * r] the output row each of them ends in.
        out_tokens: N - r.
    """

    rows: torch.Tensor
    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    out_tokens: int

    def pool(self, x: torch.Tensor, w_keep: Optional[torch.Tensor] = None,
             w_src: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_{i -> k} w_i x_i`` [B, N - r, C] of ``x`` [B, N, C] with the weights of the kept and the
        merged rows (``w_keep`` [B * (N - r), 1], ``w_src`` [B * r, 1]; None: a plain sum)."""
        B, N, C = x.shape
        rows = x.reshape(B * N, C)
        out, src = rows.index_select(0, self.keep), rows.index_select(0, self.src)
        if w_keep is not None:
            out, src = out * w_keep, src * w_src
        return out.index_add_(0, self.dst, src).view(B, self.out_tokens, C)


def fusion(w: torch.Tensor, r: int, num_tokens: int, num_prefix: int, bidirection: bool = True) -> Fusion:
    """The rows of the step that merges ``r`` tokens by the weights ``w`` [B, |A|, |B|] (:func:`scores`)."""
    B, n_a, n_b = w.shape
    p, n, out = num_prefix, num_tokens, num_tokens - r
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    n_unm = n_a - r1
    start_a, start_b = p + (p % 2), p + 1 - (p % 2)
    layout = _layout.__wrapped__ if torch.compiler.is_compiling() else _layout   # compiled: tables become constants
    after, prefix, order = layout(n, p, r, w.device)
    with torch.no_grad():
        node_max, node_idx = w.max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True)
        src1, unm1 = edge[:, :r1], edge[:, r1:]
        if p:
            unm1 = unm1.sort(dim=1)[0]                     # the reference sorts when a token is protected
        if bidirection:                                    # B -> the A tokens left, on the same scores
            node_max2, node_idx2 = w.gather(1, unm1[:, :, None].expand(B, n_unm, n_b)).max(dim=1)
            edge2 = node_max2.sort(dim=-1, descending=True)[1]
            src2, unm2 = edge2[:, :r2], edge2[:, r2:]
            dst2 = node_idx2.gather(1, src2) + p           # the row of its A token: p + rank among the A left
            # B tokens in that order: the first r2 go to their A token, the others to the rows after the A left
            out_b = torch.empty_like(edge2).scatter_(1, edge2, torch.cat([dst2, after[n_unm:].expand(B, -1)], dim=1))
        else:
            src2, unm2, dst2 = edge[:, :0], torch.arange(n_b, device=w.device).expand(B, n_b), edge[:, :0]
            out_b = after[n_unm:].expand(B, n_b)
        dst1 = out_b.gather(1, node_idx.gather(1, src1))   # an A token ends where its B token ends
        out_a = torch.empty_like(edge).scatter_(1, torch.cat([unm1, src1], dim=1),
                                                torch.cat([after[:n_unm].expand(B, -1), dst1], dim=1))
        dest = torch.cat([prefix.expand(B, p), out_a, out_b], dim=1).index_select(1, order)
        batch = torch.arange(B, device=w.device)[:, None]
        keep = torch.cat([prefix.expand(B, p), unm1 * 2 + start_a, unm2 * 2 + start_b], dim=1) + batch * n
        src = torch.cat([src1 * 2 + start_a, src2 * 2 + start_b], dim=1) + batch * n
        dst = torch.cat([dst1, dst2], dim=1) + batch * out
    return Fusion(rows=(dest + batch * out).reshape(-1), keep=keep.reshape(-1), src=src.reshape(-1),
                  dst=dst.reshape(-1), out_tokens=out)


def match(w: torch.Tensor, r: int, num_tokens: int, num_prefix: int, bidirection: bool = True) -> torch.Tensor:
    """The output token of every input token [B, N] (int64) after merging ``r`` tokens by the
    weights ``w`` [B, |A|, |B|] (:func:`scores`); the output has ``N - r`` tokens."""
    B = w.shape[0]
    rows = fusion(w, r, num_tokens, num_prefix, bidirection).rows.view(B, num_tokens)
    return rows - torch.arange(B, device=w.device)[:, None] * (num_tokens - r)


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
