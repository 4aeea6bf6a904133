"""Side-by-side timing: several models timed in interleaved rounds on the same batch.

Every model is warmed up, then each round times every model in turn, with the order rotating
every round, so slow drifts of a shared machine hit all of them alike; the median and the spread
(min-max over rounds) of images per second are reported. Compare models only within one call.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .precision import autocast


@dataclass
class TimingStats:
    """Images per second over timed rounds."""

    median: float
    low: float
    high: float
    rounds: int
    batch_size: int
    seconds_per_batch: float

    def as_dict(self):
        return asdict(self)


def sync(device: Union[str, torch.device]) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(batch_size: int, image_size: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """The random batch :func:`measure_throughput` times for ``seed`` (drawn on the CPU, then moved),
    e.g. to calibrate a data-dependent model (DyT) on exactly the images that are timed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)


def measure_throughput(models: Dict[str, nn.Module], batch_size: int = 16, image_size: int = 224,
                       rounds: int = 10, warmup: int = 2, iters_per_round: int = 1, dtype: str = "fp32",
                       device="cpu", seed: int = 0, images: Optional[torch.Tensor] = None,
                       progress: Optional[Callable[[int, int], None]] = None,
                       min_block_s: float = 0.0, warm: Sequence[str] = ()) -> Dict[str, TimingStats]:
    """Interleaved inference throughput of several models on the same batch.

    The batch is ``images`` when given, else :func:`random_images` (``batch_size``, ``image_size``,
    ``seed``). Every model is warmed up ``warmup`` times, then ``rounds`` rounds time
    ``iters_per_round`` forwards of each model in turn (the order rotates each round). The models
    named in ``warm`` (ran on this batch in this process already) skip the warm-up.
    ``min_block_s`` raises ``iters_per_round`` until the fastest model's timed block lasts at least
    that long (judged from its last warm-up forward), so that a fast model's rounds are not one
    short forward each, which a moment of scheduling noise can move by tens of percent.
    ``inference_mode``; CUDA is synchronised around each timed block. ``progress(done_rounds,
    rounds)`` is called after the warm-up (0) and after every round.
    """
    device = torch.device(device)
    if images is None:
        images = random_images(batch_size, image_size, seed, device)
    batch_size = images.shape[0]
    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode(), autocast(device, dtype):
        fastest = float("inf")
        for n in names:
            models[n].eval()
            for _ in range(0 if n in warm else warmup):
                sync(device)
                t0 = time.perf_counter()
                models[n](images)
                sync(device)
                fastest = min(fastest, time.perf_counter() - t0)
        sync(device)
        if min_block_s > 0 and warmup > 0:
            iters_per_round = max(iters_per_round, math.ceil(min_block_s / max(fastest, 1e-6)))
        if progress is not None:
            progress(0, rounds)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(iters_per_round):
                    models[n](images)
                sync(device)
                times[n].append((time.perf_counter() - t0) / iters_per_round)
            if progress is not None:
                progress(r + 1, rounds)
    out = {}
    for n in names:
        ips = [batch_size / t for t in times[n]]
        out[n] = TimingStats(median=statistics.median(ips), low=min(ips), high=max(ips), rounds=rounds,
                             batch_size=batch_size, seconds_per_batch=statistics.median(times[n]))
    return out
