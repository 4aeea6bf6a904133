"""The ToMe method: its config, the merge module a block runs, and how the method is applied.

``method="tome"`` (combine with a tuning method: ``lora+tome``, ``adapter+tome``, ``full+tome``)
gives every block with ``r > 0`` a :class:`TokenMerging` between attention and MLP (the matching
itself is in :mod:`tokentune.methods.tome.matching`) and switches on proportional attention. The
fitted per-block schedule is recorded in the build spec and in ``model.tokentune.state["tome"]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
from torch import nn

from ...core.method import Method, register_method
from ...core.rope import keep_rope
from ...core.vit import adapted_blocks, num_input_tokens, num_prefix
from ...errors import TokenTuneError
from ...typecheck import check_fields
from .flops import ViTDims
from .matching import Matching, bipartite_soft_matching, max_merge, merge_source, merge_weighted
from .schedules import PROFILES, Schedule, fit_schedule, named_schedule, parse_schedule, resolve_target, schedule_for_keep_ratio


@dataclass
class ToMeConfig:
    """Token merging options.

    Attributes:
        r: tokens merged per block: an int, a per-layer list, ``(r, inflect)``, a named
            schedule (``"low"``/``"high"``, where the backbone has one), or a target derived for
            this backbone (``"tokens:N"``, ``"flops:X"``, optionally ``":geometric"`` etc.; see
            :mod:`tokentune.methods.tome.schedules`).
        prop_attn: add ``log(size)`` to the attention logits (proportional attention).
        trace_source: record which patches every token stands for (visualisation).
        pool_by_size: with timm's average pool (``global_pool="avg"``: MAE, the ``*_gap`` models),
            weight every token by the number of patches it stands for, as ToMe's MAE patch does
            (``sum_i s_i x_i / N``, ``N`` the patches): the mean over the patches, not over the
            merged tokens. False: timm's unweighted mean over whatever tokens are left. No effect
            with CLS-token or attention-pool heads.
    """

    r: Schedule = 0
    prop_attn: bool = True
    trace_source: bool = False
    pool_by_size: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "tome_")


class TokenMerging(nn.Module):
    """The merge step a block runs between attention and MLP.

    ``r`` is this block's merge count; ``modulator`` (optional) rewrites the sources before the
    merge (PYRA). The module itself has no parameters.
    """

    def __init__(self, r: int, modulator: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.r = int(r)
        self.modulator = modulator

    def extra_repr(self) -> str:
        return f"r={self.r}"

    def forward(self, x: torch.Tensor, keys: torch.Tensor, state):
        r = min(self.r, max_merge(x.shape[1], state.num_prefix))
        if r <= 0:
            return x, state
        if self.modulator is not None and r != self.r:
            raise TokenTuneError(
                f"block expects to merge {self.r} tokens but only {r} of {x.shape[1]} can merge; "
                "the input has fewer tokens than the schedule was built for (rebuild with this image size)")
        m = self.match(keys, r, state.num_prefix)
        source = state.source
        if state.trace_source:
            source = merge_source(source, m, x.shape[1], x)
        rope = keep_rope(state, m.keep, x.shape[0], x.shape[1])      # a destination keeps its own rotation
        x, size = self.combine(x, state.size, m)
        return x, state.replace(size=size, source=source, **rope)

    def match(self, keys: torch.Tensor, r: int, num_prefix: int) -> Matching:
        """Which ``r`` tokens merge into which (ToMe: bipartite soft matching). Methods that merge
        between attention and MLP with another matching (PiToMe) override this."""
        return bipartite_soft_matching(keys, r, num_prefix)

    def combine(self, x: torch.Tensor, size: Optional[torch.Tensor], m: Matching):
        """The merged tokens and their sizes (ToMe: the size-weighted average, PYRA's modulator first).
        Methods with another merge rule (ToFu's pruning and norm-preserving merge) override this."""
        return merge_weighted(x, size, m, self.modulator)


def resolve_merge_schedule(model: nn.Module, r, model_name: str, dims: Optional[ViTDims] = None) -> List[int]:
    """A ToMe schedule (int, list, (r, inflect), name or target string) -> one fitted r per block.

    Named and list schedules must fit the token count exactly; int and (r, inflect) schedules
    are capped per block as ToMe defines them. ``dims`` (FLOPs targets) replaces the model's own
    dimensions, for a merge metric with a cost of its own (DTEM).
    """
    blocks = adapted_blocks(model)
    strict = isinstance(r, (list, str)) or (isinstance(r, tuple) and not (len(r) == 2 and isinstance(r[1], float)))
    if isinstance(r, str):
        target = resolve_target(model, r, dims)     # "tokens:N" / "flops:X" targets
        r = target if target is not None else named_schedule(model_name, r, len(blocks))
    values = parse_schedule(r, len(blocks))
    return fit_schedule(values, num_input_tokens(model), num_prefix(model), strict=strict)


def resolve_rate(model: nn.Module, r, model_name: str, name: str, count_prefix: bool = False) -> List[int]:
    """The rate of a merging method whose papers give a keep ratio (PiToMe, ToFu) -> one fitted r per block.

    A float is the keep ratio of every block (:func:`~.schedules.schedule_for_keep_ratio`; ``count_prefix``:
    the ratio counts the prefix tokens too); anything else is a ToMe schedule
    (:func:`resolve_merge_schedule`: an int, a per-layer list, ``"tokens:N"``, ``"flops:X"``, ...).
    """
    if isinstance(r, float):
        if not 0.5 <= r <= 1.0:
            raise TokenTuneError(f"{name}_r={r} is a keep ratio per block, which one merge step can lower to 0.5 "
                                 f"at most; use a keep ratio in [0.5, 1] (e.g. 0.9), or an int r per block, "
                                 f"'tokens:N' or 'flops:X'")
        blocks = adapted_blocks(model)
        return schedule_for_keep_ratio(r, num_input_tokens(model), len(blocks), num_prefix(model), count_prefix)
    return resolve_merge_schedule(model, r, model_name)


def schedule_of(model: nn.Module) -> List[int]:
    """The fitted per-block merge schedule of a ToMe model (empty without ToMe)."""
    info = getattr(model, "tokentune", None)
    return list((info.state.get("tome") if info is not None else None) or [])


def apply_tome(model: nn.Module, cfg: ToMeConfig, ctx) -> ToMeConfig:
    schedule = resolve_merge_schedule(model, cfg.r, ctx.model_name)
    for block, r in zip(adapted_blocks(model), schedule):
        block.merge = TokenMerging(r) if r > 0 else None
    model.tokentune.prop_attn = cfg.prop_attn
    model.tokentune.trace_source = cfg.trace_source
    model.tokentune.pool_by_size = cfg.pool_by_size
    model.tokentune.state["tome"] = schedule
    return replace(cfg, r=list(schedule))


register_method(Method("tome", ToMeConfig, apply_tome, order=20, reduces_tokens=True, composes_with=("dyt",),
                       training_free=True, rate_option="r", rate_profiles=PROFILES,
                       summary="ToMe token merging between attention and MLP (no parameters)"))
