"""Real token skipping: a block's attention or MLP computed on the active tokens only.

Used by :class:`~tokentune.core.block.AdaptedBlock` in inference when a dispatcher asks to skip.
Two executions:

* ``Dispatch.skip`` (:func:`attention_active`, :func:`mlp_active`): the active tokens of the whole
  batch are gathered, computed once, and their results written back, so inactive tokens cost
  nothing. How many tokens that is depends on the data: the sizes are read on the host (a device
  sync) and a traced graph cannot hold them.
* ``Dispatch.index`` (:func:`attention_indexed`, :func:`mlp_indexed`): every image computes the
  same number ``K`` of tokens, chosen by the dispatcher (e.g. its top-``K`` by score,
  :func:`capacity_index`); a chosen token that is not active keeps its input. Every shape is
  static: no host sync, ``torch.compile`` without graph breaks, ``torch.export``, ONNX and CUDA
  graphs hold it, and the cost is fixed by ``K``.

Both equal the mask-multiply path on the same decisions (tested).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .attention import attention, key_mask_bias
from .state import TokenState


def attention_active(block: nn.Module, x: torch.Tensor, state: TokenState, active: torch.Tensor) -> torch.Tensor:
    """Attention among the active tokens of each image only, batched.

    The active tokens of every image are gathered to the front (original order kept; prefix tokens
    are always active, so they stay first), with their rotary rows (RoPE models),
    padded to the largest active count in the batch and hidden as keys where padded;
    padded rows (inactive tokens) get exactly their input back, the others their update.
    """
    B, N, C = x.shape
    counts = active.sum(dim=1)
    k = int(counts.max())
    if k == 0:
        return x
    if k == N and bool(active.all()):
        return block._attention_step(x, state, None)[0]
    order = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :k]   # active first
    rows = (order + torch.arange(B, device=x.device)[:, None] * N).reshape(-1)    # distinct rows of (B*N, C)
    flat = x.reshape(B * N, C)
    xs = flat.index_select(0, rows).view(B, k, C)
    bias = state.attn_bias()
    if bias is not None:
        bias = bias.gather(-1, order[:, None, None, :])
    valid = None
    if B > 1 and int(counts.min()) < k:
        valid = torch.arange(k, device=x.device)[None, :] < counts[:, None]
        bias = key_mask_bias(valid, bias)
    h, _ = attention(block.attn, block.norm1(xs), bias=bias, **block.rope_args(x, state, order))
    update = block.drop_path1(block.ls1(h)).to(x.dtype)
    if valid is not None:
        update = torch.where(valid.unsqueeze(-1), update, torch.zeros((), dtype=x.dtype, device=x.device))
    # index_copy of (x + update) is much faster on CPU than index_add/scatter_add
    return flat.clone().index_copy_(0, rows, (xs + update).reshape(-1, C)).view(B, N, C)


def mlp_active(block: nn.Module, x: torch.Tensor, active: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The MLP on the active tokens of the whole batch at once: flatten to (B*N, C), gather
    the active rows, run norm2 + MLP once, write ``x + update`` back at those rows (into ``x``
    itself when ``inplace`` and autograd cannot need it, else into a copy)."""
    B, N, C = x.shape
    flat = x.reshape(B * N, C)
    rows = active.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    if rows.numel() == B * N:
        return block._mlp_step(x, None)
    picked = flat.index_select(0, rows)
    update = block.drop_path2(block.ls2(block.mlp(block.norm2(picked))))
    # index_copy of (x + update) is much faster on CPU than index_add/scatter_add
    out = flat if inplace and not torch.is_grad_enabled() else flat.clone()
    return out.index_copy_(0, rows, picked + update.to(x.dtype)).view(B, N, C)


# ----------------------------------------------------------------------------- static shapes
def capacity_index(scores: torch.Tensor, k: int, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring patch tokens of every image, as static-shape positions.

    Args:
        scores: [B, M] a score per patch token (``M = N - num_prefix``), e.g. a dispatcher's logit.
        k: patch tokens per image (clipped to [0, M]); a Python int, so every shape is fixed.
        num_prefix: prefix tokens in front of the patch tokens (always included).

    Returns:
        ``index`` [B, num_prefix + k]: token positions (prefix tokens, then the chosen patch
        tokens in their original order), for :attr:`~tokentune.core.state.Dispatch.index`;
        ``chosen`` [B, M] bool: which patch tokens are among them.
    """
    B, M = scores.shape
    k = max(0, min(int(k), M))
    top = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values      # original order
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, num_prefix)
    return torch.cat([prefix, top + num_prefix], dim=1), chosen


def _flat_rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, K] positions -> [B * K] rows of ``x.reshape(B * N, C)`` (one image: the positions themselves;
    a traced graph keeps the general form, whose batch may vary)."""
    if not torch.compiler.is_compiling() and index.shape[0] == 1:
        return index.reshape(-1)
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * num_tokens).reshape(-1)


def attention_indexed(block: nn.Module, x: torch.Tensor, state: TokenState, active: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
    """Attention among the ``index`` tokens of each image ([B, K] distinct positions), static shapes.

    The chosen tokens are gathered (``K`` per image); chosen tokens that are not ``active`` are
    hidden as keys and keep their input, so on the active tokens this is :func:`attention_active`
    whenever every active token is chosen. Tokens not chosen keep their input.
    """
    B, N, C = x.shape
    K = index.shape[1]
    if K == 0:
        return x
    bias = state.attn_bias()
    if K == N:                                      # every token chosen: no gather needed
        h, _ = attention(block.attn, block.norm1(x), bias=key_mask_bias(active, bias), **block.rope_args(x, state))
        update = block.drop_path1(block.ls1(h)).to(x.dtype)
        return torch.where(active.unsqueeze(-1), x + update, x)
    valid = active.gather(1, index)
    rows = _flat_rows(index, N)
    flat = x.reshape(B * N, C)
    xs = flat.index_select(0, rows).view(B, K, C)
    if bias is not None:
        bias = bias.gather(-1, index[:, None, None, :])
    h, _ = attention(block.attn, block.norm1(xs), bias=key_mask_bias(valid, bias), **block.rope_args(x, state, index))
    update = block.drop_path1(block.ls1(h)).to(x.dtype)
    new = torch.where(valid.unsqueeze(-1), xs + update, xs)
    return flat.clone().index_copy_(0, rows, new.reshape(B * K, C)).view(B, N, C)


def mlp_indexed(block: nn.Module, x: torch.Tensor, active: torch.Tensor, index: torch.Tensor,
                inplace: bool = False) -> torch.Tensor:
    """The MLP on the ``index`` tokens of each image ([B, K] distinct positions), static shapes:
    ``B * K`` rows gathered, norm2 + MLP once, ``x + update`` written back where ``active``
    (chosen but inactive rows keep their input; into ``x`` itself when ``inplace`` and autograd
    cannot need it)."""
    B, N, C = x.shape
    K = index.shape[1]
    if K == 0:
        return x
    if K == N:                                      # every token chosen: no gather needed
        update = block.drop_path2(block.ls2(block.mlp(block.norm2(x)))).to(x.dtype)
        return torch.where(active.unsqueeze(-1), x + update, x)
    keep = active.gather(1, index).reshape(B * K, 1)
    rows = _flat_rows(index, N)
    flat = x.reshape(B * N, C)
    picked = flat.index_select(0, rows)
    update = block.drop_path2(block.ls2(block.mlp(block.norm2(picked)))).to(x.dtype)
    out = flat if inplace and not torch.is_grad_enabled() else flat.clone()
    return out.index_copy_(0, rows, torch.where(keep, picked + update, picked)).view(B, N, C)
