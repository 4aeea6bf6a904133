"""Attention through timm's own ``Attention`` submodules, with an additive bias (proportional
attention, hidden keys) on SDPA or the explicit softmax."""
from __future__ import annotations

import math
from typing import Optional

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


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention weights [B, H, N, N] with dropped keys hidden by multiplying the numerators.

    DynamicViT's masked softmax (Rao et al., NeurIPS 2021, Eq. 7; DiffRate reuses it), with
    ``G_ij = policy_j`` for ``j != i`` and ``G_ii = 1``::

        A_ij = (exp(l_ij - max_j l_ij) G_ij + eps / N) / (sum_j exp(l_ij - max_j l_ij) G_ij + eps)

    computed in float32 (as the reference, "for stable training"). Because ``policy`` multiplies
    the numerators (instead of an additive -inf), the gradient reaches the keep decisions.
    """
    B, N = policy.shape
    keep = policy.reshape(B, 1, 1, N).to(torch.float32)
    eye = torch.eye(N, dtype=torch.float32, device=logits.device).view(1, 1, N, N)
    keep = keep + (1.0 - keep) * eye
    shifted = logits - logits.max(dim=-1, keepdim=True)[0]
    weights = shifted.to(torch.float32).exp() * keep
    return ((weights + eps / N) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


def attention(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
              return_keys: bool = False, policy: Optional[torch.Tensor] = None,
              return_cls_attn: bool = False):
    """Run timm's ``Attention`` module on ``x`` [B, N, C] with an optional additive bias.

    Calls the module's own ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate`` and ``proj``; uses
    SDPA when the module's ``fused_attn`` is set (the bias becomes SDPA's float ``attn_mask``)
    and the explicit softmax otherwise. ``bias`` broadcasts to [B, heads, N, N] (e.g. log token
    sizes [B, 1, 1, N], or -inf for keys that must be ignored). ``policy`` [B, N] (training-time
    token pruning, see :attr:`TokenState.policy`) hides dropped keys with
    :func:`softmax_with_policy`, always on the explicit path.

    Returns ``(output, keys)``: the attention output and, if ``return_keys``, the keys averaged
    over heads [B, N, head_dim] (the ToMe matching metric; they include LoRA deltas and k_norm).
    With ``return_cls_attn`` it returns ``(output, keys, cls_attn)``, ``cls_attn`` [B, N] being the
    attention of the first token (CLS) to every token, averaged over heads (EViT's token
    importance). Under SDPA that row is computed on its own (one extra ``q_cls K^T`` row per
    head), never the full attention matrix. It is taken before attention dropout (the same when
    ``attn_drop`` is 0, timm's default and the papers' setting).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    cls_attn = None
    if getattr(attn, "fused_attn", False) and policy is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        if return_cls_attn:
            row = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)          # [B, H, 1, N]
            if bias is not None:
                row = row + bias[..., :1, :]
            cls_attn = row.softmax(dim=-1)[:, :, 0].mean(dim=1)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1) if policy is None else softmax_with_policy(logits, policy)
        if return_cls_attn:
            cls_attn = probs[:, :, 0].mean(dim=1)
        out = attn.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    keys = k.mean(1) if return_keys else None
    return (out, keys, cls_attn) if return_cls_attn else (out, keys)


def key_mask_bias(active: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, N] that hides inactive keys (and adds ``bias``).

    An image without any active token keeps all its keys (its softmax would be empty); every
    update of such an image is gated to zero anyway.
    """
    hide = ~active & active.any(dim=1, keepdim=True)
    mask = torch.zeros(active.shape, dtype=torch.float32, device=active.device).masked_fill(hide, -math.inf)
    mask = mask[:, None, None, :]
    return mask if bias is None else bias + mask
