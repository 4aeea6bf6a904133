"""Augmentation for full-size datasets (``TrainConfig.augment``, ``mixup``, ``cutmix``) through timm.

The VTAB-1k protocol of the papers trains without augmentation (``augment="none"``: the plain
resize of :func:`tokentune.engine.data.build_transform`). DyT's "complete datasets" setting
(CIFAR-100, Food-101, Flowers, Pets, Cars, Aircraft, DTD, trained on their full training splits)
uses the DeiT-style recipe, which timm implements: ``augment="timm"`` gives the training split
``timm.data.create_transform(is_training=True, ...)`` (random-resized crop to the input size,
horizontal flip, RandAugment ``auto_augment``, random erasing ``reprob``; mean/std and filter as
the plain transform), the test split keeps the plain resize. ``mixup``/``cutmix`` mix each batch
with timm's ``Mixup`` (targets become soft; label smoothing moves into them).

timm's posterize keeps 0 bits at RandAugment's strongest magnitude (``inc1`` policies), which
Pillow ≥ 13 refuses ("bits must be between or equal to 1 and 8"); the transform built here gives
its posterize operations :func:`posterize`, which keeps older Pillow's result (a black image).


Random draws: the transforms use Python's ``random``, numpy's and torch's global generators, which
the training loader seeds for every sample from (seed, epoch, sample index)
(:mod:`tokentune.engine.seeding`), so the augmentation is the same with any worker count and after
a resume; ``Mixup`` uses numpy's global generator in the training process, whose state ``resume.pt``
keeps.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import TokenTuneError
from .config import TrainConfig
from .data import model_image_size, normalization_stats


def train_transform(model, cfg: TrainConfig) -> Optional[Callable]:
    """timm's training transform for ``augment="timm"`` (None for ``"none"``: keep the plain resize)."""
    if cfg.augment == "none":
        return None
    from timm.data import create_transform

    size = int(cfg.image_size) if cfg.image_size is not None else model_image_size(model)
    if size is None:
        raise TokenTuneError("cannot tell the input size for augmentation; set image_size")
    mean, std = normalization_stats(cfg.normalization, model)
    transform = create_transform(size, is_training=True,
                                 auto_augment=None if cfg.auto_augment == "none" else cfg.auto_augment,
                                 re_prob=cfg.reprob, interpolation=cfg.interpolation, mean=mean, std=std)
    for op in augment_ops(transform):
        if str(getattr(op, "name", "")).startswith("Posterize"):
            op.aug_fn = posterize
    return transform


def posterize(img, bits_to_keep, **_):
    """Keep the ``bits_to_keep`` most significant bits of each channel; 0 bits gives a black image, as
    Pillow < 13 did (Pillow 13's ``ImageOps.posterize`` accepts 1 to 8 only)."""
    from PIL import ImageOps

    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


def augment_ops(transform) -> list:
    """timm's augmentation operations (``AugmentOp``) inside a transform: RandAugment's, AutoAugment's
    and AugMix's, in torchvision ``Compose`` nesting."""
    found = []
    for t in getattr(transform, "transforms", [transform]):
        if t is not transform and hasattr(t, "transforms"):
            found += augment_ops(t)
        for ops in (getattr(t, "ops", None), *(getattr(t, "policy", None) or [])):
            found += [op for op in (ops or []) if hasattr(op, "aug_fn")]
    return found


def augment_training_split(train_data, model, cfg: TrainConfig, say=print) -> None:
    """Give ``train_data`` timm's training transform when ``cfg.augment == "timm"`` (called by
    :func:`tokentune.train`; the dataset needs a ``transform`` attribute, as tokentune's have)."""
    transform = train_transform(model, cfg)
    if transform is None:
        return
    if not hasattr(train_data, "transform"):
        raise TokenTuneError(f"augment='timm' sets the training split's transform, but a {type(train_data).__name__} "
                             "has none; apply timm.data.create_transform(is_training=True) in your dataset and keep "
                             "augment='none'")
    if getattr(train_data, "kind", None) == "vtab":
        say("note: augment='timm' on VTAB-1k departs from the papers' protocol (no augmentation)")
    train_data.transform = transform


def batch_mixer(cfg: TrainConfig, num_classes: int) -> Optional[Any]:
    """timm's ``Mixup`` for ``mixup``/``cutmix`` > 0 (None otherwise): ``images, targets = mixer(images, targets)``."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=int(num_classes))
