"""Semantic segmentation on an adapted ViT (``task="segmentation"``, ``tokentune train --task segmentation``).

The model: any method's adapted ViT, four of its block outputs on the patch grid (merged tokens
unmerged), a multi-level neck and UperNet (:mod:`.head`); ``model(images)`` gives per-pixel
logits [B, K, H, W]. Training: per-pixel cross-entropy with the ignore index (255), through a
method's loss hook unchanged (DyT: ``CE + 2 rate + CE(complete) + KL(complete || dynamic)``, the
KL averaged over pixels). Data (:mod:`.data`): ADE20K's layout or image + mask folders, mmseg's
train/test transforms. Scores (:mod:`.evaluate`): mIoU, pixel accuracy, sliding-window or
whole-image inference. The model's input size is the training crop (``img_size=512`` as the
reference).

The reference setting (DyT, ADE20K): ViT-B/16 at 512, levels 3/5/7/11, UperNet with 768
channels, 160k iterations of batch 16, AdamW lr 1e-3, weight decay 0.05, poly decay after 1500
warm-up iterations, drop-path 0.1, slide inference (512, stride 341). Deviations: the auxiliary
FCN head is not built; the reference's relative position bias tables (``use_rel_pos_bias``, new
trainable tables in every block) are not added; the schedule is tokentune's (warm-up + cosine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.task import Task, register_task
from ...core.vit import input_size
from ...engine.config import TrainConfig
from ...engine.data import normalization_stats
from ...errors import TokenTuneError
from ...typecheck import check_fields
from .data import (
    IGNORE_INDEX,
    EvalTransform,
    SegmentationDataset,
    TrainTransform,
    _rescale_size,
    ade20k_dataset,
    check_pairs,
    mask_folder_dataset,
)
from .evaluate import MODES, evaluate_segmentation, infer, scores, windows_per_image
from .head import SegmentationHead, build_head

__all__ = ["SegmentationConfig", "SegmentationDataset", "SegmentationHead", "ade20k_dataset", "evaluate_segmentation",
           "infer", "load_data", "mask_folder_dataset", "scores", "set_transforms"]


@dataclass
class SegmentationConfig:
    """Semantic segmentation options (defaults: the DyT reference's ADE20K setting).

    Attributes:
        levels: the 4 blocks whose outputs feed the head (0-based); None: evenly spaced ending
            with the last block (ViT-B: 3,5,7,11 as the reference).
        channels: UperNet's channels (reference 768; mmseg's default 512).
        pool_scales: pyramid pooling scales.
        dropout: dropout before the classifier.
        scale: training and test images are rescaled to fit (long side, short side) keeping their
            aspect ratio (training: times a random ratio); None follows the data: mmseg's ADE20K
            setting (2048, 512) for ADE20K, the model's input size (S, S) for image + mask folders.
        ratio_range: the random ratio of the training rescale.
        cat_max_ratio: the training crop is redrawn (up to 10 times) while one class covers more
            than this share of it.
        flip: probability of a horizontal flip in training.
        photometric: random brightness, contrast, saturation and hue in training (mmseg's
            PhotoMetricDistortion).
        inference: ``slide`` (windows of the model's input size) or ``whole`` (the image resized
            to the input size).
        stride: window stride of slide inference (None: two thirds of the input size, 341 at 512).
    """

    levels: Optional[List[int]] = None
    channels: int = 768
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    scale: Optional[Tuple[int, int]] = None
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: bool = True
    inference: str = "slide"
    stride: Optional[int] = None

    def __post_init__(self) -> None:
        check_fields(self, "segmentation_")
        if self.channels < 1 or not self.pool_scales or min(self.pool_scales) < 1:
            raise TokenTuneError("segmentation_channels and segmentation_pool_scales must be positive")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.flip <= 1.0:
            raise TokenTuneError("segmentation_dropout must be in [0, 1) and segmentation_flip in [0, 1]")
        if (self.scale is not None and min(self.scale) < 1) or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise TokenTuneError(f"segmentation_scale {self.scale} and ratio_range {self.ratio_range} must be positive "
                                 "(ratio_range low <= high)")
        if self.inference not in MODES:
            raise TokenTuneError(f"segmentation_inference must be one of {', '.join(MODES)}, got {self.inference!r}")
        if self.stride is not None and self.stride < 1:
            raise TokenTuneError(f"segmentation_stride must be positive, got {self.stride}")


def apply_segmentation(model: nn.Module, cfg: SegmentationConfig, num_classes: int) -> SegmentationConfig:
    """Drop the timm classifier, add the neck + UperNet head as ``model.task_head``."""
    p = next(model.parameters())
    model.reset_classifier(0)
    model.task_head = build_head(model, num_classes, cfg.levels, cfg.channels, cfg.pool_scales,
                                 cfg.dropout).to(device=p.device, dtype=p.dtype)
    return cfg


class PixelCrossEntropy(nn.CrossEntropyLoss):
    """Per-pixel cross-entropy averaged over the pixels not ignored; a batch whose pixels are all
    ignored adds zero loss (and zero gradients), as mmseg's, where PyTorch's mean gives NaN (0 / 0)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index, reduction="sum",
                                label_smoothing=self.label_smoothing)
        return total / (target != self.ignore_index).sum().clamp(min=1)


def criterion(cfg: TrainConfig) -> nn.Module:
    """Per-pixel cross-entropy, the ignore index left out (mmseg's decode loss)."""
    return PixelCrossEntropy(ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing)


def load_data(*, data_root: Optional[str] = None, dataset: Optional[str] = None, image_folder: Optional[str] = None,
              train_split: Optional[str] = "training", test_split: str = "validation", num_classes: Optional[int] = None,
              skip_bad_images: bool = False, progress: Optional[bool] = None, options: Optional[dict] = None
              ) -> Tuple[Optional[SegmentationDataset], SegmentationDataset]:
    """(train, test) without transforms: ADE20K (``data_root``, ``dataset`` ``ade20k`` or None) or an
    image + mask folder (``image_folder`` with ``num_classes``); every pair checked (:func:`check_pairs`).
    ``train_split=None`` loads the test split only (train is None); ``options`` (the model's task
    options) are not needed here."""
    if image_folder is not None and (dataset is not None or data_root is not None):
        raise TokenTuneError("give either ADE20K (--data ROOT [--dataset ade20k]) or --image-folder DIR, not both")
    if image_folder is not None:
        train = mask_folder_dataset(image_folder, train_split, num_classes or 0) if train_split else None
        test = mask_folder_dataset(image_folder, test_split, num_classes or 0)
    elif data_root is None:
        raise TokenTuneError("no data: pass --data ADEChallengeData2016 (ADE20K) or --image-folder DIR "
                             "(DIR/<split>/images + DIR/<split>/masks)")
    elif dataset not in (None, "ade20k", "ade"):
        raise TokenTuneError(f"unknown segmentation dataset {dataset!r}; --dataset ade20k (ADE20K's layout) or "
                             "--image-folder DIR for any other data")
    else:
        train = ade20k_dataset(data_root, train_split) if train_split else None
        test = ade20k_dataset(data_root, test_split)
    check_pairs([ds for ds in (train, test) if ds is not None], skip_bad_images)
    return train, test


#: mmseg's ADE20K rescale (long side, short side)
ADE20K_SCALE = (2048, 512)


def _task_config(model: nn.Module) -> SegmentationConfig:
    return SegmentationConfig(**((model.tokentune.spec or {}).get("task_config") or {}))


def _crop(model: nn.Module) -> int:
    crop = input_size(model)
    if crop[0] != crop[1]:
        raise TokenTuneError(f"the segmentation crop is the model's input size, which must be square (got {crop})")
    return int(crop[0])


def data_scale(task_cfg: SegmentationConfig, dataset: Optional[SegmentationDataset], crop: int) -> Tuple[int, int]:
    """The rescale of ``dataset``: the configured one, else ADE20K's for ADE20K, else the model's input size."""
    if task_cfg.scale is not None:
        return tuple(task_cfg.scale)
    return ADE20K_SCALE if dataset is not None and dataset.kind == "ade20k" else (crop, crop)


def set_transforms(train: Optional[SegmentationDataset], test: Optional[SegmentationDataset], model: nn.Module,
                   cfg: TrainConfig) -> None:
    """mmseg's training transform (crop = the model's input size) and evaluation transform."""
    task_cfg = _task_config(model)
    mean, std = normalization_stats(cfg.normalization, model)
    crop = _crop(model)
    if train is not None:
        train.transform = TrainTransform(crop, data_scale(task_cfg, train, crop), task_cfg.ratio_range, mean, std,
                                         train.ignore_index, task_cfg.cat_max_ratio, task_cfg.flip, task_cfg.photometric)
    if test is not None:
        test.transform = EvalTransform(data_scale(task_cfg, test, crop), mean, std)


def describe(train: Optional[SegmentationDataset], test: Optional[SegmentationDataset], model: nn.Module,
             sample: int = 20) -> str:
    """One line: the rescale, the training crops and the test windows per image (of up to ``sample`` test images)."""
    from PIL import Image

    task_cfg, crop = _task_config(model), _crop(model)
    lines = []
    if train is not None:
        lo, hi = task_cfg.ratio_range
        scale = data_scale(task_cfg, train, crop)
        lines.append(f"training images rescaled to fit {scale[0]}x{scale[1]} (x{lo:g}-{hi:g}), {crop}x{crop} crops")
    if test is not None:
        scale = data_scale(task_cfg, test, crop)
        counts = []
        for image, _ in test.samples[:sample]:
            with Image.open(image) as im:
                w, h = _rescale_size(im.size[0], im.size[1], scale)
            counts.append(windows_per_image(h, w, crop, task_cfg.inference, task_cfg.stride))
        span = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        how = (f"{task_cfg.inference} windows of {crop}x{crop}, stride {task_cfg.stride or max(crop * 2 // 3, 1)}"
               if task_cfg.inference == "slide" else f"whole images resized to {crop}x{crop}")
        lines.append(f"test images rescaled to fit {scale[0]}x{scale[1]}, {how}: {span} window(s) per image"
                     + (f" (first {len(counts)} images)" if len(test.samples) > len(counts) else ""))
    return "segmentation: " + "; ".join(lines) + " (set --segmentation-scale to change)"


register_task(Task(
    "segmentation", SegmentationConfig, apply_segmentation, metric="miou", criterion=criterion,
    evaluate=evaluate_segmentation, load_data=load_data, set_transforms=set_transforms, describe=describe,
    summary="semantic segmentation: UperNet on 4 block outputs (merged tokens unmerged), mIoU"))
