"""Segmentation data: ADE20K's layout, a generic image + mask folder, and the standard transforms.

ADE20K (``ADEChallengeData2016``, as mmseg reads it)::

    <root>/images/training/ADE_train_00000001.jpg      <root>/annotations/training/ADE_train_00000001.png
    <root>/images/validation/...                        <root>/annotations/validation/...

150 classes; mask value 0 ("other") is ignored and 1..150 become 0..149 (mmseg's
``reduce_zero_label``). Generic folders (any other data)::

    <dir>/<split>/images/<name>.<jpg|png|...>            <dir>/<split>/masks/<name>.png

mask values are the class indices ``0..K-1`` (K = ``--num-classes``), 255 is ignored. Masks are
8- or 16-bit single-channel or palette PNGs (a palette image's indices are its labels).

Every pair is checked before training (both files exist, their headers decode, the modes are
supported, image and mask have the same size): a problem stops the run with one line naming the
pair, or with ``skip_bad_images`` the pair is left out and recorded. A mask label outside
``0..K-1`` other than the ignore index stops the run, naming the file, when the mask is read.

Transforms follow the DyT/BEiT ADE20K pipeline (mmseg): training: random rescale within
``scale`` x [0.5, 2.0] keeping the aspect ratio, a random ``crop_size`` crop in which no class
covers more than 75% (10 tries), horizontal flip (p = 0.5), photometric distortion, normalise,
pad to the crop (mask padding ignored); evaluation: rescale into ``scale`` keeping the aspect
ratio, normalise; the mask stays at its original size (scores are computed there).
"""
from __future__ import annotations

import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ...engine.images import describe_location, image_problem, load_image
from ...errors import TokenTuneError

ADE20K_CLASSES = 150
IGNORE_INDEX = 255
MASK_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I", "1")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# the training and test splits of the command line, in the folder names of ADE20K
ADE_SPLITS = {"train800val200": "training", "train": "training", "train800": "training",
              "test": "validation", "val": "validation", "val200": "validation"}


def read_mask(path: str, where: str = "") -> np.ndarray:
    """A label mask as an int64 array [H, W] (one clear error for an unreadable or unsupported file)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in MASK_MODES:
                raise TokenTuneError(f"mask mode {img.mode} is not a label image; save masks as single-channel "
                                     "(L, 16-bit) or palette PNGs holding class indices")
            return np.asarray(img, dtype=np.int64) if img.mode != "1" else np.asarray(img).astype(np.int64)
    except TokenTuneError as exc:
        raise TokenTuneError(f"cannot use mask {describe_location(path, where)}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
        raise TokenTuneError(f"cannot read mask {describe_location(path, where)}: {' '.join(str(exc).split())}; the file "
                             "is missing or corrupt, re-extract the dataset or remove the pair") from None


def pair_problem(image: str, mask: str) -> Optional[str]:
    """Why an (image, mask) pair cannot be used (None if it can), from the headers only."""
    from PIL import Image

    problem = image_problem(image)
    if problem is not None:
        return f"image {image}: {problem}"
    if not os.path.isfile(mask):
        return f"mask {mask} does not exist"
    try:
        with Image.open(mask) as m, Image.open(image) as im:
            if m.mode not in MASK_MODES:
                return f"mask {mask} has mode {m.mode}, not a label image (single-channel or palette PNG)"
            if m.size != im.size:
                return (f"image {image} is {im.size[0]}x{im.size[1]} but its mask {mask} is {m.size[0]}x{m.size[1]}; "
                        "a mask must have its image's size")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
        return f"mask {mask}: {' '.join(str(exc).split())}"
    return None


class SegmentationDataset(Dataset):
    """(image, mask) pairs with a joint transform; items are ``(image tensor, mask LongTensor)``.

    Attributes:
        samples: ``(image path, mask path)`` pairs.
        num_classes: K (labels ``0..K-1`` after ``reduce_zero_label``).
        ignore_index: the label that is ignored in losses and scores (255).
        reduce_zero_label: mask 0 is ignored and the other values shift down by one (ADE20K).
        name, split, root, kind: where it came from (``kind``: ``ade20k`` or ``folder``).
        transform: ``(PIL image, mask array) -> (tensor, LongTensor)``; None returns them as read.
        skipped: pairs left out by :func:`check_pairs` (``{"file", "origin", "reason"}``).
    """

    def __init__(self, samples: Sequence[Tuple[str, str]], num_classes: int, name: str, split: str, root: str,
                 kind: str, reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX, transform=None) -> None:
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.name, self.split, self.root, self.kind = name, split, root, kind
        self.transform = transform
        self.skipped: List[Dict[str, str]] = []
        self.classes = [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self, index: int) -> np.ndarray:
        """The mask of sample ``index`` as training labels (reduced, range-checked)."""
        path = self.samples[index][1]
        mask = read_mask(path)
        if self.reduce_zero_label:                     # mmseg: 0 -> ignored, k -> k - 1, ignored stays ignored
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
            mask[mask == self.ignore_index - 1] = self.ignore_index
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            value = int(mask[bad][0]) + (1 if self.reduce_zero_label else 0)
            valid = f"1..{self.num_classes}, 0" if self.reduce_zero_label else f"0..{self.num_classes - 1}, {self.ignore_index}"
            raise TokenTuneError(f"mask {path} holds label {value}, outside the {self.num_classes} classes ({valid} "
                                 "ignored); give the right --num-classes or fix the mask")
        return mask

    def __getitem__(self, index: int):
        image_path, _ = self.samples[index]
        image = load_image(image_path)
        mask = self.labels(index)
        if (mask.shape[1], mask.shape[0]) != image.size:
            raise TokenTuneError(f"image {image_path} is {image.size[0]}x{image.size[1]} but its mask "
                                 f"{self.samples[index][1]} is {mask.shape[1]}x{mask.shape[0]}; a mask must have its "
                                 "image's size")
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "kind": self.kind, "group": None, "split": self.split, "root": self.root,
                "num_classes": self.num_classes, "num_images": len(self), "skipped": list(self.skipped)}

    def leave_out(self, bad: Sequence[Tuple[int, str]]) -> None:
        drop = {i for i, _ in bad}
        self.skipped.extend({"file": self.samples[i][0], "origin": self.samples[i][1], "reason": r} for i, r in bad)
        self.samples = [s for i, s in enumerate(self.samples) if i not in drop]


# ----------------------------------------------------------------------------- layouts
def _files(directory: str) -> Dict[str, str]:
    """{stem: path} of the image files directly in ``directory``."""
    return {os.path.splitext(f)[0]: os.path.join(directory, f) for f in sorted(os.listdir(directory))
            if f.lower().endswith(IMAGE_EXTENSIONS)}


def _pairs(image_dir: str, mask_dir: str) -> List[Tuple[str, str]]:
    for d in (image_dir, mask_dir):
        if not os.path.isdir(d):
            raise TokenTuneError(f"segmentation folder {d} does not exist; expected images and masks as "
                                 f"{image_dir}/<name>.jpg with {mask_dir}/<name>.png")
    images, masks = _files(image_dir), _files(mask_dir)
    missing = sorted(set(images) - set(masks))
    if missing:
        raise TokenTuneError(f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir}, e.g. "
                             f"{images[missing[0]]}; every image needs <name>.png beside it in the masks folder")
    if not images:
        raise TokenTuneError(f"{image_dir} holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
    return [(images[k], masks[k]) for k in sorted(images)]


def ade20k_dataset(root: str, split: str = "training") -> SegmentationDataset:
    """An ADE20K split (``training``/``validation``; the command line's train/test names map to them)."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    folder = ADE_SPLITS.get(split, split)
    if not os.path.isdir(os.path.join(root, "images")):
        raise TokenTuneError(f"{root} is not ADE20K's layout (no images/ folder); pass ADEChallengeData2016/, which "
                             "holds images/training, images/validation, annotations/training, annotations/validation")
    pairs = _pairs(os.path.join(root, "images", folder), os.path.join(root, "annotations", folder))
    return SegmentationDataset(pairs, ADE20K_CLASSES, "ade20k", folder, root, "ade20k", reduce_zero_label=True)


def mask_folder_dataset(root: str, split: str, num_classes: int) -> SegmentationDataset:
    """A split of the generic layout ``<root>/<split>/images`` + ``<root>/<split>/masks``."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not num_classes or num_classes < 1:
        raise TokenTuneError("a segmentation folder needs its class count: pass --num-classes K (mask values 0..K-1)")
    for candidate in (split,) + {"train800val200": ("train",), "test": ("val", "validation")}.get(split, ()):
        if os.path.isdir(os.path.join(root, candidate)):
            split = candidate
            break
    pairs = _pairs(os.path.join(root, split, "images"), os.path.join(root, split, "masks"))
    return SegmentationDataset(pairs, num_classes, os.path.basename(os.path.normpath(root)), split, root, "folder")


def check_pairs(datasets: Sequence[SegmentationDataset], skip_bad: bool = False) -> None:
    """Check every pair's headers before any training (see :func:`pair_problem`); fail in one line,
    or with ``skip_bad`` leave the bad pairs out (recorded in ``skipped``)."""
    found = [(ds, [(i, r) for i, (im, m) in enumerate(ds.samples) if (r := pair_problem(im, m)) is not None])
             for ds in datasets]
    count = sum(len(bad) for _, bad in found)
    if not count:
        return
    if not skip_bad:
        ds, bad = next((ds, bad) for ds, bad in found if bad)
        raise TokenTuneError(f"{count} image/mask pair(s) cannot be used, e.g. {bad[0][1]}; fix or remove them, or pass "
                             "--skip-bad-images (Python: skip_bad_images=True) to leave them out")
    for ds, bad in found:
        if len(bad) == len(ds):
            raise TokenTuneError(f"none of the {len(ds)} pairs of {ds.name} {ds.split} can be used, e.g. {bad[0][1]}")
        ds.leave_out(bad)


# ----------------------------------------------------------------------------- transforms
def _rescale_size(w: int, h: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale), short side <= min(scale)."""
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def _normalize(image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def photometric_distortion(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an RGB uint8 array: brightness +-32, contrast x[0.5, 1.5]
    (before or after the colour steps), saturation x[0.5, 1.5], hue +-18 degrees, each with p = 0.5.

    Saturation and hue are applied in HSV with PIL (mmseg uses OpenCV's HSV; the conversions differ
    in rounding only).
    """
    from PIL import Image

    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    x = np.clip(x, 0, 255)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = np.asarray(Image.fromarray(x.astype(np.uint8)).convert("HSV"), dtype=np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.randint(-18, 18) * 256.0 / 360.0) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    if not contrast_first and rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    return np.clip(x, 0, 255).astype(np.uint8)


class TrainTransform:
    """Random rescale, class-balanced random crop, flip, photometric distortion, normalise, pad."""

    def __init__(self, crop_size: int, scale: Tuple[int, int], ratio_range: Tuple[float, float],
                 mean: Sequence[float], std: Sequence[float], ignore_index: int = IGNORE_INDEX,
                 cat_max_ratio: float = 0.75, flip: float = 0.5, photometric: bool = True) -> None:
        self.crop, self.scale, self.ratio_range = int(crop_size), tuple(scale), tuple(ratio_range)
        self.mean, self.std, self.ignore = tuple(mean), tuple(std), int(ignore_index)
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric

    def _crop_box(self, mask: np.ndarray, rng: random.Random) -> Tuple[int, int, int, int]:
        h, w = mask.shape
        box = (0, 0, min(h, self.crop), min(w, self.crop))
        for _ in range(10):       # mmseg's RandomCrop: retry while one class covers more than cat_max_ratio
            y = rng.randint(0, max(h - self.crop, 0))
            x = rng.randint(0, max(w - self.crop, 0))
            box = (y, x, min(y + self.crop, h), min(x + self.crop, w))
            labels, counts = np.unique(mask[box[0]:box[2], box[1]:box[3]], return_counts=True)
            counts = counts[labels != self.ignore]
            if self.cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio):
                break
        return box

    def __call__(self, image, mask: np.ndarray):
        from PIL import Image

        # torch's RNG, which the training loader seeds per (seed, epoch, sample): engine.seeding
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,)).item()))
        ratio = rng.uniform(*self.ratio_range)
        size = _rescale_size(image.size[0], image.size[1], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image = image.resize(size, Image.BILINEAR)
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST), dtype=np.int64)
        y0, x0, y1, x1 = self._crop_box(mask, rng)
        pixels = np.asarray(image)[y0:y1, x0:x1]
        mask = mask[y0:y1, x0:x1]
        if rng.random() < self.flip:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
        x = _normalize(pixels, self.mean, self.std)
        target = torch.from_numpy(np.ascontiguousarray(mask))
        pad_h, pad_w = self.crop - x.shape[1], self.crop - x.shape[2]
        if pad_h > 0 or pad_w > 0:       # image padded with 0, mask with the ignore index
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            target = torch.nn.functional.pad(target, (0, pad_w, 0, pad_h), value=self.ignore)
        return x, target


class EvalTransform:
    """Rescale into ``scale`` keeping the aspect ratio, normalise; the mask stays at its size."""

    def __init__(self, scale: Tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale, self.mean, self.std = tuple(scale), tuple(mean), tuple(std)

    def __call__(self, image, mask: np.ndarray):
        from PIL import Image

        size = _rescale_size(image.size[0], image.size[1], self.scale)
        return _normalize(image.resize(size, Image.BILINEAR), self.mean, self.std), torch.from_numpy(mask)
