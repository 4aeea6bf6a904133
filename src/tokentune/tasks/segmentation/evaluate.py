"""Segmentation inference (sliding window or whole image) and scores (mIoU, pixel accuracy), as mmseg.

* ``slide``: windows of the model's input size every ``stride`` pixels (the last window of a row or
  column is moved back to end at the border), each window's logits added into the image's logit
  map and divided by the number of windows covering each pixel; windows of an image smaller than
  the model's input are padded (the padding's logits are dropped). The DyT reference: 512 x 512
  windows, stride 341.
* ``whole``: the image resized to the model's input size, its logits resized back.

Logits are upsampled (bilinear) to the mask's original size before the arg-max. Scores come from
one confusion matrix over the split (the ignore index left out): IoU of a class = TP / (TP + FP
+ FN); ``miou`` = mean over the classes that occur in the labels or predictions (mmseg's nanmean);
``pixel_acc`` = correct / labelled pixels (mmseg's aAcc); ``macc`` = mean per-class accuracy.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.vit import input_size
from ...engine import distributed as D
from ...engine.distributed import progress_enabled
from ...errors import TokenTuneError, error_line
from ...precision import amp_dtype, autocast

MODES = ("slide", "whole")


def _windows(height: int, width: int, crop: Tuple[int, int], stride: Tuple[int, int]):
    """mmseg's slide grid: (y0, x0, y1, x1) of every window."""
    rows = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride[0] + crop[0], height), min(c * stride[1] + crop[1], width)
            yield max(y1 - crop[0], 0), max(x1 - crop[1], 0), y1, x1


def windows_per_image(height: int, width: int, crop: int, mode: str = "slide", stride: Optional[int] = None) -> int:
    """How many forward passes :func:`infer` makes for an image of ``height`` x ``width``."""
    if mode == "whole":
        return 1
    step = stride or max(crop * 2 // 3, 1)
    return len(list(_windows(height, width, (crop, crop), (step, step))))


def infer(model: nn.Module, image: torch.Tensor, num_classes: int, mode: str = "slide",
          stride: Optional[int] = None, batch_size: int = 8) -> torch.Tensor:
    """Logits [1, K, h, w] of one image [1, 3, h, w] by sliding windows or as a whole."""
    if mode not in MODES:
        raise TokenTuneError(f"unknown segmentation inference mode {mode!r}; use slide or whole")
    crop = input_size(model)
    h, w = image.shape[-2:]
    if mode == "whole":
        logits = model(F.interpolate(image, size=crop, mode="bilinear", align_corners=False))
        return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    step = (stride, stride) if stride else (max(crop[0] * 2 // 3, 1), max(crop[1] * 2 // 3, 1))
    boxes = list(_windows(h, w, crop, step))
    total = image.new_zeros(1, num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        crops = [F.pad(image[..., y0:y1, x0:x1], (0, crop[1] - (x1 - x0), 0, crop[0] - (y1 - y0))) for y0, x0, y1, x1 in chunk]
        out = model(torch.cat(crops)).float()
        for (y0, x0, y1, x1), logits in zip(chunk, out):
            total[..., y0:y1, x0:x1] += logits[:, :y1 - y0, :x1 - x0]
            count[..., y0:y1, x0:x1] += 1
    return total / count


def scores(confusion: torch.Tensor) -> Dict[str, Any]:
    """mIoU, pixel accuracy, mean accuracy (%) and per-class IoU from a [K, K] (label, prediction) matrix."""
    confusion = confusion.double()
    tp = confusion.diag()
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - tp
    iou = tp / union                           # NaN for classes in neither labels nor predictions
    acc = tp / labelled
    total = float(labelled.sum())
    return {"miou": 100.0 * float(iou.nanmean()) if total else 0.0,
            "pixel_acc": 100.0 * float(tp.sum()) / total if total else 0.0,
            "macc": 100.0 * float(acc.nanmean()) if total else 0.0,
            "per_class_iou": [None if v != v else round(100.0 * float(v), 4) for v in iou.tolist()]}


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset, *, batch_size: int = 8, device=None, amp: str = "auto",
                          num_workers: int = 0, progress: Optional[bool] = None, desc: str = "eval",
                          mode: Optional[str] = None, stride: Optional[int] = None) -> Dict[str, Any]:
    """Scores of ``model`` on ``dataset`` (items ``(image tensor, mask)``, images of any size).

    ``mode``/``stride`` default to the model's ``segmentation_inference``/``segmentation_stride``.
    ``batch_size`` is the number of windows per forward. Under ``torchrun`` every process scores
    its shard and the confusion matrices are summed.

    Returns:
        ``{"miou", "pixel_acc", "macc" (all %), "per_class_iou", "loss" (mean cross-entropy over
        labelled pixels), "images", "pixels"}``.
    """
    from tqdm.auto import tqdm

    head = model.task_head
    cfg = (model.tokentune.spec or {}).get("task_config") or {}
    mode = mode or cfg.get("inference", "slide")
    stride = stride or cfg.get("stride")
    k, ignore = head.num_classes, int(getattr(dataset, "ignore_index", 255))
    dev = torch.device(device) if isinstance(device, str) else (device or next(model.parameters()).device)
    dtype = amp_dtype(amp, dev)
    inf = D.info()
    sampler = D.ShardSampler(len(dataset), inf.rank, inf.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers)
    confusion = torch.zeros(k, k, dtype=torch.float64)
    stats = torch.zeros(3, dtype=torch.float64)          # loss sum, labelled pixels, images
    was_training = model.training
    model.eval()
    try:
        for image, mask in tqdm(loader, desc=desc, leave=False, disable=not progress_enabled(progress), dynamic_ncols=True):
            image, mask = image.to(dev)[None], mask.to(dev).long()
            with autocast(dev, dtype):
                logits = infer(model, image, k, mode, stride, batch_size)
            logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
            valid = mask != ignore
            pred = logits.argmax(1)[0]
            confusion += torch.bincount(mask[valid] * k + pred[valid], minlength=k * k).view(k, k).double().cpu()
            stats[0] += float(F.cross_entropy(logits, mask[None], ignore_index=ignore, reduction="sum"))
            stats[1] += float(valid.sum())
            stats[2] += 1
    except TokenTuneError as exc:
        raise TokenTuneError(error_line(exc)) from None
    finally:
        model.train(was_training)
    if inf.enabled:
        confusion = D.all_reduce_sum(confusion.to(dev)).cpu()
        stats = D.all_reduce_sum(stats.to(dev)).cpu()
    if stats[2] == 0:
        raise TokenTuneError("the evaluation split is empty; check the test split")
    return dict(scores(confusion), loss=float(stats[0] / max(stats[1], 1)), images=int(stats[2]), pixels=int(stats[1]))
