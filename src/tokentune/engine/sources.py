"""Data from anywhere: torchvision datasets, Hugging Face ``datasets``, iterable streams and webdataset shards.

:func:`tokentune.train` and :func:`tokentune.evaluate` read ``(image tensor, label)`` items. Besides
VTAB-1k and image folders (:mod:`tokentune.engine.data`), these adapters make other sources fit:

* :class:`ImageSource` wraps any map-style dataset whose items are ``(image, label)`` pairs or dicts
  (torchvision datasets without a transform, Hugging Face ``datasets.Dataset`` rows such as
  ``{"image": PIL, "label": 3}``): images are read as 8-bit RGB (:func:`tokentune.data.to_rgb`) and
  given the ``transform`` (set by :func:`tokentune.data.set_transforms` like any tokentune dataset).
  Columns are found by name (``image``/``img``/``pixel_values``; ``label``/``labels``/
  ``fine_label``/``cls``) or given; the class count comes from a ``ClassLabel`` feature, a
  ``num_classes`` or ``classes`` attribute, or is given.
* :class:`StreamDataset` wraps an iterable (``torch.utils.data.IterableDataset``, a
  ``datasets.IterableDataset``, :class:`WebDatasetShards`, any re-iterable object).

**Epochs of a stream.** An epoch is ``epoch_size`` samples: at every epoch the stream starts again
(``set_epoch(epoch)`` is passed on to the source when it has one, so a source can reshuffle per
epoch) and the first ``epoch_size`` samples are used; a stream that ends earlier is an error. Under
``torchrun`` process ``r`` of ``W`` takes the samples ``r, r + W, ...``; with ``num_workers`` the
loader's workers take whole batches in turn (each worker reads the stream and keeps its batches),
so batches come in stream order whatever the number of workers. ``epoch_size=None`` (evaluation)
reads the stream to its end.

**Resume.** A run stopped inside an epoch resumes by restarting that epoch's stream and skipping
the samples already trained (they are read, not decoded or trained on again). The result equals
an uninterrupted run when the source yields the same samples in the same order for the same epoch
(a fixed order, or shuffling seeded by the epoch as :class:`WebDatasetShards` does); a source
shuffled by an unseeded random generator still resumes, but not bit-identically. A random
training transform draws from generators seeded by (seed, epoch, position in the epoch)
(:mod:`tokentune.engine.seeding`), so it too is the same after a resume and with any worker count.
"""
from __future__ import annotations

import io
import itertools
import random
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import TokenTuneError
from ..utils import require_extra
from .images import to_rgb
from .seeding import sample_seed, seeded_generators

IMAGE_KEYS = ("image", "img", "pixel_values", "jpg", "png", "jpeg", "webp")
LABEL_KEYS = ("label", "labels", "fine_label", "cls", "target")


# ----------------------------------------------------------------------------- one sample
def _pick(sample: Dict[str, Any], key: Optional[str], candidates: Sequence[str], what: str) -> Any:
    if key is not None:
        if key not in sample:
            raise TokenTuneError(f"a sample has no {what} column {key!r} (columns: {', '.join(map(str, sample))}); "
                                 f"pass the right {'image_key' if what == 'image' else 'label_key'}")
        return sample[key]
    for name in candidates:
        if name in sample:
            return sample[name]
    raise TokenTuneError(f"cannot find the {what} column among {', '.join(map(str, sample))}; pass "
                         f"{'image_key' if what == 'image' else 'label_key'}=NAME")


def to_pil(image: Any):
    """A PIL image from what datasets hold: PIL images, encoded bytes, ``{"bytes": ...}``, HWC uint8 arrays."""
    from PIL import Image

    if isinstance(image, dict) and image.get("bytes") is not None:
        image = image["bytes"]
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif not isinstance(image, Image.Image):
        try:
            import numpy as np

            array = np.asarray(image)
        except Exception as exc:  # noqa: BLE001
            raise TokenTuneError(f"cannot read a {type(image).__name__} as an image; give PIL images, encoded bytes or "
                                 "HWC uint8 arrays") from exc
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise TokenTuneError(f"cannot read an array of shape {array.shape} and dtype {array.dtype} as an image; "
                                 "give HWC uint8 arrays (or tensors already transformed, with transform=None)")
        image = Image.fromarray(array)
    return image


def read_sample(sample: Any, transform: Optional[Callable], image_key: Optional[str] = None,
                label_key: Optional[str] = None) -> Tuple[Any, int]:
    """``(transformed image, int label)`` from a pair or a dict sample."""
    if isinstance(sample, dict):
        image, label = _pick(sample, image_key, IMAGE_KEYS, "image"), _pick(sample, label_key, LABEL_KEYS, "label")
    elif isinstance(sample, (tuple, list)) and len(sample) >= 2:
        image, label = sample[0], sample[1]
    else:
        raise TokenTuneError(f"a sample is a {type(sample).__name__}; expected an (image, label) pair or a dict with "
                             "image and label columns")
    if isinstance(label, torch.Tensor):
        label = label.item()
    if isinstance(label, (bytes, str)):
        label = int(label)
    if not isinstance(image, torch.Tensor):
        image = to_rgb(to_pil(image))
        if transform is not None:
            image = transform(image)
    elif transform is not None:
        raise TokenTuneError("the samples are tensors already; build the source with transform=None")
    return image, int(label)


def _num_classes(dataset: Any, label_key: Optional[str]) -> Optional[int]:
    features = getattr(dataset, "features", None)
    if isinstance(features, dict):
        key = label_key or next((k for k in LABEL_KEYS if k in features), None)
        n = getattr(features.get(key), "num_classes", None) if key else None
        if n:
            return int(n)
    if isinstance(getattr(dataset, "num_classes", None), int):
        return int(dataset.num_classes)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


# ----------------------------------------------------------------------------- map-style
class ImageSource(Dataset):
    """A map-style dataset of ``(image, label)`` pairs or dict rows, read as tokentune's datasets are.

    Args:
        dataset: torchvision dataset (without transform), ``datasets.Dataset``, any indexable.
        transform: PIL image -> tensor (None: set later, e.g. by :func:`tokentune.data.set_transforms`).
        image_key, label_key: the columns of dict rows (default: found by name).
        num_classes: the class count (default: from a ``ClassLabel`` feature or ``classes``).
        name: for run records (default: the dataset's class name).
    """

    def __init__(self, dataset: Any, transform: Optional[Callable] = None, image_key: Optional[str] = None,
                 label_key: Optional[str] = None, num_classes: Optional[int] = None, name: Optional[str] = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.image_key, self.label_key = image_key, label_key
        self.num_classes = num_classes or _num_classes(dataset, label_key)
        self.name = name or getattr(dataset, "name", None) or type(dataset).__name__
        self.kind = "source"
        self.split = str(getattr(dataset, "split", "") or "")
        self.skipped: list = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return read_sample(self.dataset[index], self.transform, self.image_key, self.label_key)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "group": None, "split": self.split, "root": None,
                "num_classes": self.num_classes, "num_images": len(self), "skipped": []}


# ----------------------------------------------------------------------------- streams
class StreamDataset(IterableDataset):
    """An iterable source in epochs of ``epoch_size`` samples (see the module docstring).

    Args:
        source: an iterable of ``(image, label)`` pairs or dict samples, iterated afresh every epoch
            (its ``set_epoch(epoch)`` is called first when it has one).
        epoch_size: samples per epoch (required for training unless ``len(source)`` is known; None:
            the whole stream, as evaluation reads it).
        transform, image_key, label_key, num_classes, name: as :class:`ImageSource`.
    """

    def __init__(self, source: Iterable, epoch_size: Optional[int] = None, transform: Optional[Callable] = None,
                 image_key: Optional[str] = None, label_key: Optional[str] = None, num_classes: Optional[int] = None,
                 name: Optional[str] = None) -> None:
        self.source = source
        if epoch_size is None and hasattr(source, "__len__"):
            epoch_size = len(source)
        self.epoch_size = None if epoch_size is None else int(epoch_size)
        self.transform = transform
        self.image_key, self.label_key = image_key, label_key
        self.num_classes = num_classes or _num_classes(source, label_key)
        self.name = name or type(source).__name__
        self.kind = "stream"
        self.split = ""
        self.skipped: list = []
        self.epoch, self.start = 0, 0
        self.batch_size, self.rank, self.world_size = 1, 0, 1
        self.seed: Optional[int] = None

    def __len__(self) -> int:
        if self.epoch_size is None:
            raise TypeError("a stream without epoch_size has no length")
        return self.epoch_size

    def configure(self, batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: Optional[int] = None) -> "StreamDataset":
        """How the loop reads it: batches of ``batch_size`` for process ``rank`` of ``world_size``; with
        ``seed``, sample ``i`` of an epoch is transformed under :func:`~tokentune.engine.seeding.seeded_generators`
        ``(sample_seed(seed, epoch, i))`` (the same whatever the workers and after a resume)."""
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed = None if seed is None else int(seed)
        return self

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration reads epoch ``epoch`` from this process's sample ``start`` on."""
        self.epoch, self.start = int(epoch), int(start)

    def per_process(self) -> int:
        """Samples of one epoch this process trains on."""
        if self.epoch_size is None:
            raise TokenTuneError(f"the stream {self.name!r} has no epoch size; pass epoch_size=N (samples per epoch)")
        return self.epoch_size // self.world_size

    def __iter__(self) -> Iterator[Tuple[Any, int]]:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        first_batch = self.start // self.batch_size
        stream = iter(self.source)
        if self.epoch_size is not None:
            stream = itertools.islice(stream, self.epoch_size - self.epoch_size % self.world_size)
        local = 0
        for i, sample in enumerate(stream):
            if i % self.world_size != self.rank:
                continue
            j, local = local, local + 1
            if j < self.start or (j // self.batch_size - first_batch) % workers != worker:
                continue
            if self.seed is None:
                yield read_sample(sample, self.transform, self.image_key, self.label_key)
                continue
            with seeded_generators(sample_seed(self.seed, self.epoch, i)):
                item = read_sample(sample, self.transform, self.image_key, self.label_key)
            yield item
        if self.epoch_size is not None and local < self.per_process():
            raise TokenTuneError(f"the stream {self.name!r} ended after {local * self.world_size} samples in epoch "
                                 f"{self.epoch + 1}, fewer than epoch_size={self.epoch_size}; lower epoch_size")

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "group": None, "split": self.split, "root": None,
                "num_classes": self.num_classes, "num_images": self.epoch_size, "skipped": []}


class WebDatasetShards:
    """webdataset ``.tar`` shards as a stream of raw ``(image bytes, label)`` samples, in a fixed order per epoch.

    The shard list is shuffled with ``random.Random(seed + epoch)`` (when ``shuffle``) and samples
    inside a shard keep their order, so the same epoch always yields the same sequence (exact
    resume). Images are decoded only for the samples a process keeps (:class:`StreamDataset`).

    Args:
        urls: shard paths or URLs, or one brace pattern (``data/train-{000000..000099}.tar``).
        image_keys: file extensions that hold the image, tried in order.
        label_key: the extension that holds the label (``cls``: an integer as text).
        shuffle: shuffle the shard order per epoch.
        seed: the shuffling seed.
    """

    def __init__(self, urls, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"), label_key: str = "cls",
                 shuffle: bool = True, seed: int = 0) -> None:
        wds = require_extra("webdataset", "webdataset", "reading webdataset shards")
        self.wds = wds
        if isinstance(urls, str):
            import braceexpand

            urls = list(braceexpand.braceexpand(urls))
        self.urls = list(urls)
        if not self.urls:
            raise TokenTuneError("no webdataset shards given")
        self.image_keys, self.label_key = tuple(image_keys), label_key
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Tuple[bytes, int]]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(urls)
        keys = ";".join(self.image_keys)
        pipeline = self.wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                       empty_check=False).to_tuple(keys, self.label_key)
        for image, label in pipeline:
            yield image, int(label.decode() if isinstance(label, bytes) else label)


# ----------------------------------------------------------------------------- the loop's side
def as_training_data(data: Any) -> Any:
    """``data`` as :func:`tokentune.train` reads it: map-style datasets as they are, iterables wrapped
    in a :class:`StreamDataset`."""
    if isinstance(data, StreamDataset) or isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return data
    if isinstance(data, IterableDataset) or (hasattr(data, "__iter__") and not hasattr(data, "__getitem__")):
        return StreamDataset(data)
    return data


def stream_loader(stream: StreamDataset, batch_size: int, num_workers: int, drop_last: bool, pin_memory: bool,
                  rank: int = 0, world_size: int = 1, generator: Optional[torch.Generator] = None,
                  seed: Optional[int] = None):
    """``(stream, loader)`` for a stream: the stream is also the loop's sampler (``set_epoch(epoch, start)``);
    workers are not persistent, so every epoch's workers see its ``set_epoch``. ``seed``: seed each
    sample's transform from (seed, epoch, position) (training; None: evaluation, nothing random)."""
    stream.configure(batch_size, rank, world_size, seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                                         pin_memory=pin_memory, persistent_workers=False, generator=generator)
    return stream, loader
