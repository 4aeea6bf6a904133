"""The segmentation head on an adapted ViT: a multi-level neck on four block outputs and UperNet.

As in the DyT reference (dense_tasks/Segmentation, a BEiT-style setup run through mmseg):

* the patch tokens after four blocks (``out_indices``; ViT-B: blocks 3, 5, 7, 11 counting from 0),
  raw (no final norm), reshaped to the patch grid (stride 16 for /16 patches);
* the neck brings them to strides 4, 8, 16, 32: ``ConvT(2, 2) -> GELU -> ConvT(2, 2)``,
  ``ConvT(2, 2)``, identity, ``MaxPool(2, 2)`` (the reference's BatchNorm between the two
  transposed convolutions is commented out there; so it is here);
* UperNet (Xiao et al., ECCV 2018; mmseg's ``UPerHead``): a pyramid pooling module (scales 1, 2,
  3, 6) on the coarsest level, lateral 1x1 convolutions, a top-down path (bilinear upsampling,
  addition), 3x3 FPN convolutions, all levels upsampled to stride 4 and fused by a 3x3
  convolution, dropout 0.1, a 1x1 classifier; every convolution but the last is
  conv-BatchNorm-ReLU;
* the logits are upsampled (bilinear) to the input size: ``model(images)`` is [B, K, H, W].

Merged tokens (ToMe, PYRA) are unmerged to the grid first (:mod:`tokentune.core.features`); DyT
keeps every token. Deviation: the reference's auxiliary FCN head (on the third level, loss
weight 0.4, training only) is not built: training takes one logits tensor per forward. A training
batch of one image normalises the 1x1 pooling branch with the running statistics (:class:`BatchNorm2d`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.features import run_levels, to_grid
from ...core.state import TokenState
from ...core.task import TaskHead
from ...errors import TokenTuneError


def default_levels(depth: int) -> List[int]:
    """Four evenly spaced blocks ending with the last: ViT-B (12 blocks) -> [3, 5, 7, 11] as the reference."""
    if depth < 4:
        raise TokenTuneError(f"the segmentation head takes features of 4 blocks; the model has {depth}")
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises a training batch holding one value per channel (one image in the
    1x1 pyramid-pooling branch: ``--batch-size 1``, a last batch of one) with its running statistics
    and leaves them unchanged, where PyTorch's raises "Expected more than 1 value per channel";
    every other batch is PyTorch's BatchNorm unchanged (same parameters and buffers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1] and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """mmseg's ``ConvModule`` with BatchNorm and ReLU (no conv bias before a norm; kaiming init)."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, BatchNorm2d(cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MultiLevelNeck(nn.Module):
    """Four stride-16 maps -> strides 4, 8, 16, 32 (BEiT's and the DyT reference's fpn1..fpn4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, levels: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), levels)]


class UPerHead(nn.Module):
    """UperNet's decoder (pyramid pooling + FPN), as mmseg's ``UPerHead``."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        top = in_channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)          # mmseg's decode-head init
        nn.init.zeros_(self.conv_seg.bias)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(branch(x), x.shape[2:]) for branch in self.ppm]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)] + [self._psp(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):               # top-down path
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class SegmentationHead(TaskHead):
    """Neck + UperNet on four block outputs of the adapted ViT; per-pixel logits at the input size."""

    def __init__(self, dim: int, num_classes: int, levels: Sequence[int], channels: int = 768,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        if len(levels) != 4:
            raise TokenTuneError(f"segmentation_levels must name 4 blocks (strides 4, 8, 16, 32), got {list(levels)}")
        self.levels = [int(i) for i in levels]
        self.num_classes = int(num_classes)
        self.neck = MultiLevelNeck(dim)
        self.decoder = UPerHead([dim] * 4, channels, num_classes, pool_scales, dropout)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, num_classes={self.num_classes}"

    def forward(self, model: nn.Module, images: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        if images.dim() != 4:
            raise TokenTuneError(f"a segmentation model takes images [B, 3, H, W], got shape {tuple(images.shape)}")
        _, levels, state = run_levels(model, images, self.levels, stop_early=True, **options)
        p = model.num_prefix_tokens
        feats = to_grid(model, [y[:, p:] for y in levels], tuple(images.shape[-2:]))
        logits = self.decoder(self.neck(feats))
        return _resize(logits, images.shape[-2:]), state

    def example_input(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        size = model.patch_embed.img_size
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, 3, int(size[0]), int(size[1]), generator=g)


def build_head(model: nn.Module, num_classes: int, levels: Optional[Sequence[int]], channels: int,
               pool_scales: Sequence[int], dropout: float) -> SegmentationHead:
    depth = len(model.blocks)
    levels = list(levels) if levels else default_levels(depth)
    bad = [i for i in levels if not 0 <= int(i) < depth]
    if bad:
        raise TokenTuneError(f"segmentation_levels {levels} name blocks outside 0..{depth - 1} of this model")
    return SegmentationHead(int(model.embed_dim), num_classes, levels, channels, pool_scales, dropout)
