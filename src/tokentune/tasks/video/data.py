"""Video data: Kinetics / Something-Something list files, class-per-folder trees, video files or frame
folders, frame sampling and multi-view testing.

Layouts (``--data ROOT``)::

    <root>/train.txt   lines "<video or frame folder, relative to root> <label>"  (also .csv)
    <root>/val.txt     (or test.txt)

or (``--image-folder DIR``) ``DIR/<split>/<class>/<clip>``. A clip is a video file (decoded with
PyAV, the ``video`` extra: ``pip install 'tokentune[video]'``) or a folder of frame images (sorted
by name; no decoder needed).

Sampling (the DyT reference, after VideoMAE/EVL): ``frames`` frames ``sampling_rate`` apart; in
training from a random start, in testing ``test_clips`` starts spread evenly over the video
(one clip: the middle). ``sampling_rate=0`` samples by segments (TSN, the reference's SSv2): the
video is cut into ``frames`` equal segments, training takes a random frame of each, testing the
middle one. A video shorter than a clip's span is an error naming it (the reference repeats the
last frame instead: ``short_clips="repeat"``).

Transforms: training rescales the short side to the input size times a random factor in
``scale_range`` and takes a random crop (``train_resize="short_side_jitter"``, the reference's
Kinetics setting) or a random resized crop of area ``scale_range`` (``"resized_crop"``, its SSv2
setting), the same for every frame of the clip, then flips with ``flip`` probability; testing
rescales the short side to the input size (bicubic) and takes ``test_crops`` crops (1: centre,
3: both ends and the centre of the long side). Every clip is normalised with the model's mean/std.
Items: ``(clip [T, 3, H, W], label)``; with several test views ``(views [V, T, 3, H, W], label)``,
views ordered clip by clip, crops within.
"""
from __future__ import annotations

import math
import os
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...engine.data import IMAGE_EXTENSIONS, read_list_file
from ...engine.images import describe_location, load_image
from ...errors import TokenTuneError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
SPLIT_FILES = {"train800val200": ("train",), "train": ("train",), "test": ("test", "val"), "val": ("val",)}


def _av():
    try:
        import av
    except ImportError:
        raise TokenTuneError("decoding video files needs PyAV: pip install 'tokentune[video]' (or pip install av); "
                             "frame folders need no decoder") from None
    return av


def frame_files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def frame_count(path: str) -> int:
    """Frames of a video file or frame folder (a video whose header does not say is decoded to count)."""
    if os.path.isdir(path):
        return len(frame_files(path))
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise TokenTuneError("it has no video stream")
            stream = container.streams.video[0]
            return int(stream.frames) or sum(1 for _ in container.decode(stream))
    except TokenTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises its own error classes (FFmpeg's errors)
        raise TokenTuneError(" ".join(str(exc).split()) or type(exc).__name__) from None


def read_frames(path: str, indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` of a video file or frame folder as uint8 [len(indices), H, W, 3]."""
    wanted = sorted(set(int(i) for i in indices))
    if os.path.isdir(path):
        files = frame_files(path)
        frames = {i: np.asarray(load_image(files[i])) for i in wanted}
    else:
        av = _av()
        frames: Dict[int, np.ndarray] = {}
        try:
            with av.open(path) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        frames[i] = frame.to_ndarray(format="rgb24")
                    if i >= wanted[-1]:
                        break
        except Exception as exc:  # noqa: BLE001 - PyAV raises FFmpeg's errors
            raise TokenTuneError(f"cannot decode video {path}: {' '.join(str(exc).split())}; the file is corrupt, "
                                 "re-extract it or remove its line") from None
        if len(frames) < len(wanted):
            raise TokenTuneError(f"video {path} decodes to fewer frames than its header says (frame {wanted[-1]} "
                                 "is missing); the file is truncated, re-extract it or remove its line")
    shapes = {f.shape for f in frames.values()}
    if len(shapes) > 1:
        raise TokenTuneError(f"the frames of {path} differ in size ({sorted(shapes)}); every frame needs one size")
    return np.stack([frames[int(i)] for i in indices])


# ----------------------------------------------------------------------------- sampling
def clip_span(frames: int, rate: int) -> int:
    """Frames a clip covers: ``(frames - 1) * rate + 1`` (segment sampling: ``frames``)."""
    return (frames - 1) * rate + 1 if rate > 0 else frames


def random_indices(length: int, frames: int, rate: int, rng: random.Random) -> List[int]:
    """A random clip (the reference's ``_random_sample_frame_idx``; short videos repeat their last frame)."""
    if rate <= 0:                                     # TSN: a random frame of each segment
        seg = (length - 1) / frames
        return [rng.randint(round(seg * i), round(seg * (i + 1))) for i in range(frames)]
    if clip_span(frames, rate) >= length:
        return [min(i * rate, length - 1) for i in range(frames)]
    start = rng.randrange(length - rate * (frames - 1))
    return [start + i * rate for i in range(frames)]


def eval_indices(length: int, frames: int, rate: int, clips: int) -> List[List[int]]:
    """``clips`` clips spread evenly over the video (the reference's ``get_temporal_crops_index``)."""
    if rate <= 0:                                     # the middle frame of each segment
        seg = (length - 1) / frames
        return [[(round(seg * i) + round(seg * (i + 1))) // 2 for i in range(frames)]]
    slide = max(length - clip_span(frames, rate), 0)
    starts = [slide // 2] if clips == 1 else [round(slide / (clips - 1) * i) for i in range(clips)]
    return [[min(s + k * rate, length - 1) for k in range(frames)] for s in starts]


# ----------------------------------------------------------------------------- transforms
def _to_tensor(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised float [T, 3, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Rescale [T, 3, H, W] so that its short side is ``size`` (the reference's integer arithmetic)."""
    h, w = x.shape[-2:]
    return _resize(x, (size, w * size // h) if h <= w else (h * size // w, size))


class ClipTransform:
    """Training: random rescale + crop (or random resized crop), flip; testing: short side, crops."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                 resize: str = "short_side_jitter", scale_range: Tuple[float, float] = (1.0, 1.15),
                 flip: float = 0.5, crops: int = 1) -> None:
        self.size, self.mean, self.std, self.train = int(size), tuple(mean), tuple(std), train
        self.resize, self.scale_range, self.flip, self.crops = resize, tuple(scale_range), float(flip), int(crops)

    def __call__(self, frames: np.ndarray, rng: Optional[random.Random] = None) -> List[torch.Tensor]:
        x = _to_tensor(frames, self.mean, self.std)
        if not self.train:
            x = short_side(x, self.size)
            h, w = x.shape[-2:]
            if self.crops == 1:
                y0, x0 = (h - self.size) // 2, (w - self.size) // 2
                return [x[..., y0:y0 + self.size, x0:x0 + self.size]]
            margin = max(h, w) - self.size
            return [x[..., s:s + self.size, :] if h > w else x[..., :, s:s + self.size] for s in (0, margin // 2, margin)]
        rng = rng or random.Random()
        if self.resize == "short_side_jitter":
            x = short_side(x, round(self.size * rng.uniform(*self.scale_range)))
            h, w = x.shape[-2:]
            y0, x0 = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
            x = x[..., y0:y0 + self.size, x0:x0 + self.size]
        else:                                          # random resized crop (torchvision's rule, 10 tries)
            h, w = x.shape[-2:]
            box = (0, 0, h, w)
            for _ in range(10):
                area = h * w * rng.uniform(*self.scale_range)
                ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                ch, cw = int(round(math.sqrt(area / ratio))), int(round(math.sqrt(area * ratio)))
                if 0 < ch <= h and 0 < cw <= w:
                    y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
                    box = (y0, x0, ch, cw)
                    break
            x = _resize(x[..., box[0]:box[0] + box[2], box[1]:box[1] + box[3]], (self.size, self.size))
        if rng.random() < self.flip:
            x = x.flip(-1)
        return [x]


# ----------------------------------------------------------------------------- dataset
class VideoDataset(Dataset):
    """Clips and labels; items ``(clip [T, 3, H, W], label)`` or ``(views [V, T, 3, H, W], label)``.

    Attributes:
        samples: ``(video file or frame folder, label)`` pairs.
        origins: where each was listed (``file:line``) or its path.
        num_classes, classes, name, split, root, kind: as for image datasets (``kind``: ``list`` or ``folder``).
        frames, sampling_rate, clips: the sampling (``clips``: temporal test views; 0 = training).
        short_clips: ``error`` or ``repeat`` (the last frame) for videos shorter than a clip.
        transform: a :class:`ClipTransform` (None: raw uint8 frames).
        skipped: clips left out by :func:`check_videos` (``{"file", "origin", "reason"}``).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], origins: Sequence[str], num_classes: int, name: str,
                 split: str, root: str, kind: str, classes: Optional[Sequence[str]] = None) -> None:
        self.samples, self.origins = list(samples), list(origins)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes else [str(i) for i in range(self.num_classes)]
        self.name, self.split, self.root, self.kind = name, split, root, kind
        self.frames, self.sampling_rate, self.clips, self.short_clips = 8, 16, 0, "error"
        self.transform: Optional[Callable] = None
        self.skipped: List[Dict[str, str]] = []
        self.lengths: Dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def sampling(self, frames: int, rate: int, clips: int, short_clips: str) -> None:
        self.frames, self.sampling_rate, self.clips, self.short_clips = int(frames), int(rate), int(clips), short_clips

    def length(self, index: int) -> int:
        if index not in self.lengths:
            path = self.samples[index][0]
            try:
                self.lengths[index] = frame_count(path)
            except TokenTuneError as exc:
                raise TokenTuneError(f"cannot read video {describe_location(path, self.origins[index])}: {exc}; the "
                                     "file is missing or corrupt, re-extract it or remove its line") from None
        return self.lengths[index]

    def problem(self, index: int) -> Optional[str]:
        """Why clip ``index`` cannot be used (None if it can): missing, undecodable header, too short."""
        try:
            n = self.length(index)
        except TokenTuneError as exc:
            return str(exc)
        need = clip_span(self.frames, self.sampling_rate)
        if n < need and self.short_clips != "repeat":
            return (f"{describe_location(self.samples[index][0], self.origins[index])} has {n} frame(s) but a clip of "
                    f"{self.frames} frames at sampling rate {self.sampling_rate} spans {need}; lower --video-frames or "
                    "--video-sampling-rate, or pass --video-short-clips repeat (the reference repeats the last frame)")
        return None

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        problem = self.problem(index)
        if problem is not None:
            raise TokenTuneError(problem)
        n = self.length(index)
        # torch's RNG, which the training loader seeds per (seed, epoch, sample): engine.seeding
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,)).item()))
        if self.clips:
            clips = eval_indices(n, self.frames, self.sampling_rate, self.clips)
        else:
            clips = [random_indices(n, self.frames, self.sampling_rate, rng)]
        views = []
        for indices in clips:
            frames = read_frames(path, indices)
            views.extend(self.transform(frames, rng) if self.transform is not None else [torch.from_numpy(frames)])
        return (views[0] if len(views) == 1 else torch.stack(views)), label

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "kind": self.kind, "group": None, "split": self.split, "root": self.root,
                "num_classes": self.num_classes, "num_images": len(self), "skipped": list(self.skipped)}

    def leave_out(self, bad: Sequence[Tuple[int, str]]) -> None:
        drop = {i for i, _ in bad}
        self.skipped.extend({"file": self.samples[i][0], "origin": self.origins[i], "reason": r} for i, r in bad)
        keep = [i for i in range(len(self.samples)) if i not in drop]
        self.samples = [self.samples[i] for i in keep]
        self.origins = [self.origins[i] for i in keep]
        self.lengths = {new: self.lengths[old] for new, old in enumerate(keep) if old in self.lengths}


def list_dataset(root: str, split: str, num_classes: Optional[int] = None, name: Optional[str] = None) -> VideoDataset:
    """A split from ``<root>/<split>.txt`` (or ``.csv``): lines ``<path relative to root> <label>``."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise TokenTuneError(f"video data folder {root!r} does not exist; pass the folder holding train.txt and val.txt")
    for candidate in (split,) + SPLIT_FILES.get(split, ()):
        for ext in (".txt", ".csv"):
            list_file = os.path.join(root, candidate + ext)
            if os.path.isfile(list_file):
                samples, origins = read_list_file(list_file, root, num_classes, check_files=False)
                classes = num_classes or max(label for _, label in samples) + 1
                return VideoDataset(samples, origins, classes, name or os.path.basename(root), candidate, root, "list")
    raise TokenTuneError(f"no list file for split {split!r} in {root} (looked for "
                         f"{', '.join(c + '.txt' for c in (split,) + SPLIT_FILES.get(split, ()))}); each line is "
                         "'<video or frame folder> <label>'")


def folder_dataset(root: str, split: str, classes: Optional[Sequence[str]] = None) -> VideoDataset:
    """A split of ``<root>/<split>/<class>/<clip>`` (video files or frame folders)."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    split_dir = None
    for candidate in (split,) + SPLIT_FILES.get(split, ()):
        if os.path.isdir(os.path.join(root, candidate)):
            split_dir = os.path.join(root, candidate)
            break
    if split_dir is None:
        raise TokenTuneError(f"video folder {root} has no {split!r} split; expected {root}/train/<class>/<clip> and "
                             f"{root}/val/<class>/<clip> (a clip: a video file or a folder of frames)")
    found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    classes = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise TokenTuneError(f"{split_dir} has class folder(s) {', '.join(unknown[:5])} that the training split lacks")
    samples = []
    for c in found:
        folder = os.path.join(split_dir, c)
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if os.path.isdir(path) or entry.lower().endswith(VIDEO_EXTENSIONS):
                samples.append((path, classes.index(c)))
    if not samples:
        raise TokenTuneError(f"{split_dir} holds no clips (video files {'/'.join(VIDEO_EXTENSIONS)} or frame folders)")
    return VideoDataset(samples, [p for p, _ in samples], len(classes), os.path.basename(root), os.path.basename(split_dir),
                        root, "folder", classes)


def check_videos(datasets: Sequence[VideoDataset], skip_bad: bool = False) -> None:
    """Check every clip before training (it exists, its header decodes, it is long enough); fail in one
    line, or with ``skip_bad`` leave the bad ones out (recorded in ``skipped``)."""
    found = [(ds, [(i, r) for i in range(len(ds)) if (r := ds.problem(i)) is not None]) for ds in datasets]
    count = sum(len(bad) for _, bad in found)
    if not count:
        return
    if not skip_bad:
        first = next(bad[0][1] for _, bad in found if bad)
        raise TokenTuneError(f"{count} clip(s) cannot be used, e.g. {first}; fix or remove them, or pass "
                             "--skip-bad-images (Python: skip_bad_images=True) to leave them out")
    for ds, bad in found:
        if len(bad) == len(ds):
            raise TokenTuneError(f"none of the {len(ds)} clips of {ds.name} {ds.split} can be used, e.g. {bad[0][1]}")
        ds.leave_out(bad)
