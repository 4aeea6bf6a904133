"""A merge schedule for a *measured* speed-up on this machine (``schedule_for_speedup``).

The analytic FLOPs model (:mod:`.flops`) proposes a candidate; each candidate is timed interleaved
with the unmerged model, and the FLOPs target of the next candidate is corrected by the measured
efficiency. Token modulators that are part of a method's deployed cost (PYRA) register here with
:func:`register_modulator`, so candidates are timed with them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...core.deploy import deploy
from ...core.factory import create_model
from ...core.vit import adapt_vit, adapted_blocks
from ...errors import TokenTuneError
from ...timing import measure_throughput
from .flops import ViTDims, flops_ratio
from .method import TokenMerging
from .schedules import PROFILES, _strength_schedule, schedule_for_flops

#: name -> (factory(r, dim) -> modulator module, flops(dim) -> (r -> FLOPs per image))
MODULATORS: Dict[str, Tuple[Callable[[int, int], nn.Module], Callable[[int], Callable[[int], int]]]] = {}


def register_modulator(name: str, factory: Callable[[int, int], nn.Module],
                       flops: Callable[[int], Callable[[int], int]]) -> None:
    """Make a merge modulator available to :func:`schedule_for_speedup` (PYRA registers ``"pyra"``)."""
    MODULATORS[name] = (factory, flops)


@dataclass
class SpeedupTrial:
    """One timed candidate."""

    final_tokens: int
    schedule: List[int]
    flops_ratio: float
    speedup: float


@dataclass
class SpeedupSearch:
    """Result of :func:`schedule_for_speedup`.

    Attributes:
        schedule: the chosen per-block schedule.
        speedup: its measured speed-up over the unmerged model.
        target: the requested speed-up.
        reached: whether ``speedup >= target`` (False: the fastest schedule tried is returned).
        trials: every candidate timed, in order.
        device, batch_size, threads: the measurement setting.
    """

    schedule: List[int]
    speedup: float
    target: float
    reached: bool
    trials: List[SpeedupTrial] = field(default_factory=list)
    device: str = "cpu"
    batch_size: int = 0
    threads: int = 0

    def table(self) -> str:
        lines = [f"target speed-up {self.target:g} on {self.device} (batch {self.batch_size}, "
                 f"{self.threads} threads)", "final tokens | FLOPs ratio | measured speed-up | schedule"]
        for t in self.trials:
            lines.append(f"{t.final_tokens:12d} | {t.flops_ratio:11.3f} | {t.speedup:17.3f} | {t.schedule}")
        return "\n".join(lines)


def _set_schedule(model: nn.Module, schedule: Sequence[int], modulator: Optional[Callable[[int, int], nn.Module]]):
    for block, r in zip(adapted_blocks(model), schedule):
        mod = modulator(r, int(model.embed_dim)) if (modulator is not None and r > 0) else None
        block.merge = TokenMerging(r, mod).to(next(model.parameters()).device) if r > 0 else None


def _timing_model(model, device) -> nn.Module:
    """A deployed copy (LoRA merged, eval, no merging) that schedules can be set on."""
    if isinstance(model, str):
        model = create_model(model, method="tome", tome_r=0)
    net = adapt_vit(deploy(model) if hasattr(model, "tokentune") else copy.deepcopy(model).eval())
    for block in adapted_blocks(net):   # adapters stay: they are part of the deployed cost
        block.merge = None
    net.tokentune.prop_attn, net.tokentune.trace_source = True, False
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device).eval()


def schedule_for_speedup(model, speedup: float, profile: str = "constant", batch_size: int = 16,
                         device: str = "cpu", runs: int = 5, warmup: int = 1, max_trials: int = 6,
                         pyra: bool = True,
                         timer: Optional[Callable[[nn.Module, torch.Tensor], float]] = None) -> SpeedupSearch:
    """Search the schedule reaching ``speedup`` over the unmerged model, timed on this machine.

    The analytic FLOPs model proposes a candidate (:func:`schedule_for_flops`); each candidate is
    timed interleaved with the unmerged model (LoRA merged, eval, ``torch.no_grad``), and the
    FLOPs target of the next candidate is corrected by the measured efficiency (speed-up / FLOPs
    ratio). Returns the gentlest candidate (lowest FLOPs ratio) that reached the target, else the
    fastest one tried (``reached=False``).

    Args:
        model: a timm/tokentune ViT or a timm model name (random weights: speed does not depend on them).
        speedup: target throughput ratio (merged / unmerged), e.g. 1.7.
        profile: schedule shape (module docstring).
        batch_size: images per timed forward.
        device: where to time.
        runs, warmup: timed rounds and warm-up forwards per candidate, each round timing the
            candidate and the unmerged model in turn (:func:`tokentune.timing.measure_throughput`).
        max_trials: candidates to time at most.
        pyra: time the candidates with the token modulator registered as ``"pyra"`` (PYRA's
            modulators are part of its deployed cost); see :func:`register_modulator`.
        timer: ``timer(model, images) -> seconds`` replacing the built-in timing (tests, custom
            protocols); called for the baseline and for each candidate.
    """
    if not speedup >= 1.0:
        raise TokenTuneError(f"a speed-up target must be >= 1, got {speedup}")
    if profile not in PROFILES:
        raise TokenTuneError(f"unknown schedule profile {profile!r}; choose from {', '.join(PROFILES)}")
    net = _timing_model(model, device)
    base_net = copy.deepcopy(net)
    dims = ViTDims.from_model(net)
    modulator = mod_flops = None
    if pyra:
        modulator, flops_of = MODULATORS["pyra"]
        mod_flops = flops_of(dims.dim)
    size = net.patch_embed.img_size
    if int(size[0]) != int(size[1]):
        raise TokenTuneError(f"schedule_for_speedup times square inputs; this model takes {tuple(size)}")
    image_size = int(size[0])
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)

    def measure(schedule: Sequence[int]) -> float:
        _set_schedule(net, schedule, modulator)
        if timer is not None:
            return timer(base_net, images) / timer(net, images)
        stats = measure_throughput({"unmerged": base_net, "candidate": net}, batch_size=batch_size,
                                   image_size=image_size, rounds=runs, warmup=warmup, device=device)
        return stats["candidate"].median / stats["unmerged"].median

    max_ratio = flops_ratio(dims, _strength_schedule(profile, {"geometric": 1.0}.get(profile, float(dims.num_tokens)),
                                                     dims), mod_flops)
    trials: List[SpeedupTrial] = []
    tried: Dict[Tuple[int, ...], SpeedupTrial] = {}
    flops_target = speedup
    for _ in range(max_trials):
        flops_target = min(max(flops_target, 1.0), max_ratio)
        schedule = schedule_for_flops(dims, flops_target, profile, mod_flops)
        if tuple(schedule) in tried:      # same candidate again: nudge the FLOPs target instead
            last = tried[tuple(schedule)]
            flops_target *= 1.02 if last.speedup < speedup else 0.98
            if last.speedup < speedup and last.flops_ratio >= max_ratio - 1e-9:
                break
            continue
        ratio = flops_ratio(dims, schedule, mod_flops)
        trial = SpeedupTrial(dims.num_tokens - sum(schedule), schedule, ratio, measure(schedule))
        trials.append(trial)
        tried[tuple(schedule)] = trial
        if speedup <= trial.speedup <= 1.01 * speedup:
            break
        if trial.speedup < speedup and ratio >= max_ratio - 1e-9:
            break                         # the most aggressive schedule is not fast enough
        flops_target = speedup / max(trial.speedup / ratio, 1e-6)
    if not trials:
        raise TokenTuneError("no schedule was timed; raise max_trials")
    reached = [t for t in trials if t.speedup >= speedup]
    best = min(reached, key=lambda t: t.flops_ratio) if reached else max(trials, key=lambda t: t.speedup)
    return SpeedupSearch(schedule=list(best.schedule), speedup=best.speedup, target=speedup,
                         reached=bool(reached), trials=trials, device=str(device), batch_size=batch_size,
                         threads=torch.get_num_threads())
