"""Analytic FLOPs of a ViT under a merge schedule (what ``tome_r="flops:X"`` targets).

Convention: one multiply-add counts as **2 FLOPs** (as ``torch.utils.flop_counter`` and
fvcore-style "GFLOPs x 2"); only matrix products and convolutions are counted (LayerNorm,
softmax, GELU, residual adds are not), matching ``torch.utils.flop_counter``; the tests compare
this model with the counter on real forwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import timm
import torch
from torch import nn

from ...core.backbone import check_model_name
from ...core.vit import num_input_tokens, num_prefix
from ...errors import TokenTuneError


# ----------------------------------------------------------------------------- architecture / FLOPs
@dataclass(frozen=True)
class ViTDims:
    """What the analytic FLOPs model needs to know about a ViT.

    Attributes:
        dim: embedding dimension D.
        depth: number of blocks L.
        heads: attention heads.
        head_dim: dimension per head (ToMe's matching metric has this width).
        num_tokens: tokens entering the first block (patches + prefix tokens).
        num_prefix: prefix tokens (CLS, distillation, registers), never merged.
        attn_linear_macs: multiply-adds per token of the attention's Linear layers (qkv + proj).
        mlp_linear_macs: multiply-adds per token of the MLP's Linear layers.
        stem_flops: FLOPs of the patch embedding per image.
        head_flops: FLOPs of the classifier head(s) per image.
        metric_dim: width of the merge metric (0: ``head_dim``, ToMe's keys; DTEM's embedding).
        metric_macs: multiply-adds per token of a merge metric's own projection, in merging
            blocks only (0 for ToMe, whose keys come with attention; DTEM: ``dim x metric_dim``).
    """

    dim: int
    depth: int
    heads: int
    head_dim: int
    num_tokens: int
    num_prefix: int
    attn_linear_macs: int
    mlp_linear_macs: int
    stem_flops: int = 0
    head_flops: int = 0
    metric_dim: int = 0
    metric_macs: int = 0

    @classmethod
    def from_model(cls, model: nn.Module) -> "ViTDims":
        """Read the dimensions of a timm ViT (plain, adapted by tokentune, or deployed)."""
        blocks = list(model.blocks)
        if not blocks:
            raise TokenTuneError("the model has no blocks")
        blk = blocks[0]

        def linear_macs(module: nn.Module) -> int:
            return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        proj = model.patch_embed.proj
        grid = model.patch_embed.grid_size
        stem = 2 * proj.weight.numel() * int(grid[0]) * int(grid[1]) if isinstance(proj, nn.Conv2d) else 0
        head = 0
        for attr in ("head", "head_dist"):
            h = getattr(model, attr, None)
            if isinstance(h, nn.Linear):
                head += 2 * h.in_features * h.out_features
        return cls(dim=int(model.embed_dim), depth=len(blocks), heads=int(blk.attn.num_heads),
                   head_dim=int(blk.attn.head_dim), num_tokens=num_input_tokens(model),
                   num_prefix=num_prefix(model), attn_linear_macs=linear_macs(blk.attn),
                   mlp_linear_macs=linear_macs(blk.mlp), stem_flops=stem, head_flops=head)

    @classmethod
    def from_name(cls, name: str, **timm_kwargs) -> "ViTDims":
        """Dimensions of the timm model ``name`` (built on the meta device: no memory, no weights)."""
        check_model_name(name)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **timm_kwargs)
        return cls.from_model(model)


def token_counts(schedule: Sequence[int], num_tokens: int) -> List[int]:
    """Token count entering each block and after the last one."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


def block_flops(dims: ViTDims, tokens: int, r: int, modulator_flops: int = 0) -> int:
    """FLOPs of one block entering with ``tokens`` tokens and merging ``r`` of them.

    Attention on all tokens: Linear layers ``2 N macs``, ``QK^T`` and ``AV`` ``2 N^2 (H d)`` each;
    ToMe's matching ``A B^T`` on the head-averaged keys of the unprotected tokens (``2 |A| |B| d``); the modulator (PYRA:
    ``4 r D``); a metric projection of its own (DTEM: ``2 N metric_macs``); the MLP on the ``N - r`` remaining tokens.
    """
    n = tokens
    inner = dims.heads * dims.head_dim
    flops = 2 * n * dims.attn_linear_macs + 2 * (2 * n * n * inner)
    if r > 0:
        p = dims.num_prefix          # protected tokens take no part in the similarity matrix
        width = dims.metric_dim or dims.head_dim
        flops += 2 * ((n + 1) // 2 - (p + 1) // 2) * (n // 2 - p // 2) * width + modulator_flops
        flops += 2 * n * dims.metric_macs
    flops += 2 * (n - r) * dims.mlp_linear_macs
    return flops


def vit_flops(dims: ViTDims, schedule: Sequence[int] = (),
              modulator_flops: Optional[Callable[[int], int]] = None) -> int:
    """Forward FLOPs per image (2 per multiply-add) of a ViT merging ``schedule`` tokens per block.

    ``modulator_flops(r)`` adds the cost of a per-block token modulator (PYRA: ``4 r D``).
    """
    schedule = list(schedule) + [0] * (dims.depth - len(schedule))
    counts = token_counts(schedule, dims.num_tokens)
    total = dims.stem_flops + dims.head_flops
    for n, r in zip(counts, schedule):
        extra = modulator_flops(r) if (modulator_flops is not None and r > 0) else 0
        total += block_flops(dims, n, r, extra)
    return total


def flops_ratio(dims: ViTDims, schedule: Sequence[int],
                modulator_flops: Optional[Callable[[int], int]] = None) -> float:
    """Unmerged FLOPs / FLOPs with ``schedule`` (2.0 = half the compute)."""
    return vit_flops(dims) / vit_flops(dims, schedule, modulator_flops)
