"""Side-by-side timing: several models timed in interleaved rounds on the same batch.

Every model is warmed up, then each round times every model in turn, with the order rotating
every round, so slow drifts of a shared machine hit all of them alike; the median and the spread
(min-max over rounds) of images per second are reported. Compare models only within one call.

On Linux, glibc's ``malloc`` hands a freed block above its mmap threshold (dynamic, at most 32 MiB)
back to the operating system, so every forward that allocates such an activation pays one page
fault per 4 KiB touched: 95,000-151,000 faults per dense ViT-B/16 forward at batch 16 on a 2-core
AMD EPYC (2-5% of its time), a quarter of that or less in a token-reduced model, and a different
amount in each process (the threshold follows the process's history). That is allocator noise, not model speed: deployments
use jemalloc/tcmalloc, or keep the memory. :func:`steady_allocator` sets glibc to keep it, and
:func:`measure_throughput` calls it unless asked not to (``allocator="system"`` or the environment
variable ``TOKENTUNE_ALLOCATOR=system``); :func:`allocator_state` says which timings were taken under.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .precision import autocast

# glibc's mallopt parameters (malloc.h); 1 GiB keeps every activation of a ViT in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STEADY_BYTES = 1 << 30
_allocator = "system"


def steady_allocator() -> str:
    """Keep freed memory in the process (glibc ``mallopt``: mmap and trim thresholds of 1 GiB), so
    repeated forwards reuse their activations' pages instead of faulting them in again; returns
    :func:`allocator_state`. Process-wide and idempotent; the memory a process held at its peak
    stays held. Where the C library is not glibc it changes nothing (and says so)."""
    global _allocator
    if _allocator.startswith("steady"):
        return _allocator
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        _allocator = "system (not glibc: unchanged)"
        return _allocator
    ok = mallopt(_M_MMAP_THRESHOLD, _STEADY_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, _STEADY_BYTES) == 1
    _allocator = f"steady (glibc {version} mmap/trim thresholds 1 GiB)" if ok else f"system (glibc {version} refused)"
    return _allocator


def allocator_state() -> str:
    """``"steady (...)"`` once :func:`steady_allocator` took effect in this process, else ``"system"``."""
    return _allocator


def apply_allocator(allocator: Optional[str] = None) -> str:
    """The allocator timings use: ``allocator`` or ``TOKENTUNE_ALLOCATOR`` (``steady``, the default, or
    ``system``); returns :func:`allocator_state`."""
    choice = allocator or os.environ.get("TOKENTUNE_ALLOCATOR", "steady")
    if choice not in ("steady", "system"):
        raise ValueError(f"allocator must be 'steady' or 'system', got {choice!r} (TOKENTUNE_ALLOCATOR too)")
    if choice == "steady":
        steady_allocator()
    return allocator_state()


def _agree(times: Dict[str, List[float]], names: Sequence[str], agree: float) -> bool:
    """Every model's per-round time relative to the first model's (a lone model: its own) spans at
    most ``1 + agree``."""
    first = times[names[0]]
    series = [[t / f for t, f in zip(times[n], first)] for n in names[1:]] or [first]
    return all(max(rel) <= min(rel) * (1 + agree) for rel in series)


@dataclass
class TimingStats:
    """Images per second over timed rounds."""

    median: float
    low: float
    high: float
    rounds: int
    batch_size: int
    seconds_per_batch: float
    round_seconds: Tuple[float, ...] = ()       # seconds per batch in each timed round, in order

    def as_dict(self):
        return asdict(self)


def paired_speedup(model: TimingStats, base: TimingStats) -> float:
    """``model``'s speed-up over ``base`` as the median over rounds of their time ratio in the same round.

    Both must come from one :func:`measure_throughput` call on equal batches. A round times every model
    within seconds of the others, so a drift of a shared machine that lasts longer than a round (another
    job's burst, a frequency change) moves both times of the round's ratio and drops out of it, where the
    ratio of the two medians can pair a fast round of one model with a slow round of the other.
    """
    if not model.round_seconds or len(model.round_seconds) != len(base.round_seconds):
        raise ValueError("paired_speedup needs two TimingStats of one measure_throughput call (equal rounds)")
    if model.batch_size != base.batch_size:
        raise ValueError(f"paired_speedup needs equal batches, got {model.batch_size} and {base.batch_size}")
    return statistics.median(b / m for b, m in zip(base.round_seconds, model.round_seconds))


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
                       min_block_s: float = 0.0, warm: Sequence[str] = (),
                       allocator: Optional[str] = None, min_rounds: Optional[int] = None,
                       agree: float = 0.0) -> Dict[str, TimingStats]:
    """Interleaved inference throughput of several models on the same batch.

    The batch is ``images`` when given, else :func:`random_images` (``batch_size``, ``image_size``,
    ``seed``). Every model is warmed up ``warmup`` times, then ``rounds`` rounds time
    ``iters_per_round`` forwards of each model in turn (the order rotates each round). The models
    named in ``warm`` (ran on this batch in this process already) skip the warm-up.
    ``min_block_s`` raises ``iters_per_round`` until the fastest model's timed block lasts at least
    that long (judged from its last warm-up forward), so that a fast model's rounds are not one
    short forward each, which a moment of scheduling noise can move by tens of percent.
    ``inference_mode``; CUDA is synchronised around each timed block. ``progress(done_rounds,
    rounds)`` is called after the warm-up (0) and after every round. ``allocator`` ``"steady"``
    (the default, or ``TOKENTUNE_ALLOCATOR``) calls :func:`steady_allocator` first; ``"system"``
    leaves the C allocator as it is. ``min_rounds`` (below ``rounds``) ends the rounds early, after at
    least that many, once they agree within ``agree``: every model's time relative to the first
    model's in the same round (its own time, for a single model) varies by at most ``1 + agree``
    (largest over smallest), so a quiet machine is not timed longer than its noise needs and a noisy
    one gets all ``rounds``; :attr:`TimingStats.rounds` says how many ran.
    """
    if min_rounds is not None and not 1 <= min_rounds:
        raise ValueError(f"min_rounds must be at least 1, got {min_rounds}")
    apply_allocator(allocator)
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
            if min_rounds is not None and r + 1 >= min_rounds and r + 1 < rounds and _agree(times, names, agree):
                if progress is not None:
                    progress(rounds, rounds)
                break
    out = {}
    for n in names:
        ips = [batch_size / t for t in times[n]]
        out[n] = TimingStats(median=statistics.median(ips), low=min(ips), high=max(ips), rounds=len(times[n]),
                             batch_size=batch_size, seconds_per_batch=statistics.median(times[n]),
                             round_seconds=tuple(times[n]))
    return out
