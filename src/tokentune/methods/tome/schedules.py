"""ToMe merge schedules: how many tokens each block merges.

A schedule is given as an int (capped per block as ToMe defines), a per-layer list (must fit),
ToMe's ``(r, inflect)``, a reference name (``"low"``/``"high"``), or a target for any backbone.
Targets: a final token count, a FLOPs ratio, or (in :mod:`tokentune.tools.schedule_search`) a
measured speed-up.

The reference schedules (``tome_r="low"``/``"high"``) exist only for ViT-B/16, ViT-L/16 and
DeiT-B distilled at 224x224. For any other backbone or input size, derive one:

* :func:`schedule_for_tokens`: a per-block ``r`` that ends at exactly ``final_tokens`` tokens;
* :func:`schedule_for_flops`: the gentlest schedule whose analytic FLOPs are at least ``ratio``
  times below the unmerged model's (:func:`vit_flops`);
* :func:`tokentune.tools.schedule_search.schedule_for_speedup`: time the model on this machine
  with candidate schedules and return the gentlest one reaching the speed-up.

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

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch import nn

from ...errors import TokenTuneError
from .flops import ViTDims, flops_ratio, token_counts
from .matching import max_merge

Schedule = Union[int, Sequence[int], Tuple[int, float], str]
PROFILES = ("constant", "decreasing", "geometric")


# ----------------------------------------------------------------------------- schedules
def parse_schedule(r: Schedule, num_layers: int) -> List[int]:
    """Turn a ToMe schedule into one ``r`` per layer.

    * ``int``: the same ``r`` in every layer;
    * ``list``: one value per layer, padded with zeros when shorter;
    * ``(r, inflect)``: ToMe's linear schedule, ``inflect`` in [-1, 1] (-1 = decreasing,
      0 = constant, +1 = increasing), the values ``int(min + step * i)``.
    """
    if isinstance(r, bool):
        raise TokenTuneError(f"invalid ToMe schedule {r!r}: give an int, a per-layer list or (r, inflect)")
    if isinstance(r, int):
        values = [r] * num_layers
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = int(r[0]), float(r[1])
        if not -1.0 <= inflect <= 1.0:
            raise TokenTuneError(f"ToMe inflection {inflect} is outside [-1, 1]; use -1 (decreasing) .. +1 (increasing)")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(num_layers - 1, 1)
        values = [int(lo + step * i) for i in range(num_layers)]
    elif isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if len(values) > num_layers:
            raise TokenTuneError(
                f"ToMe schedule has {len(values)} entries but the model has {num_layers} blocks; "
                f"give at most {num_layers} values")
        values = values + [0] * (num_layers - len(values))
    else:
        raise TokenTuneError(f"invalid ToMe schedule {r!r}: give an int, a per-layer list or (r, inflect)")
    if any(v < 0 for v in values):
        raise TokenTuneError(f"ToMe schedule {values} has a negative entry; every r must be >= 0")
    return values


def fit_schedule(schedule: Sequence[int], num_tokens: int, num_prefix: int, strict: bool) -> List[int]:
    """Check (``strict``) or cap a per-layer schedule against the token count it will see.

    Capping is ToMe's own rule for an int ``r`` (e.g. ``r=16`` on ViT-B/16 merges only 10 tokens
    in the last block). An explicit per-layer list must fit exactly: a value that cannot be merged
    is an error, because methods with per-layer parameters (PYRA) depend on it.
    """
    fitted, n = [], num_tokens
    for layer, r in enumerate(schedule):
        cap = max_merge(n, num_prefix)
        if r > cap:
            if strict:
                raise TokenTuneError(
                    f"merge schedule asks for r={r} in block {layer} but only {cap} of its {n} tokens can merge "
                    f"({num_prefix} protected); lower that entry (tokens per block: {token_counts(fitted, num_tokens)})")
            r = cap
        fitted.append(r)
        n -= r
    return fitted


def schedule_for_keep_ratio(ratio: float, num_tokens: int, depth: int, num_prefix: int,
                            count_prefix: bool = False) -> List[int]:
    """The per-block merge counts of a keep ratio (PiToMe's and ToFu's rate): a block entering with
    ``n`` tokens merges ``floor(T - T * ratio)`` of them, ``T = n - num_prefix`` (PiToMe: the CLS
    token is not counted) or ``T = n`` (``count_prefix``, ToFu), capped by what one bipartite step
    can merge (:func:`~tokentune.methods.tome.matching.max_merge`)."""
    schedule, n = [], num_tokens
    for _ in range(depth):
        t = n if count_prefix else n - num_prefix
        r = min(max(math.floor(t - t * ratio), 0), max_merge(n, num_prefix))
        schedule.append(r)
        n -= r
    return schedule


# ----------------------------------------------------------------------------- named schedules
# Per-layer schedules of the PYRA reference implementation (224x224, patch 16):
# "low" ~1.7x and "high" ~3.2x speed-up on GPU.
NAMED_SCHEDULES = {
    "vit_base_patch16_224": {
        "low": [16] * 11 + [10],
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
    "vit_large_patch16_224": {
        "low": [8] * 23 + [6],
        "high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    },
    "deit_base_distilled_patch16_224": {
        "low": [16] * 6 + [10] * 6,
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
}
# architectures that share a schedule table (same depth, patch size and token count)
_SCHEDULE_ALIASES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224",
}


def named_schedule(model_name: str, name: str, num_layers: int) -> List[int]:
    """The reference ``"low"``/``"high"`` schedule of a backbone (pretrained tag ignored)."""
    arch = model_name.split(".")[0]
    arch = _SCHEDULE_ALIASES.get(arch, arch)
    table = NAMED_SCHEDULES.get(arch)
    if table is None or name not in table:
        known = ", ".join(sorted(NAMED_SCHEDULES))
        raise TokenTuneError(
            f"no {name!r} merge schedule for {arch!r} (named schedules exist for {known}); "
            "give tome_r as an int, a per-layer list or (r, inflect)")
    schedule = list(table[name])
    if len(schedule) != num_layers:
        raise TokenTuneError(f"the {name!r} schedule of {arch} has {len(schedule)} entries but the model has "
                             f"{num_layers} blocks")
    return schedule


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


def resolve_target(model: nn.Module, spec: str, dims: Optional[ViTDims] = None) -> Optional[List[int]]:
    """The schedule a ``tome_r`` target string asks for on ``model`` (None: not a target string);
    ``dims`` replaces the model's own dimensions (a merge metric with a cost of its own: DTEM)."""
    parsed = parse_target(spec)
    if parsed is None:
        return None
    kind, value, profile = parsed
    dims = dims if dims is not None else ViTDims.from_model(model)
    if kind == "tokens":
        return schedule_for_tokens(dims.num_tokens, dims.depth, int(value), dims.num_prefix, profile)
    return schedule_for_flops(dims, value, profile)
