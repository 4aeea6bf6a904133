"""Per-forward token state and dispatch decisions: what travels with the tokens from block to block.

A :class:`TokenState` is created per forward and every block returns a new one instead of
mutating it, so gradient checkpointing (which re-runs a block in backward) and re-entrant calls
stay correct. Per-forward switches (``model(x, **options)``) travel in ``TokenState.options``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch


# ----------------------------------------------------------------------------- token state
@dataclass(frozen=True)
class TokenState:
    """Per-forward information that travels with the tokens.

    Attributes:
        num_prefix: prefix tokens at the front (CLS, registers, distillation token); never merged
            or skipped.
        size: [B, N, 1] how many input patches each token stands for (None = all ones).
        source: [B, N, N0] 0/1 map from tokens to input tokens, when ``trace_source`` is on.
        prop_attn: add ``log(size)`` to the attention logits (ToMe's proportional attention).
        trace_source: maintain ``source``.
        policy: [B, N] keep decisions of a training-time token pruner (DynamicViT, DiffRate's
            search): 1 = kept, 0 = dropped, straight-through values that carry the pruner's
            gradient. Every later attention hides the dropped tokens as keys (each token still
            attends to itself) by multiplying the softmax numerators, so the gradient reaches the
            decisions (:func:`tokentune.core.attention.softmax_with_policy`). None = no policy.
        rope: the rotary table of this forward (timm's ``Eva`` family), ``[Bt, L, H', G, E]``
            (see :mod:`tokentune.core.rope`); None for models without rotary embeddings.
        rope_pos: [B, N] the table row of every token (-1 for prefix tokens), moved with the
            tokens by every reduction; None while nothing was reduced (token ``p + j`` at row ``j``).
        rope_identity: the table's appended identity row (no rotation), once a token needs it
            (EViT's fused token); None before.
        soft_tokens: soft merging in training (DTEM): the number of leading tokens that still take
            part in matching; the tokens after them were merged away softly and stay in the sequence
            with sizes near or at 0. While set, attention weights every key by its size by
            multiplying the softmax numerators (:func:`tokentune.core.attention.softmax_sized`: exact
            and differentiable at size 0, where a ``log(size)`` bias is not). None = hard reduction.
        records: one dict per block that recorded something (token counts, DyT masks, ...).
        options: per-forward switches passed as ``model(x, **options)`` (e.g. a method's
            "complete model" pass); read by plug-ins, never by the composition layer.
    """

    num_prefix: int
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    prop_attn: bool = False
    trace_source: bool = False
    policy: Optional[torch.Tensor] = None
    rope: Optional[torch.Tensor] = None
    rope_pos: Optional[torch.Tensor] = None
    rope_identity: Optional[int] = None
    soft_tokens: Optional[int] = None
    records: Tuple[Dict[str, Any], ...] = ()
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> "TokenState":
        return dataclasses.replace(self, **changes)

    def record(self, **items) -> "TokenState":
        return dataclasses.replace(self, records=self.records + (items,))

    def attn_bias(self) -> Optional[torch.Tensor]:
        """Additive attention bias [B, 1, 1, N] for proportional attention, or None (also while
        sizes are soft: :meth:`key_weight` weights the keys then)."""
        if not self.prop_attn or self.size is None or self.soft_tokens is not None:
            return None
        return self.size.log().transpose(1, 2).unsqueeze(1)

    def key_weight(self) -> Optional[torch.Tensor]:
        """[B, N] sizes that multiply the attention's softmax numerators while sizes are soft
        (:attr:`soft_tokens`, with proportional attention), else None."""
        if not self.prop_attn or self.size is None or self.soft_tokens is None:
            return None
        return self.size[..., 0]


@dataclass
class Dispatch:
    """Which tokens take part in a skippable computation, as decided by a token dispatcher.

    Attributes:
        active: [B, N] bool, the hard decision (prefix tokens are always active).
        gate: [B, N] float multiplier for the mask-multiply path; in training the straight-through
            estimator (forward values exactly 0/1, gradient of the soft mask). None = ``active``.
        skip: compute the active tokens only (gather, compute, scatter back) instead of
            multiplying by the mask; inference only, it carries no gradient to the dispatcher.
        index: [B, K] token positions to compute, the same number ``K`` for every image (static
            shapes: no host sync, traceable; see :func:`tokentune.core.skip.capacity_index`).
            When given, only these tokens are computed and each keeps its update where
            ``active`` holds; a token outside ``index`` gets no update even if ``active``
            (the dispatcher should fold that into ``active``). Inference only; overrides ``skip``.
    """

    active: torch.Tensor
    gate: Optional[torch.Tensor] = None
    skip: bool = False
    index: Optional[torch.Tensor] = None

    def multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """[B, N, 1] mask to multiply an update by."""
        gate = self.gate if self.gate is not None else self.active.to(like.dtype)
        return gate.unsqueeze(-1)
