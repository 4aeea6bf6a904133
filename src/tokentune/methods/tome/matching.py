"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

Reimplemented from the published behaviour (no code of the ToMe repository is used):

* The *metric* is the attention keys averaged over heads and L2-normalised, so similarity is
  cosine similarity between keys (for rotary-embedding models, timm's Eva family: the keys before
  their rotation, and a merged token keeps its destination's rotation; :mod:`tokentune.core.rope`).
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
    the batch) let merges run as ``index_select``/``index_add_`` on whole rows, which is several
    times faster on CPU than element-wise ``gather``/``scatter`` with expanded indices.

    Attributes:
        keep: [B * (N - r)] input row of every output row.
        src: [B * r] input rows merged away, per image in descending-similarity order (ToMe's).
        dst: [B * r] input row each source merges into.
        dst_out: [B * r] output row each source merges into.
        batch, num_tokens, r: shapes.
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    dst_out: torch.Tensor
    batch: int
    num_tokens: int
    r: int


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


@functools.lru_cache(maxsize=512)
def _b_table(batch: int, num_tokens: int, num_prefix: int, r: int, device: torch.device):
    """[2, B * nB]: the input row (0) and the output row (1) of every unprotected B token, flat over
    the batch, so that one ``index_select`` turns destinations into both; and the flat position of
    each image's first B token [B, 1]."""
    with torch.inference_mode(False), torch.no_grad():
        pa, pb = (num_prefix + 1) // 2, num_prefix // 2
        images = torch.arange(batch, device=device)[:, None]
        b_pos = torch.arange(2 * pb + 1, num_tokens, 2, device=device)
        b_start = num_prefix + ((num_tokens + 1) // 2 - pa - r)                     # first B row in the output
        b_rows = b_pos + images * num_tokens
        out_rows = torch.arange(b_pos.shape[0], device=device) + images * (num_tokens - r) + b_start
        first = images * b_pos.shape[0]
        return torch.stack([b_rows.flatten(), out_rows.flatten()]), first


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """Match ``r`` tokens of set A into set B by cosine similarity of ``metric`` [B, N, C].

    Prefix tokens are protected by leaving them out of the similarity matrix: in A they are never
    a source, in B never a destination (the reference sets their scores to -inf, which is the same).
    """
    B, N, _ = metric.shape
    if not 0 < r <= max_merge(N, num_prefix):
        raise ValueError(f"cannot merge r={r} of {N} tokens with {num_prefix} protected")
    compiling = torch.compiler.is_compiling()            # a traced graph keeps the general form (its batch may vary)
    layout, b_table = (_layout.__wrapped__, _b_table.__wrapped__) if compiling else (_layout, _b_table)  # compiled: constants
    tables = layout(B, N, num_prefix, r, metric.device)[:3] + b_table(B, N, num_prefix, r, metric.device)
    if torch.is_grad_enabled():
        with torch.no_grad():
            keep, src, dst, dst_out = _match(metric, r, num_prefix, tables, compiling)
    else:                                            # inference: no context to enter (it costs about an operator)
        keep, src, dst, dst_out = _match(metric, r, num_prefix, tables, compiling)
    return Matching(keep=keep, src=src, dst=dst, dst_out=dst_out, batch=B, num_tokens=N, r=r)


def _match(metric: torch.Tensor, r: int, num_prefix: int, tables: tuple, compiling: bool):
    """:func:`bipartite_soft_matching`'s flat rows (keep, src, dst, dst_out). Few operators, since at batch 1 each costs
    more than its arithmetic: the sort gives the order, the best destination is found for the ``r``
    sources only (the maximum's values over all of A are cheaper than its indices), one lookup gives
    a destination's input and output rows, and one image (eager) skips the batch offsets."""
    B = metric.shape[0]
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2       # prefix tokens in A (even) and B (odd)
    prefix, a_rows, b_rows, b_pairs, b_first = tables
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
    a, b = metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2]       # the unprotected halves
    scores = torch.bmm(a, b.transpose(1, 2))
    edge_idx = scores.amax(dim=-1).sort(dim=-1, descending=True)[1]   # A by best similarity (= argsort)
    a_sorted = a_rows.gather(1, edge_idx)                        # A rows, most similar first
    unm = a_sorted[:, r:].sort(dim=-1)[0]                        # kept, original order (rows grow with position)
    src = edge_idx[:, :r]                                        # merged away, ToMe order
    if compiling or B > 1:
        dst = scores.gather(1, src[..., None].expand(B, r, scores.shape[2])).argmax(dim=-1) + b_first
    else:                                                        # one image: positions in B are flat already
        dst = scores[0].index_select(0, src[0]).argmax(dim=-1)
    dst_rows = b_pairs.index_select(1, dst.flatten())            # [input rows; output rows]
    keep = torch.cat([prefix, unm, b_rows], dim=1)
    return keep.flatten(), a_sorted[:, :r].reshape(-1), dst_rows[0], dst_rows[1]


SourceHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _merge_rows(x: torch.Tensor, m: Matching, mode: str, modulate: Optional[SourceHook]) -> torch.Tensor:
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    out = rows.index_select(0, m.keep)
    src = rows.index_select(0, m.src)
    if modulate is not None:
        dst = rows.index_select(0, m.dst)
        src = modulate(src.view(B, m.r, C), dst.view(B, m.r, C)).reshape(B * m.r, C)
    if mode == "sum":
        out.index_add_(0, m.dst_out, src)
    elif mode == "amax":
        out.scatter_reduce_(0, m.dst_out[:, None].expand(-1, C), src, "amax", include_self=True)
    else:
        raise ValueError(f"unknown merge mode {mode!r}")
    return out.view(B, N - m.r, C)


def merge(x: torch.Tensor, m: Matching, mode: str = "sum", modulate: Optional[SourceHook] = None) -> torch.Tensor:
    """Apply a matching to a per-token tensor ``x`` [B, N, C]; returns [B, N - r, C].

    ``mode`` reduces sources into destinations (``"sum"`` or ``"amax"``). ``modulate(src, dst)``
    ([B, r, C] each) may rewrite the source rows, given their destinations as they were before
    any merge, before they are reduced (PYRA, Eq. 4-5).
    """
    return _merge_rows(x, m, mode, modulate)


def merge_weighted(x: torch.Tensor, size: Optional[torch.Tensor], m: Matching,
                   modulate: Optional[SourceHook] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge ``merge(x * s, sum) / merge(s, sum)``; returns tokens and sizes.

    Only destination rows change value, so tokens that are neither merged nor merged into are
    copied as they are (the reference's ``x * s / s`` gives the same value up to one rounding).
    A destination ``d`` with sources ``i`` and new size ``s_d' = s_d + sum_i s_i`` becomes
    ``(x_d s_d + sum_i x_i s_i) / s_d' = x_d + sum_i (x_i s_i - x_d s_i) / s_d'``: each source adds
    one increment with a scatter-add, which is correct (values and gradients) when several sources
    share a destination. ``modulate`` (PYRA) rewrites the weighted sources ``x_i s_i`` first; the
    same arithmetic with and without it keeps an identity modulator bit-identical to plain ToMe.
    """
    B, N, C = x.shape
    R = B * m.r
    rows = x.reshape(B * N, C)
    sizes = size.reshape(B * N, 1) if size is not None else x.new_ones(B * N, 1)
    d = m.dst_out.view(R, 1)                        # output row of each source's destination
    src_size = sizes.index_select(0, m.src)
    out = rows.index_select(0, m.keep)
    # scatter_add_ with the column index is what index_add_ runs on the CPU, without its own reshaping of the index
    out_size = sizes.index_select(0, m.keep).scatter_add_(0, d, src_size)
    dst = rows.index_select(0, m.dst)
    weighted = rows.index_select(0, m.src) * src_size
    if modulate is not None:
        weighted = modulate(weighted.view(B, m.r, C),
                            (dst * sizes.index_select(0, m.dst)).view(B, m.r, C)).reshape(R, C)
    inc = torch.addcmul(weighted, dst, src_size, value=-1) / out_size.index_select(0, m.dst_out)
    out.scatter_add_(0, d.expand(R, C), inc)
    return out.view(B, N - m.r, C), out_size.view(B, N - m.r, 1)


def merge_source(source: Optional[torch.Tensor], m: Matching, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """Track which input tokens each output token stands for ([B, N, N0] 0/1 map)."""
    if source is None:
        eye = torch.eye(num_tokens, device=like.device, dtype=like.dtype)
        source = eye[None].expand(like.shape[0], num_tokens, num_tokens)
    return merge(source, m, "amax")
