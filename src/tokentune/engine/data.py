"""Datasets: VTAB-1k prepared folders, class-per-folder image trees, and the standard transforms.

VTAB-1k (the layout every PEFT paper uses)::

    <root>/<name>/images/<split>/000123.jpg
    <root>/<name>/<split>.txt          lines "images/<split>/000123.jpg <label>"

with the splits ``train800``, ``val200``, ``train800val200`` (train on this) and ``test`` (report
top-1 on this). :data:`VTAB_TASKS` lists the 19 tasks, their class counts and VTAB groups.

Image folders (torchvision ``ImageFolder`` style)::

    <dir>/train/<class>/*.jpg      <dir>/test/<class>/*.jpg     (or val/)

Classes are the sorted sub-folder names of the training split; the test split uses the same
class indices.

Transforms follow the references: resize to the model's input size with bicubic interpolation
(no crop, no augmentation), then normalise with the mean/std the pretrained weights expect.

Images of any common PIL mode are read as 8-bit RGB with their values kept (16-bit, float,
palette, alpha, CMYK, EXIF orientation: see :func:`to_rgb`); other modes are refused.

Every problem with the data is one :class:`TokenTuneError` line naming the file (and line) and
the fix. List files are validated when a dataset is built; :func:`load_datasets` (and so
:func:`build_datasets` and ``tokentune train``) then checks every image of both splits cheaply
(:func:`check_images`: exists, header decodes, mode supported) and fails, or with
``skip_bad_images`` leaves the bad ones out and records them. Pixels are decoded lazily; an image
damaged beyond its header names its file when it is read.

List files are read as UTF-8; a byte-order mark at the start is ignored.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from ..core.vit import input_size
from ..errors import TokenTuneError
from .config import TrainConfig
from .distributed import progress_enabled
from .images import describe_location, image_problem, load_image, to_rgb  # noqa: F401 - re-exported

VTAB_GROUPS = ("Natural", "Specialized", "Structured")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
NORMALIZATIONS = ("auto", "imagenet", "inception")
#: :func:`check_images` shows a progress bar for splits with more images than this
PROGRESS_MIN_IMAGES = 2000


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: folder name, class count, group and accepted aliases."""

    name: str
    num_classes: int
    group: Optional[str]
    aliases: Tuple[str, ...] = ()


_TASKS = [
    VTABTask("cifar", 100, "Natural", ("cifar100", "cifar_100")),
    VTABTask("caltech101", 102, "Natural"),
    VTABTask("dtd", 47, "Natural"),
    VTABTask("oxford_flowers102", 102, "Natural", ("flowers102",)),
    VTABTask("oxford_iiit_pet", 37, "Natural", ("oxford_pet", "pets")),
    VTABTask("svhn", 10, "Natural"),
    VTABTask("sun397", 397, "Natural"),
    VTABTask("patch_camelyon", 2, "Specialized", ("camelyon", "pcam")),
    VTABTask("eurosat", 10, "Specialized"),
    VTABTask("resisc45", 45, "Specialized"),
    VTABTask("diabetic_retinopathy", 5, "Specialized", ("retinopathy",)),
    VTABTask("clevr_count", 8, "Structured"),
    VTABTask("clevr_dist", 6, "Structured", ("clevr_distance",)),
    VTABTask("dmlab", 6, "Structured"),
    VTABTask("kitti", 4, "Structured", ("kitti_dist",)),
    VTABTask("dsprites_loc", 16, "Structured", ("dsprites_location",)),
    VTABTask("dsprites_ori", 16, "Structured", ("dsprites_orientation",)),
    VTABTask("smallnorb_azi", 18, "Structured", ("smallnorb_azimuth",)),
    VTABTask("smallnorb_ele", 9, "Structured", ("smallnorb_elevation",)),
]
#: canonical name -> task, in the order of the papers' tables
VTAB_TASKS: Dict[str, VTABTask] = {t.name: t for t in _TASKS}
_ALIASES = {alias: t.name for t in _TASKS for alias in (t.name,) + t.aliases}


def vtab_task(name: str) -> VTABTask:
    """The VTAB-1k task called ``name`` (aliases, case and ``-`` vs ``_`` accepted)."""
    key = str(name).strip().lower().replace("-", "_")
    if key in _ALIASES:
        return VTAB_TASKS[_ALIASES[key]]
    close = difflib.get_close_matches(key, list(_ALIASES), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(dict.fromkeys(_ALIASES[c] for c in close))}? " if close else ""
    raise TokenTuneError(f"unknown VTAB-1k dataset {name!r}; {hint}choose from {', '.join(VTAB_TASKS)} "
                         "(or a folder <root>/<name> of your own in their layout, <name>/<split>.txt + <name>/images/, "
                         "or any class-per-folder tree with --image-folder)")


class ImageDataset(Dataset):
    """A list of (image file, label) pairs with a transform; the base of both dataset kinds.

    Attributes:
        samples: ``(path, label)`` pairs.
        origins: for each sample, where it came from (``file:line`` of a list file, or the path).
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        classes: class names (folder names, or ``"0" .. "K-1"`` for list files).
        name: dataset name (VTAB task name, or the folder name).
        group: VTAB group, or None.
        split: split name.
        root: the VTAB-1k root or the image folder.
        kind: ``vtab`` or ``folder`` (how to open it again).
        transform: PIL image -> tensor (see :func:`build_transform`); None returns PIL images.
        skipped: images left out by :func:`check_images` with ``skip_bad_images=True``: dicts
            ``{"file", "origin", "reason"}``; recorded in :meth:`describe` and so in the run.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], origins: Sequence[str], num_classes: int,
                 classes: Sequence[str], name: str, split: str, group: Optional[str] = None,
                 transform: Optional[Callable] = None, root: str = "", kind: str = "list") -> None:
        self.samples = list(samples)
        self.origins = list(origins)
        self.num_classes = int(num_classes)
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.group = group
        self.transform = transform
        self.root = root
        self.kind = kind
        self.skipped: List[Dict[str, str]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path, self.origins[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def describe(self) -> Dict[str, object]:
        """JSON-able description for run records."""
        return {"name": self.name, "kind": self.kind, "group": self.group, "split": self.split, "root": self.root,
                "num_classes": self.num_classes, "num_images": len(self), "skipped": list(self.skipped)}

    def bad_images(self, progress: Optional[bool] = None) -> List[Tuple[int, str]]:
        """``(index, reason)`` of every sample :func:`image_problem` refuses.

        Args:
            progress: tqdm bar for more than :data:`PROGRESS_MIN_IMAGES` images (None: only when
                stderr is a terminal; never on non-main processes).
        """
        from tqdm.auto import tqdm


        show = len(self.samples) > PROGRESS_MIN_IMAGES and progress_enabled(progress)
        paths = tqdm([p for p, _ in self.samples], desc=f"checking {self.name} {self.split} images", leave=False,
                     disable=not show, dynamic_ncols=True)
        problems = ((i, image_problem(path)) for i, path in enumerate(paths))
        return [(i, reason) for i, reason in problems if reason is not None]

    def leave_out(self, bad: Sequence[Tuple[int, str]]) -> None:
        """Drop the samples ``bad`` (from :meth:`bad_images`) and record them in :attr:`skipped`."""
        drop = {i for i, _ in bad}
        self.skipped.extend({"file": self.samples[i][0], "origin": self.origins[i], "reason": reason}
                            for i, reason in bad)
        keep = [i for i in range(len(self.samples)) if i not in drop]
        self.samples = [self.samples[i] for i in keep]
        self.origins = [self.origins[i] for i in keep]


def _check_files_exist(samples, origins, source: str) -> None:
    missing = [i for i, (path, _) in enumerate(samples) if not os.path.isfile(path)]
    if missing:
        i = missing[0]
        raise TokenTuneError(f"{len(missing)} of {len(samples)} images listed in {source} do not exist, e.g. "
                             f"{samples[i][0]} ({origins[i]}); re-extract the dataset or fix the list file")


def read_list_file(list_file: str, base_dir: str, num_classes: Optional[int] = None,
                   check_files: bool = True) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Parse ``"<relative path> <label>"`` lines; returns samples and their ``file:line`` origins."""
    samples, origins = [], []
    try:
        with open(list_file, encoding="utf-8-sig") as fh:   # -sig: a BOM (Windows editors) is not part of a path
            lines = fh.read().splitlines()
    except UnicodeDecodeError:
        raise TokenTuneError(f"{list_file} is not a text file; a split file holds lines "
                             "'images/<split>/000123.jpg <label>'") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        where = f"{list_file}:{lineno}"
        if len(parts) != 2 or not re.fullmatch(r"[+-]?\d+", parts[1]):
            raise TokenTuneError(f"malformed line {where}: {raw.strip()!r}; expected '<image path> <integer label>', "
                                 "e.g. 'images/test/000123.jpg 7'")
        rel, label = parts[0], int(parts[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise TokenTuneError(f"label {label} at {where} is out of range {bound} for this dataset; "
                                 "the split file belongs to another dataset or is corrupt")
        samples.append((os.path.join(base_dir, rel), label))
        origins.append(where)
    if not samples:
        raise TokenTuneError(f"{list_file} lists no images; re-create the split file")
    if check_files:
        _check_files_exist(samples, origins, list_file)
    return samples, origins


def _split_files(directory: str) -> List[str]:
    try:
        return sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".txt"))
    except OSError:
        return []


def vtab_dataset(root: str, name: str, split: str = "train800val200", transform: Optional[Callable] = None,
                 check_files: bool = True) -> ImageDataset:
    """A VTAB-1k split from the prepared layout under ``root``.

    Args:
        root: the folder that holds one sub-folder per task (``<root>/cifar``, ...).
        name: task name or alias (``cifar``/``cifar100``, ``oxford_iiit_pet``/``oxford_pet``, ...), or
            the name of any other folder under ``root`` in the same layout (``<root>/<name>/<split>.txt``;
            its class count is the largest label of its split files + 1, it belongs to no VTAB group).
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        transform: applied to every PIL image (see :func:`build_transform`).
        check_files: verify at construction that every listed image exists (their contents are
            checked by :func:`check_images`, which :func:`load_datasets` calls).
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    task = _task_in_layout(root, name)
    if not os.path.isdir(root):
        raise TokenTuneError(f"VTAB-1k root {root!r} does not exist; pass the folder that holds the prepared "
                             f"task folders (<root>/{task.name}/{split}.txt)")
    directory = None
    for candidate in (task.name,) + task.aliases:
        if os.path.isdir(os.path.join(root, candidate)):
            directory = os.path.join(root, candidate)
            break
    if directory is None:
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        hint = f"; found {', '.join(present[:8])}" + (", ..." if len(present) > 8 else "") if present else "; it is empty"
        raise TokenTuneError(f"no folder for VTAB-1k task {task.name!r} in {root}{hint}; "
                             f"prepare it as {root}/{task.name}/images/<split>/*.jpg plus {root}/{task.name}/<split>.txt")
    list_file = os.path.join(directory, f"{split}.txt")
    if not os.path.isfile(list_file):
        found = _split_files(directory)
        raise TokenTuneError(f"no split file {split}.txt in {directory} (found: {', '.join(found) or 'none'}); "
                             f"VTAB-1k splits are {', '.join(VTAB_SPLITS)}")
    samples, origins = read_list_file(list_file, directory, task.num_classes, check_files)
    return ImageDataset(samples, origins, task.num_classes, [str(i) for i in range(task.num_classes)],
                        name=task.name, split=split, group=task.group, transform=transform, root=root, kind="vtab")


def _task_in_layout(root: str, name: str) -> VTABTask:
    """The VTAB-1k task ``name``, or a task of one's own in the VTAB-1k layout under ``root``."""
    try:
        return vtab_task(name)
    except TokenTuneError:
        directory = os.path.join(root, str(name))
        if not (os.path.isdir(directory) and _split_files(directory)):
            raise
    labels = [label for split in _split_files(directory)
              for _, label in read_list_file(os.path.join(directory, f"{split}.txt"), directory, check_files=False)[0]]
    return VTABTask(str(name), max(labels) + 1, group=None)


# ----------------------------------------------------------------------------- image folders
_SPLIT_FALLBACKS = {
    "train800val200": ("train",), "train800": ("train",), "train": ("train800val200",),
    "test": ("val", "validation"), "val200": ("val", "validation"), "val": ("validation", "test"),
}


def _resolve_split_dir(root: str, split: str) -> str:
    for candidate in (split,) + _SPLIT_FALLBACKS.get(split, ()):
        path = os.path.join(root, candidate)
        if os.path.isdir(path):
            return path
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise TokenTuneError(f"image folder {root} has no {split!r} split (sub-folders: {', '.join(present) or 'none'}); "
                         "expected <dir>/train/<class>/*.jpg and <dir>/test/<class>/*.jpg")


def image_folder_dataset(root: str, split: str = "train", classes: Optional[Sequence[str]] = None,
                         transform: Optional[Callable] = None) -> ImageDataset:
    """A class-per-folder split ``<root>/<split>/<class>/...`` (images found recursively).

    Args:
        root: the dataset folder holding ``train/`` and ``test/`` (or ``val/``).
        split: sub-folder name; ``train800val200`` falls back to ``train`` and ``test`` to ``val``.
        classes: class names fixing the label order (pass the training split's ``classes`` for
            the test split); default: the sorted sub-folder names.
        transform: applied to every PIL image.

    Files are found by extension; their contents are checked by :func:`check_images`, which
    :func:`load_datasets` calls.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise TokenTuneError(f"image folder {root!r} does not exist; pass a folder with train/<class>/ and "
                             "test/<class>/ sub-folders")
    split_dir = _resolve_split_dir(root, split)
    found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not found:
        raise TokenTuneError(f"{split_dir} has no class sub-folders; put the images of each class in {split_dir}/<class>/")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise TokenTuneError(f"{split_dir} has class folder(s) {', '.join(unknown[:5])} that the training split lacks; "
                                 "both splits must use the same class names")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for cls in found:
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, cls), followlinks=True):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise TokenTuneError(f"class folder {os.path.join(split_dir, cls)} holds no images "
                                 f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        samples.extend((f, index[cls]) for f in files)
    return ImageDataset(samples, [p for p, _ in samples], len(classes), classes,
                        name=os.path.basename(os.path.normpath(root)), split=os.path.basename(split_dir),
                        transform=transform, root=root, kind="folder")


# ----------------------------------------------------------------------------- transforms
def normalization_stats(normalization: str = "auto", model=None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std): ``auto`` = the model's pretrained_cfg (Google ViTs: 0.5/0.5), ``imagenet``, ``inception``."""
    from timm.data.constants import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        IMAGENET_INCEPTION_MEAN,
        IMAGENET_INCEPTION_STD,
    )

    if normalization == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if normalization == "inception":
        return tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)
    if normalization != "auto":
        raise TokenTuneError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def model_image_size(model) -> Optional[int]:
    """The square input size a timm ViT was built for (None if it cannot tell)."""
    try:
        h, w = input_size(model)
    except TokenTuneError:
        return None
    if h != w:
        raise TokenTuneError(f"the model expects non-square {h}x{w} input; tokentune resizes to squares, "
                             "build the model with a square img_size")
    return h


def build_transform(model=None, image_size: Optional[int] = None, normalization: str = "auto",
                    interpolation: str = "bicubic"):
    """PIL image -> normalised tensor: resize (no crop, no augmentation), ToTensor, Normalize.

    Args:
        model: where the input size and ``auto`` normalisation come from.
        image_size: override the input size (must match a model built for a fixed size).
        normalization: ``auto`` (the model's pretrained mean/std), ``imagenet`` or ``inception``.
        interpolation: resize filter (``bicubic`` as the references).
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if interpolation not in INTERPOLATIONS:
        raise TokenTuneError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    size = model_image_size(model) if model is not None else None
    if image_size is not None:
        dynamic = bool(getattr(getattr(model, "patch_embed", None), "dynamic_img_size", False))
        if size is not None and int(image_size) != size and not dynamic:
            raise TokenTuneError(f"image_size {image_size} differs from the model's input size {size}; "
                                 f"create the model with img_size={image_size} (the CLI does this for --image-size)")
        size = int(image_size)
    if size is None:
        raise TokenTuneError("cannot tell the input size: pass image_size or a timm ViT model")
    mean, std = normalization_stats(normalization, model)
    return T.Compose([
        T.Resize((size, size), interpolation=InterpolationMode(interpolation)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# ----------------------------------------------------------------------------- checking every image
def _counts(found: Sequence[Tuple[ImageDataset, Sequence]]) -> str:
    return ", ".join(f"{len(bad)} of {len(ds) + len(ds.skipped)} in {ds.name} {ds.split}" for ds, bad in found if bad)


def _first_bad(ds: ImageDataset, bad: Sequence[Tuple[int, str]]) -> str:
    index, reason = bad[0]
    return f"{describe_location(ds.samples[index][0], ds.origins[index])}: {reason}"


def check_images(datasets: Sequence[ImageDataset], skip_bad_images: bool = False,
                 progress: Optional[bool] = None) -> None:
    """Check every image of ``datasets`` (see :func:`image_problem`) before any training or evaluation.

    A missing, unreadable or unsupported image would otherwise stop a run when it is first
    read, for a test image only after a whole epoch of training.

    Args:
        datasets: e.g. the training and test splits (all are checked before anything is reported).
        skip_bad_images: leave the bad images out (recorded in each dataset's ``skipped``)
            instead of failing.
        progress: tqdm bar for splits of more than :data:`PROGRESS_MIN_IMAGES` images (None: only
            when stderr is a terminal).

    Raises:
        TokenTuneError: one line with the number of bad images, the first of them (with its
            ``file:line`` for list files) and the fix; with ``skip_bad_images``, only when a split
            would be left empty.
    """
    found = [(ds, ds.bad_images(progress)) for ds in datasets]
    count = sum(len(bad) for _, bad in found)
    if not count:
        return
    if not skip_bad_images:
        first = next(_first_bad(ds, bad) for ds, bad in found if bad)
        raise TokenTuneError(f"{count} image(s) cannot be used ({_counts(found)}), e.g. {first}; re-extract the "
                             "dataset or remove the files/lines, or pass --skip-bad-images (Python: "
                             "skip_bad_images=True) to leave them out")
    for ds, bad in found:
        if len(bad) == len(ds):
            raise TokenTuneError(f"none of the {len(ds)} images of {ds.name} {ds.split} can be used, e.g. "
                                 f"{_first_bad(ds, bad)}; re-extract the dataset")
    for ds, bad in found:
        ds.leave_out(bad)


def skipped_summary(datasets: Sequence[ImageDataset], show: int = 3) -> Optional[str]:
    """One line saying which images :func:`check_images` left out (None if none)."""
    skipped = [(ds, s) for ds in datasets for s in ds.skipped]
    if not skipped:
        return None
    counts = _counts([(ds, ds.skipped) for ds in datasets])
    shown = "; ".join(f"{describe_location(s['file'], s['origin'])}: {s['reason']}" for _, s in skipped[:show])
    more = f"; and {len(skipped) - show} more" if len(skipped) > show else ""
    return f"skipped {len(skipped)} unusable image(s) ({counts}): {shown}{more}"


# ----------------------------------------------------------------------------- one entry point
def load_datasets(*, data_root: Optional[str] = None, dataset: Optional[str] = None,
                  image_folder: Optional[str] = None, train_split: str = "train800val200",
                  test_split: str = "test", skip_bad_images: bool = False,
                  progress: Optional[bool] = None) -> Tuple[ImageDataset, ImageDataset]:
    """The (train, test) datasets of a VTAB-1k task or an image folder, without transforms yet.

    Give either ``data_root`` + ``dataset`` (VTAB-1k) or ``image_folder``. Every image of both
    splits is checked first (:func:`check_images`). Attach transforms with
    :func:`set_transforms` once the model (input size, normalisation) is known.

    Args:
        skip_bad_images: leave missing, unreadable or unsupported images out (recorded in the
            datasets' ``skipped`` and :meth:`ImageDataset.describe`) instead of failing.
        progress: progress bar while checking large splits (None: only on a terminal).
    """
    if image_folder is not None and dataset is not None:
        raise TokenTuneError("give either a VTAB-1k dataset (--data ROOT --dataset NAME) or --image-folder DIR, not both")
    if image_folder is not None:
        train = image_folder_dataset(image_folder, train_split)
        test = image_folder_dataset(image_folder, test_split, classes=train.classes)
    elif dataset is None:
        raise TokenTuneError("no data: pass --data ROOT --dataset NAME (VTAB-1k) or --image-folder DIR")
    elif data_root is None:
        raise TokenTuneError(f"dataset {dataset!r} needs --data ROOT, the folder that holds the prepared VTAB-1k tasks")
    else:   # check_images reports missing files too, and can skip them
        train = vtab_dataset(data_root, dataset, train_split, check_files=False)
        test = vtab_dataset(data_root, dataset, test_split, check_files=False)
    check_images([train, test], skip_bad_images, progress)
    return train, test


def set_transforms(datasets: Sequence[ImageDataset], model, image_size: Optional[int] = None,
                   normalization: str = "auto", interpolation: str = "bicubic") -> None:
    """Give every dataset the standard transform for ``model``."""
    transform = build_transform(model, image_size, normalization, interpolation)
    for ds in datasets:
        ds.transform = transform


def build_datasets(model, cfg=None, *, data_root: Optional[str] = None, dataset: Optional[str] = None,
                   image_folder: Optional[str] = None, skip_bad_images: bool = False,
                   progress: Optional[bool] = None) -> Tuple[ImageDataset, ImageDataset]:
    """(train, test) with the standard transforms for ``model``, as the CLI builds them.

    Uses the data fields of ``cfg`` (a :class:`tokentune.config.TrainConfig`): ``train_split``,
    ``test_split``, ``normalization``, ``image_size`` and ``interpolation``. The class count
    of a VTAB-1k task for ``create_model(num_classes=...)`` is ``vtab_task(name).num_classes``.
    Every image is checked first; ``skip_bad_images`` and ``progress`` are those of
    :func:`load_datasets`.
    """

    cfg = cfg or TrainConfig()
    train, test = load_datasets(data_root=data_root, dataset=dataset, image_folder=image_folder,
                                train_split=cfg.train_split, test_split=cfg.test_split,
                                skip_bad_images=skip_bad_images, progress=progress)
    set_transforms([train, test], model, cfg.image_size, cfg.normalization, cfg.interpolation)
    return train, test
