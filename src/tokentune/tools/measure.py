"""Honest efficiency measurement: parameters, FLOPs, throughput, latency, memory.

* FLOPs: :mod:`tokentune.core.flops` (``torch.utils.flop_counter`` on the real forward, attention
  counted on CPU and GPU alike).
* Throughput and latency: :mod:`tokentune.timing` (interleaved rounds, median and spread).
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak of live tensor
  storage during the call, tracked exactly by a dispatch mode (it does not include allocator
  caching or the model's parameters).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
import weakref
from typing import Callable, Dict, Optional, Sequence

import timm
import torch
from torch import nn

from ..fileio import atomic_write_text
from ..precision import autocast
from ..timing import apply_allocator, sync
from ..version import __version__


# ----------------------------------------------------------------------------- memory
class _LiveTensorTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks bytes of live tensor storage created inside the mode; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _release(self, key, nbytes) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    @staticmethod
    def _key(t: torch.Tensor):
        storage = t.untyped_storage()
        return (storage.data_ptr(), storage.device.type), storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # storages the op received: an output sharing one is a view of (or was written into) an
        # input, not a new allocation; without this, views of the parameters (``aten.t`` of a
        # weight when no_grad decomposes ``linear``) counted as activations
        inputs = {self._key(t)[0] for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                key, storage = self._key(t)
                if key in self._seen or key in inputs or storage.data_ptr() == 0:
                    continue
                nbytes = storage.nbytes()
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key, nbytes) if hasattr(storage, "__weakref__") else None
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while running ``fn`` (see the module docstring for what counts)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    tracker = _LiveTensorTracker()
    with tracker:
        result = fn()
    del result
    return int(tracker.peak)


def measure_train_step(model: nn.Module, batch_size: int = 16, image_size: int = 224, steps: int = 3,
                       warmup: int = 1, dtype: str = "fp32", device="cpu", num_classes: Optional[int] = None,
                       loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                       inputs: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None):
    """Seconds per training step (forward, backward, AdamW step on trainable params) and peak memory.

    ``loss(images, targets)`` replaces the plain ``cross_entropy(model(images), targets)``, e.g. a
    method's training loss (DyT's complete-model pass and distillation are part of its step).
    ``inputs``/``targets`` replace the random images and labels (a task's clips, masks).
    """
    device = torch.device(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    num_classes = num_classes or int(getattr(model, "num_classes", 10) or 10)
    images = inputs.to(device) if inputs is not None else torch.randn(batch_size, 3, image_size, image_size, device=device)
    if targets is None:
        targets = torch.randint(0, num_classes, (batch_size,), device=device)
    targets = targets.to(device)

    def step():
        with autocast(device, dtype):
            value = (loss(images, targets) if loss is not None
                     else nn.functional.cross_entropy(model(images), targets))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return value.detach()

    for _ in range(warmup):
        step()
    mem = peak_memory(step, device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    model.eval()
    return {"seconds_per_step": statistics.median(times), "peak_memory_bytes": mem}


# ----------------------------------------------------------------------------- environment
def environment(device="cpu", dtype: str = "fp32") -> Dict[str, object]:
    """What a benchmark table must state: device, threads, dtype, allocator, versions. It settles the
    allocator the timings that follow run under (:func:`tokentune.timing.apply_allocator`), so the
    record states what they used."""

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "allocator": apply_allocator(),
        "dtype": dtype,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "tokentune": __version__,
        "python": platform.python_version(),
    }


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    """Rows of dicts -> a markdown table with the given columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.4f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(path_prefix: str, rows: Sequence[Dict[str, object]], env: Dict[str, object],
                  columns: Sequence[str], title: str = "", note: str = "") -> str:
    """Write ``<prefix>.md`` and ``<prefix>.json`` (atomically; the folder is created); returns the markdown
    text. ``note`` is a line printed under the table (and kept in the JSON)."""
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    md = ((f"## {title}\n\n" if title else "") + f"Environment: {env_line}\n\n" + markdown_table(rows, columns) + "\n"
          + (f"{note}\n" if note else ""))
    atomic_write_text(path_prefix + ".md", md)
    record = {"title": title, "environment": env, "rows": list(rows), **({"note": note} if note else {})}
    atomic_write_text(path_prefix + ".json", json.dumps(record, indent=2, default=str))
    return md
