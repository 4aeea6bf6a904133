"""ToFu: token fusion, pruning in early blocks and norm-preserving merging in late ones (Kim et al., WACV 2024,
arXiv 2312.01026).

ToFu has no official code. Two public readings implement it: PiToMe's ``algo/tofu`` (hchautran/PiToMe
@ 550b5dee, ``algo/tofu/merge.py``, ``algo/tofu/patch/{deit,timm}.py``; CC BY-NC 4.0: read, no code
used) and Westlake-AI/OpenToMe's ``opentome/timm/tofu.py`` (Apache-2.0), whose merge is the same.
We follow PiToMe's (the paper's authors compare against it, and it defines the rate as the keep
ratio the other training-free methods here use; OpenToMe takes ToMe's r, which ``tofu_r`` accepts too).

Every block, between attention and MLP, runs ToMe's bipartite soft matching on the keys averaged
over heads (A = even, B = odd positions, prefix tokens protected; :mod:`tokentune.methods.tome.matching`)
and then, for each destination ``d`` with sources ``i``:

* blocks ``0 .. L // 2`` (the reference's ``i > L // 2`` test: 0-6 of 12) **prune**: the sources are
  dropped, ``d`` is unchanged;
* the later blocks **merge** with MLERP as the reference computes it::

      x_d <- mean(x_d, x_i...) / |x_d| * max(|x_d|, |x_i|...)

  The paper's MLERP rescales the mean to the largest norm (``/ |mean|``); the reference divides by
  the destination's norm before merging (``tofu_mlerp="reference"``, the default, following the code);
  ``tofu_mlerp="paper"`` gives the paper's equation.

No sizes are tracked (unweighted means; the reference's proportional attention never sees a size,
so there is none). The rate is the reference's keep ratio per block, ``r = floor(N - N * ratio)``
with ``N`` counting the CLS token, or any ToMe schedule (int, list, ``"tokens:N"``, ``"flops:X"``).
Deviations (docs/baselines.md): r is capped at what one bipartite step can merge (the reference
fails beyond it); every prefix token is protected, not only CLS; timm's LayerScale is applied.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

import torch
from torch import nn

from ..core.method import Method, register_method
from ..core.vit import adapted_blocks
from ..errors import TokenTuneError
from ..typecheck import check_fields
from .tome.matching import Matching, merge
from .tome.method import TokenMerging, resolve_rate
from .tome.schedules import PROFILES, Schedule


@dataclass
class ToFuConfig:
    """ToFu options (defaults: PiToMe's reading of ToFu).

    Attributes:
        r: how much each block reduces: a float is the keep ratio per block (a block with N tokens,
            CLS included, removes floor(N - N * ratio); the reference's ``main_ic.py`` default 0.9125),
            an int the tokens removed per block, or a ToMe schedule (list, ``"tokens:N"``, ``"flops:X"``).
        merge_start: first block that merges (MLERP); the blocks before it prune. None = L // 2 + 1
            (the reference: blocks 7-11 of 12 merge).
        mlerp: ``"reference"`` (the code: divide the mean by the destination's norm) or ``"paper"``
            (divide by the mean's own norm: the merged token gets the largest norm of its group).
        trace_source: record which patches every token stands for (visualisation, unmerged features).
    """

    r: Union[float, Schedule] = 0.9125
    merge_start: Optional[int] = None
    mlerp: Literal["reference", "paper"] = "reference"
    trace_source: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "tofu_")
        if self.merge_start is not None and self.merge_start < 0:
            raise TokenTuneError(f"tofu_merge_start={self.merge_start} must be >= 0 (or none for L // 2 + 1)")


def mlerp(x: torch.Tensor, m: Matching, paper: bool = False) -> torch.Tensor:
    """ToFu's norm-preserving merge of a matching on ``x`` [B, N, C] (unweighted; see the module doc)."""
    B, N, C = x.shape
    rows = x.reshape(B * N, C)
    src = rows.index_select(0, m.src)
    dst_norm = rows.index_select(0, m.keep).norm(dim=-1)                     # |x_d| before the merge
    count = dst_norm.new_ones(dst_norm.shape).index_add_(0, m.dst_out, dst_norm.new_ones(m.src.shape))
    mean = merge(x, m, "sum").reshape(-1, C) / count[:, None]                 # mean(x_d, x_i...)
    top = dst_norm.scatter_reduce(0, m.dst_out, src.norm(dim=-1), "amax", include_self=True)
    scale = top / (mean.norm(dim=-1) if paper else dst_norm)
    changed = count > 1                                                      # untouched rows stay as they are
    out = torch.where(changed[:, None], mean * scale[:, None], rows.index_select(0, m.keep))
    return out.view(B, N - m.r, C)


class ToFuMerging(TokenMerging):
    """ToFu's step (a block's ``merge`` plug-in): ToMe's matching, then pruning or MLERP."""

    def __init__(self, r: int, prune: bool, paper: bool = False) -> None:
        super().__init__(r)
        self.prune, self.paper = bool(prune), bool(paper)

    def extra_repr(self) -> str:
        return f"r={self.r}, {'prune' if self.prune else 'mlerp'}"

    def combine(self, x: torch.Tensor, size: Optional[torch.Tensor], m: Matching):
        if size is not None:                       # sizes kept consistent when another part tracks them
            size = merge(size, m, "sum")
        if self.prune:
            B, N, C = x.shape
            return x.reshape(B * N, C).index_select(0, m.keep).view(B, N - m.r, C), size
        return mlerp(x, m, self.paper), size


def apply_tofu(model: nn.Module, cfg: ToFuConfig, ctx) -> ToFuConfig:
    blocks = adapted_blocks(model)
    schedule = resolve_rate(model, cfg.r, ctx.model_name, "tofu", count_prefix=True)
    start = len(blocks) // 2 + 1 if cfg.merge_start is None else cfg.merge_start
    for i, (block, r) in enumerate(zip(blocks, schedule)):
        block.merge = ToFuMerging(r, prune=i < start, paper=cfg.mlerp == "paper") if r > 0 else None
    model.tokentune.prop_attn = False
    model.tokentune.trace_source = cfg.trace_source
    model.tokentune.state["tofu"] = schedule
    return replace(cfg, r=list(schedule))


register_method(Method(
    "tofu", ToFuConfig, apply_tofu, order=20, reduces_tokens=True, training_free=True, rate_option="r",
    rate_profiles=PROFILES,
    summary="ToFu: prune in early blocks, norm-preserving merge (MLERP) in late ones (training-free, no parameters)"))
