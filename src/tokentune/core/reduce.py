"""Token reduction by pruning, whatever method decides it: the :class:`TokenReducer` plug-in base
class (a block's ``reduce`` slot) and the one helper that keeps a subset of the tokens.

A reducer (EViT's keep/fuse, DynamicViT's predictor) has two entry points, both returning
``(x, state)``: :meth:`TokenReducer.before_attention` runs at the block input (DynamicViT
predicts there, before the block's attention) and :meth:`TokenReducer.forward` between attention
and MLP, where ToMe merges (EViT prunes there, by the attention the block just computed; with
``needs_cls_attn`` the block passes the CLS attention row, see
:func:`tokentune.core.attention.attention`). Prefix tokens (CLS, registers, distillation token,
prompts) are always kept, at the front and in their order.

Keeping tokens goes through :func:`keep_tokens`, which carries the token state along: token sizes,
the token -> input-patch map, a training-time policy and the rotary rows (RoPE models) are gathered
with the tokens, and a fused token (EViT) gets the sizes and sources of everything it stands for
and no rotation (:mod:`tokentune.core.rope`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..utils import unwrap_model
from .rope import identity_row, keep_rope
from .state import TokenState


class TokenReducer(nn.Module):
    """Base class of the ``reduce`` plug-in of :class:`~tokentune.core.block.AdaptedBlock`.

    Attributes:
        needs_cls_attn: the block computes the CLS attention row for :meth:`forward`.
        runs_attention: the reducer runs the block's attention itself (:meth:`attention`), e.g. to
            reduce the tokens with attention computed before the reduction (MCTF's one-step-ahead
            attention); the block then adds the update it returns.
        merges: the reducer only merges tokens (every input patch keeps a token that stands for it,
            so merged groups can be drawn: ``tokentune viz merge``).
    """

    needs_cls_attn: bool = False
    runs_attention: bool = False
    merges: bool = False

    def before_attention(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        """At the block input, before attention (default: nothing)."""
        return x, state

    def attention(self, block: nn.Module, x: torch.Tensor,
                  state: TokenState) -> Tuple[torch.Tensor, TokenState, torch.Tensor]:
        """With :attr:`runs_attention`: reduce the block input ``x`` and compute the attention update
        of the reduced tokens through the block's own modules; returns ``(x, state, update)``, the
        block adds ``drop_path1(ls1(update))`` to ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: TokenState,
                cls_attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, TokenState]:
        """Between attention and MLP; ``cls_attn`` [B, N] when :attr:`needs_cls_attn` (default: nothing)."""
        return x, state


def reducers(model: nn.Module) -> List[TokenReducer]:
    """Every :class:`TokenReducer` of the model, in block order."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, TokenReducer)]


def top_order(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the ``k`` highest entries of ``score`` [B, n], highest first, equal scores
    by the lower index first, in eager mode and in an exported graph alike.

    Eager: a stable descending sort. Under ``torch.export`` (the ONNX export): ``topk`` over the
    whole row, which the exporter emits as ONNX ``TopK``, whose documented rule for equal
    elements is the same (lower index first; onnxruntime follows it); ``aten.sort.stable`` has
    no ONNX translation. Without the rule, PyTorch's unstable sort and ``TopK`` keep different
    tokens where scores tie (e.g. saturated keep probabilities).
    """
    if torch.compiler.is_exporting():
        return score.topk(score.shape[1], dim=1, sorted=True)[1][:, :k]
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]


def _rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] token indices -> flat row indices into a (B * n, ...) view."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * n).reshape(-1)


def keep_tokens(x: torch.Tensor, state: TokenState, keep: torch.Tensor,
                fused: Optional[torch.Tensor] = None, fused_from: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, TokenState]:
    """Keep the prefix tokens and the non-prefix tokens ``keep`` [B, K] (indices among the
    non-prefix tokens, in the order given), optionally followed by one ``fused`` token [B, 1, C].

    ``fused_from`` [B, M] (the non-prefix tokens the fused token stands for) gives its size (the
    sum) and its sources (their union) when the state tracks them. Returns the new tokens
    [B, p + K (+ 1), C] and the state with sizes, sources and policy gathered alike.
    """
    B, N, C = x.shape
    p = state.num_prefix
    prefix = torch.arange(p, device=x.device).expand(B, p)
    index = torch.cat([prefix, keep + p], dim=1)                        # [B, p + K] token indices
    rows = _rows(index, N)
    out = x.reshape(B * N, C).index_select(0, rows).view(B, -1, C)
    changes = {}
    if state.policy is not None:
        changes["policy"] = state.policy.reshape(B * N).index_select(0, rows).view(B, -1)
    size, source = state.size, state.source
    if state.trace_source and source is None:
        source = torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
    if size is not None:
        changes["size"] = size.reshape(B * N, 1).index_select(0, rows).view(B, -1, 1)
    if source is not None:
        changes["source"] = source.reshape(B * N, -1).index_select(0, rows).view(B, index.shape[1], -1)
    changes.update(keep_rope(state, rows, B, N))
    if fused is not None:
        if fused_from is None:
            raise ValueError("a fused token needs fused_from, the tokens it stands for")
        out = torch.cat([out, fused], dim=1)
        from_rows = _rows(fused_from + p, N)
        m = fused_from.shape[1]
        if size is not None:
            extra = size.reshape(B * N, 1).index_select(0, from_rows).view(B, m, 1).sum(1, keepdim=True)
            changes["size"] = torch.cat([changes["size"], extra], dim=1)
        if source is not None:
            extra = source.reshape(B * N, -1).index_select(0, from_rows).view(B, m, -1).amax(1, keepdim=True)
            changes["source"] = torch.cat([changes["source"], extra], dim=1)
        if "policy" in changes:
            changes["policy"] = torch.cat([changes["policy"], changes["policy"].new_ones(B, 1)], dim=1)
        if "rope_pos" in changes:                    # no rotation for a mixture of patches from anywhere
            table, row = identity_row(state)
            changes.update(table)
            changes["rope_pos"] = torch.cat([changes["rope_pos"], changes["rope_pos"].new_full((B, 1), row)], dim=1)
    return out, state.replace(**changes)
