"""PiToMe: spectrum-preserving token merging with an energy score (Tran et al., NeurIPS 2024, arXiv 2405.16148).

Reimplemented from the paper and the behaviour of its official code (hchautran/PiToMe @ 550b5dee,
``algo/pitome/merge.py`` and ``algo/pitome/patch/{deit,timm}.py``, CC BY-NC 4.0: read, no code of it
is used). In every block, between attention and MLP (where ToMe merges), on the keys averaged over
heads of the ``T`` non-prefix tokens (``k̄``, as ToMe's metric)::

    W_ij = cos(k̄_i, k̄_j)                                          token graph (cosine similarity)
    E_i  = 1/T sum_j f_m(W_ij),  f_m(w) = w - m if w >= m else alpha (exp(w - m) - 1)
                                                                  energy score (paper Eq. 4: ELU-shaped,
                                                                  the token itself included, j = i)
    m_l  = margin - margin * l / L                                 margin of block l of L (0.75 -> 0)
    order = argsort(E, descending)                                 high energy = in a large cluster

* the first ``ceil(L / 2)`` blocks (the reference's ``use_bsm_pitome``): the tokens alternate in energy
  order into A (ranks 0, 2, 4, ...) and B (ranks 1, 3, ...); each A token finds its most similar B
  token and the ``r`` A tokens with the highest similarity merge into theirs (ToMe's bipartite step
  on an energy-ordered split). Output: prefix, the kept A tokens in descending-similarity order (not
  re-sorted, as the reference), then B in energy order;
* the other blocks (full PiToMe): the ``2r`` highest-energy tokens are the merge candidates, split
  alternately into A and B (``r`` each); every A token merges into its most similar B token; the
  ``T - 2r`` low-energy tokens are protected. Output: prefix, the protected tokens in energy order,
  then B in energy order.

Merging is the size-weighted average (``merge_wavg``) with sizes carried from block to block; the sizes
do not reach attention: the reference never passes them to its attention (no proportional attention,
``prop_attn=False``). The rate is the reference's keep ratio per block: a block with ``T`` non-prefix
tokens merges ``floor(T - T * ratio)`` (``pitome_r=0.9``), or, as ToMe's, an int / per-layer list /
``"tokens:N"`` / ``"flops:X"`` schedule, resolved for the build's input size (static shapes).

Deviations from the reference (see docs/baselines.md): every prefix token (CLS, registers,
distillation token, VPT prompts) is protected, not only CLS; LayerScale (``ls1``/``ls2``) of timm
blocks is applied (the reference's block drops it; ViT-B/16 has none); the keep ratio is turned into
per-block counts at build time (the reference recomputes them from each forward's token count: the
same at the build's image size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.method import Method, register_method
from ..core.vit import adapted_blocks
from ..errors import TokenTuneError
from ..typecheck import check_fields
from .tome.matching import Matching
from .tome.method import TokenMerging, resolve_rate
from .tome.schedules import PROFILES, Schedule


@dataclass
class PiToMeConfig:
    """PiToMe options (defaults: the official code's).

    Attributes:
        r: how much each block merges: a float is the keep ratio per block (the reference's ``ratio``;
            a block with T non-prefix tokens merges floor(T - T * ratio); the reference's
            ``main_ic.py`` default 0.9125), an int the tokens merged per block, or a ToMe schedule
            (per-layer list, ``"tokens:N"``, ``"flops:X"``).
        margin: energy margin of the first block; block l of L uses margin - margin * l / L (0.75).
        alpha: the ELU's alpha in the energy score (1.0).
        bsm_blocks: the first blocks that split A/B alternately over all tokens in energy order
            (PiToMe's bipartite variant); None = ceil(L / 2), the reference's.
        prop_attn: add log(size) to the attention logits (the reference: off).
        trace_source: record which patches every token stands for (visualisation, unmerged features).
        pool_by_size: with an average-pool head, weight every token by the patches it stands for.
    """

    r: Union[float, Schedule] = 0.9125
    margin: float = 0.75
    alpha: float = 1.0
    bsm_blocks: Optional[int] = None
    prop_attn: bool = False
    trace_source: bool = False
    pool_by_size: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "pitome_")
        if not 0.0 <= self.margin < 1.0:
            raise TokenTuneError(f"pitome_margin={self.margin} is outside [0, 1); the energy margin is a cosine "
                                 "similarity threshold (reference 0.75)")
        if not self.alpha > 0.0:
            raise TokenTuneError(f"pitome_alpha={self.alpha} must be > 0 (the ELU's alpha, reference 1.0)")
        if self.bsm_blocks is not None and self.bsm_blocks < 0:
            raise TokenTuneError(f"pitome_bsm_blocks={self.bsm_blocks} must be >= 0 (or none for half the blocks)")


# ----------------------------------------------------------------------------- the algorithm
def energy_order(metric: torch.Tensor, margin: float, alpha: float):
    """Cosine similarities ``W`` [B, T, T] of ``metric`` [B, T, C] and the tokens in descending energy [B, T]."""
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    # E_i, Eq. 4 (self-similarity included): the mean of ELU(W_ij - m), split into its two branches,
    # max(d, 0) + alpha (exp(min(d, 0)) - 1) with d = W_ij - m. The same values to float rounding;
    # on the CPU ``F.elu`` over the [B, T, T] graph took 2-4x as long as these passes together, and
    # it was PiToMe's largest cost beyond ToMe's (7.6% of a DeiT-T forward at batch 16).
    d = sim - margin
    energy = d.clamp_min(0).mean(dim=-1) + alpha * (d.clamp_max_(0).exp_().mean(dim=-1) - 1)
    return sim, energy.argsort(dim=-1, descending=True)


def _pair_scores(sim: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W[a_i, b_j]`` [B, |a|, |b|]."""
    B, T, _ = sim.shape
    cols = sim.gather(2, b.unsqueeze(1).expand(B, T, b.shape[1]))
    return cols.gather(1, a.unsqueeze(2).expand(B, a.shape[1], b.shape[1]))


def pitome_matching(metric: torch.Tensor, r: int, num_prefix: int, margin: float, alpha: float = 1.0,
                    bipartite: bool = False) -> Matching:
    """PiToMe's matching of ``r`` tokens on ``metric`` [B, N, C] (prefix tokens protected), as a
    :class:`~tokentune.methods.tome.matching.Matching` (flat rows; ToMe's merge helpers apply it)."""
    B, N, _ = metric.shape
    p, T = num_prefix, N - num_prefix
    if not 0 < r <= T // 2:
        raise ValueError(f"cannot merge r={r} of {T} tokens")
    with torch.no_grad():
        sim, order = energy_order(metric[:, p:], margin, alpha)
        if bipartite:                                                  # A/B alternate over every token
            a, b = order[:, 0::2], order[:, 1::2]
            node_max, node_idx = _pair_scores(sim, a, b).max(dim=-1)
            edge = node_max.argsort(dim=-1, descending=True)
            src, dst_j = a.gather(1, edge[:, :r]), node_idx.gather(1, edge[:, :r])
            kept = a.gather(1, edge[:, r:])                            # descending similarity, not re-sorted
        else:                                                          # the 2r high-energy tokens merge
            a, b = order[:, 0:2 * r:2], order[:, 1:2 * r:2]
            dst_j = _pair_scores(sim, a, b).max(dim=-1)[1]
            src, kept = a, order[:, 2 * r:]                            # low energy: protected
        n_out = N - r
        offset = torch.arange(B, device=metric.device)[:, None]
        prefix = torch.arange(p, device=metric.device).expand(B, p)
        keep = torch.cat([prefix, kept + p, b + p], dim=1) + offset * N
        dst = b.gather(1, dst_j) + p + offset * N
        dst_out = dst_j + (p + kept.shape[1]) + offset * n_out
    return Matching(keep=keep.flatten(), src=(src + p + offset * N).flatten(), dst=dst.flatten(),
                    dst_out=dst_out.flatten(), batch=B, num_tokens=N, r=r)


class PiToMeMerging(TokenMerging):
    """PiToMe's merge step (a block's ``merge`` plug-in): ToMe's merge module with PiToMe's matching."""

    def __init__(self, r: int, margin: float, alpha: float = 1.0, bipartite: bool = False) -> None:
        super().__init__(r)
        self.margin, self.alpha, self.bipartite = float(margin), float(alpha), bool(bipartite)

    def extra_repr(self) -> str:
        return f"r={self.r}, margin={self.margin:.4g}, alpha={self.alpha:g}, bipartite={self.bipartite}"

    def match(self, keys: torch.Tensor, r: int, num_prefix: int) -> Matching:
        return pitome_matching(keys, r, num_prefix, self.margin, self.alpha, self.bipartite)


def apply_pitome(model: nn.Module, cfg: PiToMeConfig, ctx) -> PiToMeConfig:
    blocks = adapted_blocks(model)
    schedule = resolve_rate(model, cfg.r, ctx.model_name, "pitome")
    depth = len(blocks)
    bsm = math.ceil(depth * 0.5) if cfg.bsm_blocks is None else cfg.bsm_blocks
    for i, (block, r) in enumerate(zip(blocks, schedule)):
        margin = cfg.margin - cfg.margin * (i / depth)                  # m_l = 0.75 - 0.75 l / L
        block.merge = PiToMeMerging(r, margin, cfg.alpha, bipartite=i < bsm) if r > 0 else None
    model.tokentune.prop_attn = cfg.prop_attn
    model.tokentune.trace_source = cfg.trace_source
    model.tokentune.pool_by_size = cfg.pool_by_size
    model.tokentune.state["pitome"] = schedule
    return replace(cfg, r=list(schedule))


register_method(Method(
    "pitome", PiToMeConfig, apply_pitome, order=20, reduces_tokens=True, training_free=True, rate_option="r",
    rate_profiles=PROFILES,
    summary="PiToMe: energy-protected token merging between attention and MLP (training-free, no parameters)"))
