"""Random augmentation that depends on (seed, epoch, sample) only: the same with any worker count and after a resume.

Training transforms draw from the process-global generators: timm's (RandAugment, random resized
crop, flip) from Python's ``random``, numpy's and torch's, the segmentation and video transforms
(rescale, crop, flip, photometric distortion, clip sampling) from torch's. In a data-loader worker
those generators are seeded once per worker and then advance with every sample the worker reads,
so what a sample gets depends on which worker read it and on how many samples that worker read
before. A run resumed from ``resume.pt`` restarts its workers, so its augmentation differs from an
uninterrupted run's, and it differs between worker counts.

Here every sample's transform runs with the three global generators seeded from
``sample_seed(seed, epoch, index)`` (``index``: the sample's index in the dataset, or its position
in a stream's epoch) (in the training process, their states are restored afterwards): the draws
depend on nothing else, so a resumed run
and an uninterrupted one, and runs with 0, 1 or 2 workers, see the same augmented samples, and the
training process's own generators (dropout, mixup, whose states ``resume.pt`` keeps) are untouched
when ``num_workers=0`` reads the samples in it.

The loop wraps a map-style dataset in :class:`SeededSamples` and its sampler in
:class:`SeededSampler` (which yields ``(index, seed)`` keys); streams seed the same way in
:class:`tokentune.engine.sources.StreamDataset`.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` in epoch ``epoch`` of a run seeded with ``seed`` (well mixed:
    numpy's ``SeedSequence``, so neighbouring samples and epochs get unrelated streams)."""
    words = np.random.SeedSequence([int(seed) % 2 ** 64, int(epoch), int(index)]).generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


@contextlib.contextmanager
def seeded_generators(seed: int):
    """Run the body with Python's, numpy's and torch's (CPU) global generators seeded from ``seed``;
    their previous states come back afterwards (CUDA generators are not touched). In a data-loader
    worker, whose generators serve only the seeded transforms, nothing is restored: saving and
    restoring numpy's state alone costs more than the seeding."""
    restore = get_worker_info() is None
    saved = (random.getstate(), np.random.get_state(), torch.default_generator.get_state()) if restore else None
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class SeededSampler(Sampler):
    """Wraps an epoch sampler (``set_epoch(epoch, start)``, ``__len__``) to yield ``(index, sample_seed)`` keys."""

    def __init__(self, sampler, seed: int) -> None:
        self.sampler, self.seed = sampler, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch, start=start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        return ((i, sample_seed(self.seed, epoch, i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """A map-style dataset read with :class:`SeededSampler` keys: ``self[(index, seed)]`` is
    ``dataset[index]`` computed under :func:`seeded_generators` ``(seed)``; a plain index reads it unseeded."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with seeded_generators(seed):
            return self.dataset[index]
