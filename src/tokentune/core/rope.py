"""Rotary position embeddings (timm's ``Eva`` family: EVA-02, DINOv3, ``vit_*_rope_*``) that travel
with the tokens when they are merged, pruned or skipped.

timm's ``Eva._pos_embed`` returns the rotary table of the patch grid beside the tokens, and every
attention rotates the queries and keys of the non-prefix tokens by their rows (prefix tokens: CLS,
registers, VPT prompts, are never rotated). Once tokens are merged, pruned or gathered, token ``j``
no longer sits at grid row ``j``. So the token state carries

* ``TokenState.rope``: the forward's table, canonical shape ``[Bt, L, H', G, E]`` (``Bt`` 1, or the
  batch after timm's patch dropout; ``L`` 1, or the depth for mixed RoPE, whose frequencies differ
  per block; ``H'`` 1, or the heads for mixed RoPE; ``G`` grid rows; ``E`` = 2 x head_dim, sin
  and cos concatenated as ``timm.layers.apply_rot_embed_cat`` takes them), and
* ``TokenState.rope_pos``: ``[B, N]`` the table row of every token (prefix entries are -1 and
  never read); None while token ``p + j`` still sits at row ``j`` (nothing reduced yet), so the
  identity settings run timm's own broadcast of the table, exactly.

Reductions move ``rope_pos`` with the tokens, the same rows as the token sizes (an int per token;
the table itself is never copied per token, and a block gathers only the rows of its own tokens).
Rules for a token that stands for several patches:

* a ToMe/PYRA (and DiffRate) merge: the destination keeps its own rotation; its sources fold into
  it (a merged token stays where its destination patch was, as its destination's key does in the
  matching);
* EViT's fused token: no rotation (an identity row, sin 0 and cos 1, appended to the table once);
  it is an attention-weighted mixture of patches from anywhere in the image, and no single position
  is right for it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .state import TokenState


def rope_table(rot: Optional[torch.Tensor], mixed: bool) -> Optional[torch.Tensor]:
    """timm's ``Eva._pos_embed`` rotary output -> the canonical ``[Bt, L, H', G, E]`` table.

    timm's shapes: ``[G, E]`` (cat, DINOv3), ``[L, H, G, E]`` (mixed); after patch dropout
    ``[B, 1, n, E]`` and ``[L, B, H, n, E]``.
    """
    if rot is None:
        return None
    if mixed:
        return rot.unsqueeze(0) if rot.ndim == 4 else rot.transpose(0, 1)
    if rot.ndim == 2:
        return rot[None, None, None]
    return rot.unsqueeze(1)                               # [B, 1, n, E] -> [B, 1, 1, n, E]


def positions(state: TokenState, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """``[B, N]`` table row of every token (-1 for prefix tokens)."""
    if state.rope_pos is not None:
        return state.rope_pos
    p = state.num_prefix
    row = torch.cat([torch.full((p,), -1, dtype=torch.long, device=device),
                     torch.arange(tokens - p, dtype=torch.long, device=device)])
    return row.expand(batch, tokens)


def rope_rows(state: TokenState, layer: int, batch: int, tokens: int,
              index: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The rotary rows of the non-prefix tokens for block ``layer``: ``[Bt, H', N - p, E]``, or None
    without rotary embeddings.

    ``index`` [B, K] (token positions, prefix tokens first) selects the tokens a gathered attention
    runs on (DyT's skipping); the result then covers its ``K - p`` non-prefix tokens.
    """
    table = state.rope
    if table is None:
        return None
    table = table[:, layer if table.shape[1] > 1 else 0]             # [Bt, H', G, E]
    if index is None and state.rope_pos is None:
        return table                                                 # timm's own broadcast, untouched
    device = table.device
    pos = positions(state, batch, tokens, device)
    if index is not None:
        pos = pos.gather(1, index)
    pos = pos[:, state.num_prefix:]                                  # [B, n]
    B, n = pos.shape
    table = table.expand(B, *table.shape[1:])
    return table.gather(2, pos[:, None, :, None].expand(B, table.shape[1], n, table.shape[-1]))


def keep_rope(state: TokenState, rows: torch.Tensor, batch: int, tokens: int) -> Dict[str, Any]:
    """State changes for keeping the tokens at flat rows ``rows`` of ``x.reshape(B * N, C)``
    (prefix tokens included, in output order): ``{"rope_pos": ...}``, or {} without rotary embeddings."""
    if state.rope is None:
        return {}
    pos = positions(state, batch, tokens, rows.device)
    return {"rope_pos": pos.reshape(batch * tokens).index_select(0, rows).view(batch, -1)}


def reorder_rope(state: TokenState, index: torch.Tensor, tokens: int) -> Dict[str, Any]:
    """State changes for ``tokens`` tokens reordered (or kept) by ``index`` [B, K] (token positions)."""
    if state.rope is None:
        return {}
    return {"rope_pos": positions(state, index.shape[0], tokens, index.device).gather(1, index)}


def identity_row(state: TokenState) -> Tuple[Dict[str, Any], int]:
    """State changes that give the table an identity row (no rotation: sin 0, cos 1), and its row.

    The row is appended once per forward and kept (``TokenState.rope_identity``).
    """
    table = state.rope
    if state.rope_identity is not None:
        return {}, state.rope_identity
    E = table.shape[-1]
    ident = torch.cat([table.new_zeros(E // 2), table.new_ones(E - E // 2)]).expand(*table.shape[:-2], 1, E)
    row = table.shape[-2]
    return {"rope": torch.cat([table, ident], dim=-2), "rope_identity": row}, row
