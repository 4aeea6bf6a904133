"""Attention through timm's own ``Attention`` submodules, with an additive bias (proportional
attention, hidden keys) on SDPA or the explicit softmax."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TokenTuneError


# ----------------------------------------------------------------------------- attention
def check_attention(attn: nn.Module) -> None:
    """Raise a clear error for attention modules this layer cannot drive."""
    needed = ("qkv", "q_norm", "k_norm", "proj", "proj_drop", "attn_drop", "num_heads", "head_dim", "scale")
    missing = [n for n in needed if not hasattr(attn, n)]
    if missing:
        raise TokenTuneError(
            f"unsupported attention module {type(attn).__name__} (no {', '.join(missing)}); "
            "tokentune supports timm ViTs built from timm.layers.Attention (vit_*, deit_*, ...)")


def attention(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
              return_keys: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run timm's ``Attention`` module on ``x`` [B, N, C] with an optional additive bias.

    Calls the module's own ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate`` and ``proj``; uses
    SDPA when the module's ``fused_attn`` is set (the bias becomes SDPA's float ``attn_mask``)
    and the explicit softmax otherwise. ``bias`` broadcasts to [B, heads, N, N] (e.g. log token
    sizes [B, 1, 1, N], or -inf for keys that must be ignored).

    Returns the attention output and, if ``return_keys``, the keys averaged over heads
    [B, N, head_dim] (the ToMe matching metric; they include LoRA deltas and k_norm).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if getattr(attn, "fused_attn", False):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, (k.mean(1) if return_keys else None)


def key_mask_bias(active: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, N] that hides inactive keys (and adds ``bias``).

    An image without any active token keeps all its keys (its softmax would be empty); every
    update of such an image is gated to zero anyway.
    """
    hide = ~active & active.any(dim=1, keepdim=True)
    mask = torch.zeros(active.shape, dtype=torch.float32, device=active.device).masked_fill(hide, -math.inf)
    mask = mask[:, None, None, :]
    return mask if bias is None else bias + mask
