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

The matching is a pure function (:func:`bipartite_soft_matching`) returning a :class:`Matching`
of index tensors; :func:`merge` applies it to any per-token tensor (features, sizes, sources).
:class:`TokenMerging` is the module a block runs between attention and MLP. PYRA plugs in
through ``TokenMerging.modulator``: a module that rewrites the size-weighted source tokens
before they are summed into their destinations.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import TokenTuneError
from .typecheck import check_fields

Schedule = Union[int, Sequence[int], Tuple[int, float], str]


# ----------------------------------------------------------------------------- schedules
def parse_schedule(r: Schedule, num_layers: int) -> List[int]:
    """Turn a ToMe schedule into one ``r`` per layer.

    * ``int``: the same ``r`` in every layer;
    * ``list``: one value per layer, padded with zeros when shorter;
    * ``(r, inflect)``: ToMe's linear schedule, ``inflect`` in [-1, 1] (-1 = decreasing,
      0 = constant, +1 = increasing), the values ``int(min + step * i)``.
    """
    if isinstance(r, bool):
        raise TokenTuneError(f"invalid ToMe schedule {r!r}: give an int, a per-layer list or (r, inflect)")
    if isinstance(r, int):
        values = [r] * num_layers
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = int(r[0]), float(r[1])
        if not -1.0 <= inflect <= 1.0:
            raise TokenTuneError(f"ToMe inflection {inflect} is outside [-1, 1]; use -1 (decreasing) .. +1 (increasing)")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(num_layers - 1, 1)
        values = [int(lo + step * i) for i in range(num_layers)]
    elif isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if len(values) > num_layers:
            raise TokenTuneError(
                f"ToMe schedule has {len(values)} entries but the model has {num_layers} blocks; "
                f"give at most {num_layers} values")
        values = values + [0] * (num_layers - len(values))
    else:
        raise TokenTuneError(f"invalid ToMe schedule {r!r}: give an int, a per-layer list or (r, inflect)")
    if any(v < 0 for v in values):
        raise TokenTuneError(f"ToMe schedule {values} has a negative entry; every r must be >= 0")
    return values


def max_merge(num_tokens: int, num_prefix: int) -> int:
    """The largest r one bipartite step can merge with ``num_tokens`` tokens (prefix protected)."""
    num_a = (num_tokens + 1) // 2 - (num_prefix + 1) // 2   # unprotected tokens in A (sources)
    num_b = num_tokens // 2 - num_prefix // 2               # unprotected tokens in B (destinations)
    if num_b <= 0:
        return 0
    return max(0, min((num_tokens - num_prefix) // 2, num_a))


def fit_schedule(schedule: Sequence[int], num_tokens: int, num_prefix: int, strict: bool) -> List[int]:
    """Check (``strict``) or cap a per-layer schedule against the token count it will see.

    Capping is ToMe's own rule for an int ``r`` (e.g. ``r=16`` on ViT-B/16 merges only 10 tokens
    in the last block). An explicit per-layer list must fit exactly: a value that cannot be merged
    is an error, because methods with per-layer parameters (PYRA) depend on it.
    """
    fitted, n = [], num_tokens
    for layer, r in enumerate(schedule):
        cap = max_merge(n, num_prefix)
        if r > cap:
            if strict:
                raise TokenTuneError(
                    f"merge schedule asks for r={r} in block {layer} but only {cap} of its {n} tokens can merge "
                    f"({num_prefix} protected); lower that entry (tokens per block: {token_counts(fitted, num_tokens)})")
            r = cap
        fitted.append(r)
        n -= r
    return fitted


def token_counts(schedule: Sequence[int], num_tokens: int) -> List[int]:
    """Token count entering each block and after the last one."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


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


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """Match ``r`` tokens of set A into set B by cosine similarity of ``metric`` [B, N, C].

    Prefix tokens are protected by leaving them out of the similarity matrix: in A they are never
    a source, in B never a destination (the reference sets their scores to -inf, which is the same).
    """
    B, N, _ = metric.shape
    if not 0 < r <= max_merge(N, num_prefix):
        raise ValueError(f"cannot merge r={r} of {N} tokens with {num_prefix} protected")
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2       # prefix tokens in A (even) and B (odd)
    layout = _layout.__wrapped__ if torch.compiler.is_compiling() else _layout   # compiled: tables become constants
    prefix, a_rows, b_rows, out_base = layout(B, N, num_prefix, r, metric.device)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2]       # the unprotected halves
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        src = edge_idx[:, :r]                                        # merged away, ToMe order
        unm = edge_idx[:, r:].sort(dim=-1)[0]                        # kept, original order
        dst = node_idx.gather(dim=-1, index=src)
        keep = torch.cat([prefix, a_rows.gather(1, unm), b_rows], dim=1)
    return Matching(keep=keep.flatten(), src=a_rows.gather(1, src).flatten(), dst=b_rows.gather(1, dst).flatten(),
                    dst_out=(dst + out_base).flatten(), batch=B, num_tokens=N, r=r)


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
    one increment with ``index_add_``, which is correct (values and gradients) when several sources
    share a destination. ``modulate`` (PYRA) rewrites the weighted sources ``x_i s_i`` first; the
    same arithmetic with and without it keeps an identity modulator bit-identical to plain ToMe.
    """
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    sizes = size.reshape(B * N, 1) if size is not None else x.new_ones(B * N, 1)
    d = m.dst_out                                   # output row of each source's destination
    src_size = sizes.index_select(0, m.src)
    out = rows.index_select(0, m.keep)
    out_size = sizes.index_select(0, m.keep).index_add_(0, d, src_size)
    dst = rows.index_select(0, m.dst)
    weighted = rows.index_select(0, m.src) * src_size
    if modulate is not None:
        weighted = modulate(weighted.view(B, m.r, C),
                            (dst * sizes.index_select(0, m.dst)).view(B, m.r, C)).reshape(B * m.r, C)
    out.index_add_(0, d, (weighted - dst * src_size) / out_size.index_select(0, d))
    return out.view(B, N - m.r, C), out_size.view(B, N - m.r, 1)


def merge_source(source: Optional[torch.Tensor], m: Matching, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """Track which input tokens each output token stands for ([B, N, N0] 0/1 map)."""
    if source is None:
        eye = torch.eye(num_tokens, device=like.device, dtype=like.dtype)
        source = eye[None].expand(like.shape[0], num_tokens, num_tokens)
    return merge(source, m, "amax")


# ----------------------------------------------------------------------------- module
@dataclass
class ToMeConfig:
    """Token merging options.

    Attributes:
        r: tokens merged per block: an int, a per-layer list, ``(r, inflect)``, a named
            schedule (``"low"``/``"high"``, where the backbone has one), or a target derived for
            this backbone (``"tokens:N"``, ``"flops:X"``, optionally ``":geometric"`` etc.; see
            ``tokentune.schedules``).
        prop_attn: add ``log(size)`` to the attention logits (proportional attention).
        trace_source: record which patches every token stands for (visualisation).
    """

    r: Schedule = 0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "tome_")


class TokenMerging(nn.Module):
    """The merge step a block runs between attention and MLP.

    ``r`` is this block's merge count; ``modulator`` (optional) rewrites the sources before the
    merge (PYRA). The module itself has no parameters.
    """

    def __init__(self, r: int, modulator: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.r = int(r)
        self.modulator = modulator

    def extra_repr(self) -> str:
        return f"r={self.r}"

    def forward(self, x: torch.Tensor, keys: torch.Tensor, state):
        r = min(self.r, max_merge(x.shape[1], state.num_prefix))
        if r <= 0:
            return x, state
        if self.modulator is not None and r != self.r:
            raise TokenTuneError(
                f"block expects to merge {self.r} tokens but only {r} of {x.shape[1]} can merge; "
                "the input has fewer tokens than the schedule was built for (rebuild with this image size)")
        m = bipartite_soft_matching(keys, r, state.num_prefix)
        source = state.source
        if state.trace_source:
            source = merge_source(source, m, x.shape[1], x)
        x, size = merge_weighted(x, state.size, m, self.modulator)
        return x, state.replace(size=size, source=source)


# ----------------------------------------------------------------------------- named schedules
# Per-layer schedules of the PYRA reference implementation (224x224, patch 16):
# "low" ~1.7x and "high" ~3.2x speed-up on GPU.
NAMED_SCHEDULES = {
    "vit_base_patch16_224": {
        "low": [16] * 11 + [10],
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
    "vit_large_patch16_224": {
        "low": [8] * 23 + [6],
        "high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    },
    "deit_base_distilled_patch16_224": {
        "low": [16] * 6 + [10] * 6,
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
}
# architectures that share a schedule table (same depth, patch size and token count)
_SCHEDULE_ALIASES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224",
}


def named_schedule(model_name: str, name: str, num_layers: int) -> List[int]:
    """The reference ``"low"``/``"high"`` schedule of a backbone (pretrained tag ignored)."""
    arch = model_name.split(".")[0]
    arch = _SCHEDULE_ALIASES.get(arch, arch)
    table = NAMED_SCHEDULES.get(arch)
    if table is None or name not in table:
        known = ", ".join(sorted(NAMED_SCHEDULES))
        raise TokenTuneError(
            f"no {name!r} merge schedule for {arch!r} (named schedules exist for {known}); "
            "give tome_r as an int, a per-layer list or (r, inflect)")
    schedule = list(table[name])
    if len(schedule) != num_layers:
        raise TokenTuneError(f"the {name!r} schedule of {arch} has {len(schedule)} entries but the model has "
                             f"{num_layers} blocks")
    return schedule
