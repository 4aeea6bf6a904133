"""Merge schedules from a target: final token count, FLOPs ratio, or measured speed-up.

The reference schedules (``tome_r="low"``/``"high"``) exist only for ViT-B/16, ViT-L/16 and
DeiT-B distilled at 224x224. For any other backbone or input size, derive one:

* :func:`schedule_for_tokens`: a per-block ``r`` that ends at exactly ``final_tokens`` tokens;
* :func:`schedule_for_flops`: the gentlest schedule whose analytic FLOPs are at least ``ratio``
  times below the unmerged model's (:func:`vit_flops`);
* :func:`schedule_for_speedup`: time the model on this machine with candidate schedules
  (interleaved with the unmerged model) and return the gentlest one reaching the speed-up.

Each takes a *profile*, the shape of the schedule:

* ``"constant"``: the same ``r`` in every block, the remainder in the last merging block (ToMe's
  default; ``tokens=11`` on ViT-B/16 gives the reference "low" ``[16]*11 + [10]``);
* ``"decreasing"``: linear from ``2a`` in the first block to 0 in the last (ToMe's
  ``(r, -1.0)``);
* ``"geometric"``: every block merges the same fraction of its mergeable tokens (the shape of
  the reference "high" schedules).

A target that cannot be met (fewer final tokens than bipartite matching can reach with the
protected prefix tokens, a FLOPs ratio beyond the most aggressive schedule) is a
:class:`~tokentune.errors.TokenTuneError` naming the limit, never a shape failure later.
The same targets are accepted as ``tome_r`` strings: ``"tokens:11"``, ``"flops:2.5"``,
``"tokens:5:geometric"``, ``"flops:3.2:decreasing"``.

FLOPs convention: one multiply-add counts as **2 FLOPs** (as ``torch.utils.flop_counter`` and
fvcore-style "GFLOPs x 2"); only matrix products and convolutions are counted (LayerNorm,
softmax, GELU, residual adds are not), matching ``torch.utils.flop_counter``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import TokenTuneError
from .tome import fit_schedule, max_merge, token_counts

PROFILES = ("constant", "decreasing", "geometric")


# ----------------------------------------------------------------------------- architecture / FLOPs
@dataclass(frozen=True)
class ViTDims:
    """What the analytic FLOPs model needs to know about a ViT.

    Attributes:
        dim: embedding dimension D.
        depth: number of blocks L.
        heads: attention heads.
        head_dim: dimension per head (ToMe's matching metric has this width).
        num_tokens: tokens entering the first block (patches + prefix tokens).
        num_prefix: prefix tokens (CLS, distillation, registers), never merged.
        attn_linear_macs: multiply-adds per token of the attention's Linear layers (qkv + proj).
        mlp_linear_macs: multiply-adds per token of the MLP's Linear layers.
        stem_flops: FLOPs of the patch embedding per image.
        head_flops: FLOPs of the classifier head(s) per image.
    """

    dim: int
    depth: int
    heads: int
    head_dim: int
    num_tokens: int
    num_prefix: int
    attn_linear_macs: int
    mlp_linear_macs: int
    stem_flops: int = 0
    head_flops: int = 0

    @classmethod
    def from_model(cls, model: nn.Module) -> "ViTDims":
        """Read the dimensions of a timm ViT (plain, adapted by tokentune, or deployed)."""
        from .model import num_input_tokens

        blocks = list(model.blocks)
        if not blocks:
            raise TokenTuneError("the model has no blocks")
        blk = blocks[0]

        def linear_macs(module: nn.Module) -> int:
            return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        proj = model.patch_embed.proj
        grid = model.patch_embed.grid_size
        stem = 2 * proj.weight.numel() * int(grid[0]) * int(grid[1]) if isinstance(proj, nn.Conv2d) else 0
        head = 0
        for attr in ("head", "head_dist"):
            h = getattr(model, attr, None)
            if isinstance(h, nn.Linear):
                head += 2 * h.in_features * h.out_features
        return cls(dim=int(model.embed_dim), depth=len(blocks), heads=int(blk.attn.num_heads),
                   head_dim=int(blk.attn.head_dim), num_tokens=num_input_tokens(model),
                   num_prefix=int(model.num_prefix_tokens), attn_linear_macs=linear_macs(blk.attn),
                   mlp_linear_macs=linear_macs(blk.mlp), stem_flops=stem, head_flops=head)

    @classmethod
    def from_name(cls, name: str, **timm_kwargs) -> "ViTDims":
        """Dimensions of the timm model ``name`` (built on the meta device: no memory, no weights)."""
        import timm

        from .backbone import _check_name

        _check_name(name)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **timm_kwargs)
        return cls.from_model(model)


def block_flops(dims: ViTDims, tokens: int, r: int, modulator_flops: int = 0) -> int:
    """FLOPs of one block entering with ``tokens`` tokens and merging ``r`` of them.

    Attention on all tokens: Linear layers ``2 N macs``, ``QK^T`` and ``AV`` ``2 N^2 (H d)`` each;
    ToMe's matching ``A B^T`` on the head-averaged keys of the unprotected tokens (``2 |A| |B| d``); the modulator (PYRA:
    ``4 r D``); the MLP on the ``N - r`` remaining tokens.
    """
    n = tokens
    inner = dims.heads * dims.head_dim
    flops = 2 * n * dims.attn_linear_macs + 2 * (2 * n * n * inner)
    if r > 0:
        p = dims.num_prefix          # protected tokens take no part in the similarity matrix
        flops += 2 * ((n + 1) // 2 - (p + 1) // 2) * (n // 2 - p // 2) * dims.head_dim + modulator_flops
    flops += 2 * (n - r) * dims.mlp_linear_macs
    return flops


def vit_flops(dims: ViTDims, schedule: Sequence[int] = (),
              modulator_flops: Optional[Callable[[int], int]] = None) -> int:
    """Forward FLOPs per image (2 per multiply-add) of a ViT merging ``schedule`` tokens per block.

    ``modulator_flops(r)`` adds the cost of a per-block token modulator (PYRA: ``4 r D``).
    """
    schedule = list(schedule) + [0] * (dims.depth - len(schedule))
    counts = token_counts(schedule, dims.num_tokens)
    total = dims.stem_flops + dims.head_flops
    for n, r in zip(counts, schedule):
        extra = modulator_flops(r) if (modulator_flops is not None and r > 0) else 0
        total += block_flops(dims, n, r, extra)
    return total


def flops_ratio(dims: ViTDims, schedule: Sequence[int],
                modulator_flops: Optional[Callable[[int], int]] = None) -> float:
    """Unmerged FLOPs / FLOPs with ``schedule`` (2.0 = half the compute)."""
    return vit_flops(dims) / vit_flops(dims, schedule, modulator_flops)


def pyra_modulator_flops(dim: int) -> Callable[[int], int]:
    """PYRA's extra cost per block: two products of an [r, D] matrix with vectors (4 r D)."""
    return lambda r: 4 * r * dim


# ----------------------------------------------------------------------------- token targets
def min_final_tokens(num_tokens: int, depth: int, num_prefix: int) -> int:
    """Fewest tokens ToMe can leave after ``depth`` blocks (merging the maximum every block)."""
    schedule = fit_schedule([num_tokens] * depth, num_tokens, num_prefix, strict=False)
    return num_tokens - sum(schedule)


def _desired(profile: str, theta: float, depth: int) -> Optional[List[float]]:
    if profile == "constant":
        return [theta] * depth
    if profile == "decreasing":
        span = max(depth - 1, 1)
        return [2.0 * theta * (depth - 1 - i) / span for i in range(depth)]
    return None


def _fill(profile: str, theta: float, num_tokens: int, depth: int, num_prefix: int, total: int) -> List[int]:
    """Integer schedule of the profile at strength ``theta``, capped and stopping at ``total``."""
    desired = _desired(profile, theta, depth)
    out, n, left = [], num_tokens, total
    for i in range(depth):
        want = desired[i] if desired is not None else theta * (n - num_prefix)
        r = min(int(math.floor(want + 0.5)), max_merge(n, num_prefix), left)
        r = max(r, 0)
        out.append(r)
        n -= r
        left -= r
    return out


def schedule_for_tokens(num_tokens: int, depth: int, final_tokens: int, num_prefix: int = 1,
                        profile: str = "constant") -> List[int]:
    """A per-block schedule taking ``num_tokens`` to exactly ``final_tokens`` in ``depth`` blocks.

    Args:
        num_tokens: tokens entering the first block (patches + prefix tokens).
        depth: number of blocks.
        final_tokens: tokens after the last block.
        num_prefix: protected prefix tokens (CLS, distillation token, registers).
        profile: ``"constant"``, ``"decreasing"`` or ``"geometric"`` (module docstring).
    """
    if profile not in PROFILES:
        raise TokenTuneError(f"unknown schedule profile {profile!r}; choose from {', '.join(PROFILES)}")
    if final_tokens > num_tokens:
        raise TokenTuneError(f"cannot end with {final_tokens} tokens: only {num_tokens} enter the first block")
    lowest = min_final_tokens(num_tokens, depth, num_prefix)
    if final_tokens < lowest:
        raise TokenTuneError(
            f"cannot merge {num_tokens} tokens down to {final_tokens} in {depth} blocks: bipartite matching "
            f"removes at most half of the mergeable tokens per block ({num_prefix} protected), so the fewest "
            f"reachable is {lowest}; ask for final_tokens >= {lowest}")
    total = num_tokens - final_tokens
    if total == 0:
        return [0] * depth

    def removed(theta: float) -> List[int]:
        return _fill(profile, theta, num_tokens, depth, num_prefix, total)

    if profile == "constant":   # integer r: the smallest one that gets there (ToMe's int r, capped)
        r = next(r for r in range(1, num_tokens + 1) if sum(removed(r)) >= total)
        schedule = removed(r)
    else:
        lo, hi = 0.0, float(num_tokens) if profile == "decreasing" else 1.0
        if sum(removed(hi)) < total:
            hi = float(num_tokens) * 4
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(removed(mid)) >= total:
                hi = mid
            else:
                lo = mid
        schedule = removed(hi)
        if sum(schedule) < total:   # the profile's shape cannot get there: top up greedily from the front
            schedule = _top_up(schedule, num_tokens, num_prefix, total)
    return schedule


def _top_up(schedule: List[int], num_tokens: int, num_prefix: int, total: int) -> List[int]:
    schedule = list(schedule)
    while sum(schedule) < total:
        for i in range(len(schedule)):
            counts = token_counts(schedule, num_tokens)
            if schedule[i] < max_merge(counts[i], num_prefix) and sum(schedule) < total:
                trial = list(schedule)
                trial[i] += 1
                if fit_schedule(trial, num_tokens, num_prefix, strict=False) == trial:
                    schedule = trial
        if sum(schedule) < total and all(
                schedule[i] >= max_merge(token_counts(schedule, num_tokens)[i], num_prefix)
                for i in range(len(schedule))):
            break
    return schedule


# ----------------------------------------------------------------------------- FLOPs targets
def _strength_schedule(profile: str, theta: float, dims: ViTDims) -> List[int]:
    """The profile at strength ``theta`` with no token target (ToMe's capping only)."""
    return _fill(profile, theta, dims.num_tokens, dims.depth, dims.num_prefix, dims.num_tokens)


def schedule_for_flops(dims: ViTDims, ratio: float, profile: str = "constant",
                       modulator_flops: Optional[Callable[[int], int]] = None) -> List[int]:
    """The gentlest schedule of ``profile`` whose FLOPs are at least ``ratio`` x lower.

    The profile's strength (``r`` for ``"constant"``, the first block's ``2a`` for
    ``"decreasing"``, the merged fraction for ``"geometric"``) is raised until the FLOPs ratio is
    reached, then the last blocks give back merges as long as the ratio still holds (so the
    result is as close to ``ratio`` as whole tokens allow, from above).

    Args:
        dims: the architecture (:meth:`ViTDims.from_model` / :meth:`ViTDims.from_name`).
        ratio: unmerged FLOPs / merged FLOPs to reach (e.g. 2.0).
        profile: schedule shape (module docstring).
        modulator_flops: per-block extra cost of a token modulator (PYRA: :func:`pyra_modulator_flops`).
    """
    if profile not in PROFILES:
        raise TokenTuneError(f"unknown schedule profile {profile!r}; choose from {', '.join(PROFILES)}")
    if not ratio >= 1.0:
        raise TokenTuneError(f"a FLOPs ratio must be >= 1 (unmerged / merged), got {ratio}")

    def reaches(schedule: Sequence[int]) -> bool:
        return flops_ratio(dims, schedule, modulator_flops) >= ratio

    top = {"constant": float(dims.num_tokens), "decreasing": float(dims.num_tokens), "geometric": 1.0}[profile]
    if not reaches(_strength_schedule(profile, top, dims)):
        best = flops_ratio(dims, _strength_schedule(profile, top, dims), modulator_flops)
        raise TokenTuneError(f"a FLOPs ratio of {ratio:g} is out of reach for this model: the most aggressive "
                             f"{profile} schedule gives {best:.3f}; ask for at most that (or another profile)")
    if profile == "constant":
        theta = float(next(r for r in range(dims.num_tokens + 1) if reaches(_strength_schedule(profile, r, dims))))
    else:
        lo, hi = 0.0, top
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if reaches(_strength_schedule(profile, mid, dims)) else (mid, hi)
        theta = hi
    schedule = _strength_schedule(profile, theta, dims)
    for i in reversed(range(len(schedule))):      # give back what is not needed, last blocks first
        while schedule[i] > 0:
            trial = schedule[:i] + [schedule[i] - 1] + schedule[i + 1:]
            if not reaches(trial):
                break
            schedule = trial
        if not reaches(schedule[:i] + [max(schedule[i] - 1, 0)] + schedule[i + 1:]) and schedule[i] > 0:
            break
    return schedule


# ----------------------------------------------------------------------------- measured targets
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
    from .model import adapted_blocks
    from .tome import TokenMerging

    for block, r in zip(adapted_blocks(model), schedule):
        mod = modulator(r, int(model.embed_dim)) if (modulator is not None and r > 0) else None
        block.merge = TokenMerging(r, mod).to(next(model.parameters()).device) if r > 0 else None


def _timing_model(model, device) -> nn.Module:
    """A deployed-style copy (LoRA merged, eval, no plug-ins) that schedules can be set on."""
    from .lora import merge_lora
    from .model import adapt_vit, adapted_blocks

    if isinstance(model, str):
        from .methods import create_model
        model = create_model(model, method="tome", tome_r=0)
    else:
        model = copy.deepcopy(model)
        merge_lora(model)
        adapt_vit(model)
    for block in adapted_blocks(model):   # adapters stay: they are part of the deployed cost
        block.merge = None
    model.tokentune_prop_attn = True
    model.tokentune_trace_source = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


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
            candidate and the unmerged model in turn (:func:`tokentune.bench.measure_throughput`).
        max_trials: candidates to time at most.
        pyra: time the candidates with PYRA modulators (they are part of PYRA's deployed cost).
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
        from .pyra import PYRAModulator
        modulator = lambda r, d: PYRAModulator(r, d)   # noqa: E731 - random W_r, zero W_D: same cost
        mod_flops = pyra_modulator_flops(dims.dim)
    size = net.patch_embed.img_size
    if int(size[0]) != int(size[1]):
        raise TokenTuneError(f"schedule_for_speedup times square inputs; this model takes {tuple(size)}")
    image_size = int(size[0])
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)

    def measure(schedule: Sequence[int]) -> float:
        _set_schedule(net, schedule, modulator)
        if timer is not None:
            return timer(base_net, images) / timer(net, images)
        from .bench import measure_throughput  # interleaved rounds, rotating order, no_grad
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


# ----------------------------------------------------------------------------- tome_r strings
def parse_target(spec: str) -> Optional[Tuple[str, float, str]]:
    """``"tokens:11"`` / ``"flops:2.5:geometric"`` -> (kind, value, profile); None for other strings."""
    parts = [p.strip() for p in spec.split(":")]
    if len(parts) < 2 or parts[0] not in ("tokens", "flops"):
        return None
    if len(parts) > 3:
        raise TokenTuneError(f"invalid schedule target {spec!r}; use 'tokens:N[:profile]' or 'flops:X[:profile]'")
    profile = parts[2] if len(parts) == 3 else "constant"
    if profile not in PROFILES:
        raise TokenTuneError(f"unknown schedule profile {profile!r} in {spec!r}; choose from {', '.join(PROFILES)}")
    try:
        value = float(parts[1])
    except ValueError:
        raise TokenTuneError(f"invalid number {parts[1]!r} in schedule target {spec!r}") from None
    if parts[0] == "tokens" and value != int(value):
        raise TokenTuneError(f"'tokens:' needs a whole number of tokens, got {parts[1]!r}")
    return parts[0], value, profile


def resolve_target(model: nn.Module, spec: str) -> Optional[List[int]]:
    """The schedule a ``tome_r`` target string asks for on ``model`` (None: not a target string)."""
    parsed = parse_target(spec)
    if parsed is None:
        return None
    kind, value, profile = parsed
    dims = ViTDims.from_model(model)
    if kind == "tokens":
        return schedule_for_tokens(dims.num_tokens, dims.depth, int(value), dims.num_prefix, profile)
    return schedule_for_flops(dims, value, profile)
