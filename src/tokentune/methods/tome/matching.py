"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

Reimplemented from the published behaviour (no code of the ToMe repository is used):

* The *metric* is the attention keys averaged over heads and L2-normalised, so similarity is
  cosine similarity between keys.
* Tokens alternate into two sets, A (even positions) and B (odd positions). Every A token picks
  its most similar B token; the ``r`` A tokens with the highest similarity are merged into their
  B partner (a scatter-sum), every other A token is kept.
* Prefix tokens (CLS, register and distillation tokens) are protected: one sitting in A is never
  a source, one sitting in B is never a destination. They stay at the front, in their order.
* Merging is a size-weighted average: ``x <- merge(x * s, sum) / merge(s, sum)`` where ``s``
  counts how many input patches a token stands for. ``s`` is carried from block to block and
  gives *proportional attention*: ``log s`` is added to the attention logits of every key.
* Output order: prefix tokens, the unmerged A tokens in their original order, then B (this
  matches the ToMe/PYRA reference order exactly, so later matchings pair the same tokens).

This module is the algorithm as pure functions: :func:`bipartite_soft_matching` returns a
:class:`Matching` of index tensors; :func:`merge` applies it to any per-token tensor (features,
sizes, sources). :class:`~tokentune.methods.tome.method.TokenMerging` is the module a block runs
between attention and MLP; PYRA plugs in through its ``modulator``, a module that rewrites the
size-weighted source tokens before they are summed into their destinations.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch


def max_merge(num_tokens: int, num_prefix: int) -> int:
    """The largest r one bipartite step can merge with ``num_tokens`` tokens (prefix protected)."""
    num_a = (num_tokens + 1) // 2 - (num_prefix + 1) // 2   # unprotected tokens in A (sources)
    num_b = num_tokens // 2 - num_prefix // 2               # unprotected tokens in B (destinations)
    if num_b <= 0:
        return 0
    return max(0, min((num_tokens - num_prefix) // 2, num_a))


# ----------------------------------------------------------------------------- matching
@dataclass
class Matching:
    """One bipartite matching step, as flat row indices into ``x.reshape(B * N, C)``.

    Output layout per image: the prefix tokens (original order), the unmerged A tokens (original
    order), then the non-prefix B tokens (original order). Row indices (all int64, flattened over
    the batch) let merges run as ``index_select``/``index_put_`` on whole rows, which is several
    times faster on CPU than element-wise ``gather``/``scatter`` with expanded indices.

    Attributes:
        keep: [B * (N - r)] input row of every output row.
        src: [B * r] input rows merged away, per image in descending-similarity order (ToMe's).
        dst: [B * r] input row each source merges into.
        dst_out: [B * r] output row each source merges into.
        batch, num_tokens, r: shapes.
        pairs: [2 * B * r] ``src`` then ``dst`` in one tensor (``src`` and ``dst`` are its halves), so
            sources and destinations are read in one ``index_select``.
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    dst_out: torch.Tensor
    batch: int
    num_tokens: int
    r: int
    pairs: torch.Tensor


@functools.lru_cache(maxsize=512)
def _layout(batch: int, num_tokens: int, num_prefix: int, r: int, device: torch.device):
    """Index tables that depend only on the shapes (built once per shape, as normal tensors).

    Returns the flat rows of the prefix tokens [B, p], of the unprotected A tokens [B, nA] and of
    the unprotected B tokens [B, nB], and the output row of the first unprotected B token [B, 1].
    """
    with torch.inference_mode(False), torch.no_grad():
        pa, pb = (num_prefix + 1) // 2, num_prefix // 2
        offset = torch.arange(batch, device=device)[:, None] * num_tokens          # first row of each image
        prefix = torch.arange(num_prefix, device=device) + offset
        a_rows = torch.arange(2 * pa, num_tokens, 2, device=device) + offset
        b_rows = torch.arange(2 * pb + 1, num_tokens, 2, device=device) + offset
        b_start = num_prefix + ((num_tokens + 1) // 2 - pa - r)                     # first B row in the output
        out_base = torch.arange(batch, device=device)[:, None] * (num_tokens - r) + b_start
        return prefix, a_rows, b_rows, out_base


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """Match ``r`` tokens of set A into set B by cosine similarity of ``metric`` [B, N, C].

    Prefix tokens are protected by leaving them out of the similarity matrix: in A they are never
    a source, in B never a destination (the reference sets their scores to -inf, which is the same).
    Only B is normalised before the product: dividing A's rows by their norm cannot change which B
    token each A token picks, so A's best scores are divided by their norms afterwards ([B, nA]
    instead of [B, nA, C]); this is the cosine similarity up to float rounding.
    """
    B, N, _ = metric.shape
    if not 0 < r <= max_merge(N, num_prefix):
        raise ValueError(f"cannot merge r={r} of {N} tokens with {num_prefix} protected")
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2       # prefix tokens in A (even) and B (odd)
    layout = _layout.__wrapped__ if torch.compiler.is_compiling() else _layout   # compiled: tables become constants
    prefix, a_rows, b_rows, out_base = layout(B, N, num_prefix, r, metric.device)
    with torch.no_grad():
        norm = metric.norm(dim=-1)                                   # [B, N]
        a, b = metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2] / norm[:, 2 * pb + 1::2, None]   # unprotected halves
        scores = a @ b.transpose(-1, -2)
        # argmax + gather rather than max(dim): on one image max() still starts a parallel region
        node_idx = scores.argmax(dim=-1)
        node_max = scores.gather(-1, node_idx[..., None])[..., 0] / norm[:, 2 * pa::2]   # cosine similarity
        edge_idx = node_max.argsort(dim=-1, descending=True)
        a_sorted = a_rows.gather(1, edge_idx)                        # A's input rows, most similar first
        dst = node_idx.gather(1, edge_idx[:, :r])                    # the first r are merged away (ToMe order)
        keep = torch.cat([prefix, a_sorted[:, r:].sort(dim=-1)[0], b_rows], dim=1)   # kept A rows in original order
        pairs = torch.stack([a_sorted[:, :r], b_rows.gather(1, dst)]).flatten()
    return Matching(keep=keep.flatten(), src=pairs[: B * r], dst=pairs[B * r:], dst_out=(dst + out_base).flatten(),
                    batch=B, num_tokens=N, r=r, pairs=pairs)


SourceHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _add_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[rows[i]] += values[i]`` in place, correct when rows repeat (several sources, one destination).

    ``index_put_(accumulate=True)`` rather than ``index_add_``: on CPU, ``index_add_`` runs as a
    scatter-add that first sorts the indices in several parallel passes (tens of microseconds
    each, and far more when another process holds a core), while ``index_put_`` accumulates in one
    pass (serially for small tensors). Same sums up to the order of float additions.
    """
    return out.index_put_((rows,), values, accumulate=True)


def merge(x: torch.Tensor, m: Matching, mode: str = "sum", modulate: Optional[SourceHook] = None) -> torch.Tensor:
    """Apply a matching to a per-token tensor ``x`` [B, N, C]; returns [B, N - r, C].

    ``mode`` reduces sources into destinations (``"sum"`` or ``"amax"``). ``modulate(src, dst)``
    ([B, r, C] each) may rewrite the source rows, given their destinations as they were before
    any merge, before they are reduced (PYRA, Eq. 4-5).
    """
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    out = rows.index_select(0, m.keep)
    if modulate is None:
        src = rows.index_select(0, m.src)
    else:
        src, dst = rows.index_select(0, m.pairs).view(2, B, m.r, C).unbind(0)
        src = modulate(src, dst).reshape(B * m.r, C)
    if mode == "sum":
        _add_rows(out, m.dst_out, src)
    elif mode == "amax":
        out.scatter_reduce_(0, m.dst_out[:, None].expand(-1, C), src, "amax", include_self=True)
    else:
        raise ValueError(f"unknown merge mode {mode!r}")
    return out.view(B, N - m.r, C)


def merge_weighted(x: torch.Tensor, size: Optional[torch.Tensor], m: Matching,
                   modulate: Optional[SourceHook] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge ``merge(x * s, sum) / merge(s, sum)``; returns tokens and sizes.

    Only destination rows change value, so tokens that are neither merged nor merged into are
    copied as they are (the reference's ``x * s / s`` gives the same value up to one rounding).
    A destination ``d`` with sources ``i`` and new size ``s_d' = s_d + sum_i s_i`` becomes
    ``(x_d s_d + sum_i x_i s_i) / s_d' = x_d + sum_i (x_i - x_d) s_i / s_d'``: each source adds one
    increment (accumulated, so correct in values and gradients when several sources share a
    destination). Per block this is one read of the kept rows, one of the source and destination
    rows, two element-wise operations on the ``r`` sources and one accumulation; the size ratios
    ``s_i / s_d'`` are computed on [B * r, 1].

    ``modulate`` (PYRA, Eq. 4-5) rewrites the weighted sources ``M_s = x_i s_i`` given the weighted
    destinations ``M_t = x_d s_d``; its change ``M_s' - M_s`` enters as the extra increment
    ``(M_s' - M_s) / s_d'``. A modulator at its identity (PYRA at initialisation) returns ``M_s``
    itself, so the extra increment is exactly zero and the result equals plain ToMe bit for bit.
    """
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    sizes = size.reshape(B * N, 1) if size is not None else x.new_ones(B * N, 1)
    d = m.dst_out                                   # output row of each source's destination
    src_size = sizes.index_select(0, m.src)
    out_size = _add_rows(sizes.index_select(0, m.keep), d, src_size)
    dst_size = out_size.index_select(0, d)          # s_d'                  [B * r, 1]
    src, dst = rows.index_select(0, m.pairs).view(2, B * m.r, C).unbind(0)
    inc = (src - dst) * (src_size / dst_size)
    if modulate is not None:
        weighted = src * src_size
        modulated = modulate(weighted.view(B, m.r, C), (dst * sizes.index_select(0, m.dst)).view(B, m.r, C))
        inc = inc + (modulated.reshape(B * m.r, C) - weighted) / dst_size
    out = _add_rows(rows.index_select(0, m.keep), d, inc)
    return out.view(B, N - m.r, C), out_size.view(B, N - m.r, 1)


def merge_source(source: Optional[torch.Tensor], m: Matching, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """Track which input tokens each output token stands for ([B, N, N0] 0/1 map)."""
    if source is None:
        eye = torch.eye(num_tokens, device=like.device, dtype=like.dtype)
        source = eye[None].expand(like.shape[0], num_tokens, num_tokens)
    return merge(source, m, "amax")
