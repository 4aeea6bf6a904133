"""Data-parallel helpers on ``torch.distributed`` (torchrun; gloo on CPU, nccl on GPU).

Launch any ``tokentune train`` command with ``torchrun --nproc_per_node N -m tokentune train ...``
(multi-node: add ``--nnodes``/``--node_rank``/``--rdzv_endpoint`` as usual). Each process reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment, sees ``1/N`` of every
training epoch and of the test split, and gradients are averaged over all processes before each
optimizer step.

Gradients are averaged explicitly (one flattened all-reduce per optimizer step, after gradient
accumulation) rather than through ``DistributedDataParallel`` hooks: method loss hooks may run
the model several times per step (DyT's complete and dynamic passes) and a trainable parameter
may receive no gradient in some steps, both of which DDP's bucketed hooks do not allow.
For parameter-efficient tuning the reduced tensor is small (LoRA on ViT-B: 0.3 M values).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TokenTuneError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def info() -> DistInfo:
    """The current process group (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``None``/``"auto"``: this process's GPU (``cuda:LOCAL_RANK``) if there is one, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TokenTuneError(f"invalid device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TokenTuneError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise TokenTuneError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return dev


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the torchrun job if ``WORLD_SIZE > 1`` (idempotent); returns this process's place."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise TokenTuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise TokenTuneError(f"WORLD_SIZE is set but {var} is not; launch with torchrun --nproc_per_node N -m tokentune ...")
    dev = resolve_device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend)
    return info()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (no-op for one process)."""
    if info().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> List:
    """Every process's ``obj`` (a list of one for a single process)."""
    inf = info()
    if not inf.enabled:
        return [obj]
    out = [None] * inf.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every process (all start identical)."""
    if not info().enabled:
        return
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    for t in tensors:
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace every gradient by its mean over processes (one flattened all-reduce per dtype).

    A parameter without a gradient on some process contributes zeros there, so every process
    ends with the same gradient; one without a gradient on every process keeps ``grad=None``
    (the optimizer skips it, as in a single process).
    """
    inf = info()
    if not inf.enabled:
        return
    params = list(params)
    by_dtype = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        has_grad = torch.tensor([float(p.grad is not None) for p in group], dtype=group[0].dtype,
                                device=group[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flags = flat[-len(group):]
        flat = flat[:-len(group)] / inf.world_size
        offset = 0
        for p, flag in zip(group, flags.tolist()):
            n = p.numel()
            chunk = flat[offset:offset + n].view_as(p)
            offset += n
            if flag == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)


# ----------------------------------------------------------------------------- samplers
class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a seeded per-epoch permutation, resumable mid-epoch.

    The permutation depends only on ``(seed, epoch)``; it is padded (by repeating its start) to a
    multiple of ``world_size`` and process ``rank`` takes positions ``rank, rank + W, ...``. So
    the union of the processes' k-th batches is exactly the k-th batch a single process with a
    ``W`` times larger batch would see. ``start`` skips the first indices of this process's
    share (resuming inside an epoch).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = -(-self.size // self.world_size) * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, -(-self.size // self.world_size) - self.start)


class ShardSampler(torch.utils.data.Sampler):
    """Positions ``rank, rank + W, ...`` in order, without padding (exact distributed evaluation)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def progress_enabled(progress: Optional[bool]) -> bool:
    """tqdm bars: only on the main process, and by default only when stderr is a terminal."""
    if not info().is_main:
        return False
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)
