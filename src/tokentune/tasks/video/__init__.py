"""Video recognition on an adapted ViT (``task="video"``, ``tokentune train --task video``).

A clip [B, T, 3, H, W] runs through any method's adapted ViT as a batch of B*T frames; DyT's
attentive pooling (a learnable query over all frame tokens) or mean pooling gives one vector per
clip for the classifier (:mod:`.head`). Training: cross-entropy on clip logits, through a
method's loss hook unchanged (DyT's rate loss then averages over every frame's tokens). Testing:
multi-view (``test_clips`` temporal x ``test_crops`` spatial), the views' logits averaged; top-1.
Data (:mod:`.data`): Kinetics/SSv2 list files or class folders, video files (PyAV) or frame
folders.

The reference setting (DyT, Kinetics-400): ViT-B/16 IN-21k at 224, 8 frames at sampling rate 16
(its dataset builder; the ``--sampling_rate 4`` default of main_video.py is not used by it), 3
temporal x 1 spatial test views, short-side jitter [1.0, 1.15] and flip in training; adapters with
bottleneck 64 and scale 0.1, 12 epochs (2 warm-up), AdamW, base lr 1e-3 x batch / 256, weight
decay 0.01, batch 16 x 8 GPUs, loss CE + 2 rate (no complete-model or distillation terms), head
trunc_normal(0.01). SSv2: segment sampling, 1 x 3 views, random resized crop (0.08, 1), no flip,
plus RandAugment, which is not implemented here (deviation). Inception mean/std (0.5) as
tokentune's ``auto`` gives for Google's ViTs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from torch import nn

from ...core.method import Recipe, register_recipe
from ...core.task import Task, register_task
from ...core.vit import input_size
from ...engine.config import TrainConfig
from ...engine.data import normalization_stats
from ...errors import TokenTuneError
from ...typecheck import check_fields
from .data import ClipTransform, VideoDataset, check_videos, folder_dataset, list_dataset, read_frames
from .head import POOLS, AttentivePooling, VideoHead

__all__ = ["AttentivePooling", "ClipTransform", "VideoConfig", "VideoDataset", "VideoHead", "folder_dataset",
           "list_dataset", "load_data", "read_frames", "set_transforms"]

RESIZES = ("short_side_jitter", "resized_crop")
DATASET_CLASSES = {"k400": 400, "kinetics400": 400, "kinetics": 400, "ssv2": 174, "something-something-v2": 174,
                   "sthv2": 174}


@dataclass
class VideoConfig:
    """Video recognition options (defaults: the DyT reference's Kinetics-400 setting).

    Attributes:
        pool: ``attentive`` (a learnable query cross-attending over all frame tokens, the reference)
            or ``mean`` (each frame pooled as the image model pools it, then averaged).
        frames: frames per clip.
        sampling_rate: frames between two sampled frames; 0 samples one frame per equal segment
            of the video (TSN, the reference's SSv2 setting).
        test_clips: temporal views per test video (clips spread evenly; 1 with sampling_rate 0).
        test_crops: spatial views per test clip: 1 (centre) or 3 (both ends and centre).
        train_resize: ``short_side_jitter`` (short side x a random factor in scale_range, random
            crop) or ``resized_crop`` (random area in scale_range, aspect 3/4..4/3).
        scale_range: the range of the training rescale (jitter factors, or crop areas).
        flip: probability of a horizontal flip of a training clip.
        short_clips: a video shorter than a clip's span: ``error`` (named, one line) or ``repeat``
            its last frame (the reference).
    """

    pool: str = "attentive"
    frames: int = 8
    sampling_rate: int = 16
    test_clips: int = 3
    test_crops: int = 1
    train_resize: str = "short_side_jitter"
    scale_range: Tuple[float, float] = (1.0, 1.15)
    flip: float = 0.5
    short_clips: str = "error"

    def __post_init__(self) -> None:
        check_fields(self, "video_")
        if self.pool not in POOLS:
            raise TokenTuneError(f"video_pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.frames < 1 or self.sampling_rate < 0 or self.test_clips < 1:
            raise TokenTuneError("video_frames and video_test_clips must be >= 1 and video_sampling_rate >= 0")
        if self.sampling_rate == 0 and self.test_clips != 1:
            raise TokenTuneError("segment sampling (video_sampling_rate 0) has one test clip; set video_test_clips 1")
        if self.test_crops not in (1, 3):
            raise TokenTuneError(f"video_test_crops must be 1 or 3, got {self.test_crops}")
        if self.train_resize not in RESIZES:
            raise TokenTuneError(f"video_train_resize must be one of {', '.join(RESIZES)}, got {self.train_resize!r}")
        low, high = self.scale_range
        if not 0 < low <= high or (self.train_resize == "resized_crop" and high > 1) or \
                (self.train_resize == "short_side_jitter" and low < 1):
            raise TokenTuneError(f"video_scale_range {self.scale_range} does not fit {self.train_resize} (jitter: "
                                 "1 <= low <= high; resized_crop: 0 < low <= high <= 1)")
        if not 0.0 <= self.flip <= 1.0:
            raise TokenTuneError(f"video_flip is a probability, got {self.flip}")
        if self.short_clips not in ("error", "repeat"):
            raise TokenTuneError(f"video_short_clips must be error or repeat, got {self.short_clips!r}")


def apply_video(model: nn.Module, cfg: VideoConfig, num_classes: int) -> VideoConfig:
    """Add the pooling head as ``model.task_head``; timm's classifier (``num_classes``) stays the classifier."""
    p = next(model.parameters())
    model.task_head = VideoHead(int(model.embed_dim), int(model.blocks[0].attn.num_heads), cfg.pool,
                                cfg.frames).to(device=p.device, dtype=p.dtype)
    return cfg


def _config(options: Optional[Dict[str, Any]]) -> VideoConfig:
    values = {k[len("video_"):] if k.startswith("video_") else k: v for k, v in (options or {}).items()
              if k.startswith("video_") or k in VideoConfig.__dataclass_fields__}
    return VideoConfig(**values)


def load_data(*, data_root: Optional[str] = None, dataset: Optional[str] = None, image_folder: Optional[str] = None,
              train_split: Optional[str] = "train", test_split: str = "val", num_classes: Optional[int] = None,
              skip_bad_images: bool = False, progress: Optional[bool] = None,
              options: Optional[Dict[str, Any]] = None) -> Tuple[Optional[VideoDataset], VideoDataset]:
    """(train, test) without transforms: list files under ``data_root`` (``dataset`` k400/ssv2 gives the
    class count) or class folders under ``image_folder``; every clip checked with the sampling of
    ``options`` (the ``video_*`` options). ``train_split=None`` loads the test split only."""
    cfg = _config(options)
    if image_folder is not None and data_root is not None:
        raise TokenTuneError("give either list files (--data ROOT) or class folders (--image-folder DIR), not both")
    if image_folder is not None:
        train = folder_dataset(image_folder, train_split) if train_split else None
        test = folder_dataset(image_folder, test_split, classes=train.classes if train else None)
    elif data_root is None:
        raise TokenTuneError("no data: pass --data ROOT (ROOT/train.txt, ROOT/val.txt: '<video> <label>' lines) or "
                             "--image-folder DIR (DIR/<split>/<class>/<clip>)")
    else:
        key = (dataset or "").lower().replace("_", "-")
        classes = num_classes or DATASET_CLASSES.get(key)
        if dataset and key not in DATASET_CLASSES and not num_classes:
            raise TokenTuneError(f"unknown video dataset {dataset!r}; k400 or ssv2, or pass --num-classes")
        train = list_dataset(data_root, train_split, classes, dataset) if train_split else None
        test = list_dataset(data_root, test_split, classes or (train.num_classes if train else None), dataset)
    for ds, clips in ((train, 0), (test, cfg.test_clips)):
        if ds is not None:
            ds.sampling(cfg.frames, cfg.sampling_rate, clips, cfg.short_clips)
    check_videos([ds for ds in (train, test) if ds is not None], skip_bad_images)
    return train, test


def set_transforms(train: Optional[VideoDataset], test: Optional[VideoDataset], model: nn.Module,
                   cfg: TrainConfig) -> None:
    """The model's sampling and clip transforms (input size = the model's, its mean/std)."""
    task_cfg = _config((model.tokentune.spec or {}).get("task_config"))
    mean, std = normalization_stats(cfg.normalization, model)
    h, w = input_size(model)
    if h != w:
        raise TokenTuneError(f"video clips are cropped square; build the model with a square img_size (got {h}x{w})")
    if train is not None:
        train.sampling(task_cfg.frames, task_cfg.sampling_rate, 0, task_cfg.short_clips)
        train.transform = ClipTransform(h, mean, std, True, task_cfg.train_resize, task_cfg.scale_range, task_cfg.flip)
    if test is not None:
        test.sampling(task_cfg.frames, task_cfg.sampling_rate, task_cfg.test_clips, task_cfg.short_clips)
        test.transform = ClipTransform(h, mean, std, False, crops=task_cfg.test_crops)


register_task(Task(
    "video", VideoConfig, apply_video, metric="top1", load_data=load_data, set_transforms=set_transforms,
    summary="video recognition: clips as batches of frames, attentive (DyT) or mean pooling, multi-view top-1"))

register_recipe(Recipe(
    "dyt-k400", "dyt",
    model_options={"task": "video", "dyt_bottleneck": 64, "dyt_adapter_scale": 0.1, "dyt_complete_weight": 0.0,
                   "dyt_distill_weight": 0.0, "head_init_std": 0.01},
    train_options={"epochs": 12, "warmup_epochs": 2, "batch_size": 16, "lr": 1e-3 * 128 / 256, "min_lr": 0.0,
                   "weight_decay": 0.01},
    summary="DyT on Kinetics-400 (video task: 8 frames at rate 16, 3x1 test views, attentive pooling)"))
