"""Real token skipping: a block's attention or MLP computed on the active tokens only.

Used by :class:`~tokentune.core.block.AdaptedBlock` in inference when a dispatcher asks to skip
(``Dispatch.skip``): the active tokens of the whole batch are gathered, computed once, and their
results written back, so inactive tokens cost nothing. Equal to the mask-multiply path (tested).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention, key_mask_bias
from .state import TokenState


def attention_active(block: nn.Module, x: torch.Tensor, state: TokenState, active: torch.Tensor) -> torch.Tensor:
    """Attention among the active tokens of each image only, batched.

    The active tokens of every image are gathered to the front (original order kept),
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
    h, _ = attention(block.attn, block.norm1(xs), bias=bias)
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
