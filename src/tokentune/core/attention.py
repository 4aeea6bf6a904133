"""Attention through timm's own ``Attention`` submodules, with an additive bias (proportional
attention, hidden keys) on SDPA or the explicit softmax."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from ..errors import TokenTuneError


# ----------------------------------------------------------------------------- attention
def check_attention(attn: nn.Module) -> None:
    """Raise a clear error for attention modules this layer cannot drive."""
    needed = ("q_norm", "k_norm", "proj", "proj_drop", "attn_drop", "num_heads", "head_dim", "scale")
    missing = [n for n in needed if not hasattr(attn, n)]
    if not isinstance(getattr(attn, "qkv", None), nn.Module) and not all(
            isinstance(getattr(attn, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj")):
        missing.append("qkv or q_proj/k_proj/v_proj")
    if missing:
        raise TokenTuneError(
            f"unsupported attention module {type(attn).__name__} (no {', '.join(missing)}); "
            "tokentune supports timm ViTs built from timm.layers.Attention (vit_*, deit_*, ...) and timm's Eva "
            "attention (EvaAttention, AttentionRope)")


def project_qkv(attn: nn.Module, x: torch.Tensor):
    """Queries, keys and values [B, heads, N, head_dim] through the module's own projections.

    timm's ``Attention`` (fused ``qkv`` with its bias), ``EvaAttention`` (fused ``qkv`` without bias
    plus ``q_bias``/``k_bias``/``v_bias``, or separate ``q_proj``/``k_proj``/``v_proj``) and
    ``AttentionRope`` (either, with fewer key/value heads for grouped-query attention). A plain
    ``nn.Linear`` runs exactly as timm runs it; a wrapped one (LoRA) is called as a module so its
    update applies, with Eva's separate biases added after it.
    """
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    qkv_layer = getattr(attn, "qkv", None)
    if qkv_layer is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = qkv_layer(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if getattr(attn, "qkv_bias_separate", False) or type(qkv_layer) is not nn.Linear:
                qkv = qkv_layer(x) + bias
            else:                                    # timm's own call: the bias inside F.linear
                qkv = F.linear(x, weight=qkv_layer.weight, bias=bias)
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    kv_heads = getattr(attn, "num_kv_heads", H)
    q = attn.q_proj(x).reshape(B, N, H, D).transpose(1, 2)
    k = attn.k_proj(x).reshape(B, N, kv_heads, D).transpose(1, 2)
    v = attn.v_proj(x).reshape(B, N, kv_heads, D).transpose(1, 2)
    return q, k, v


def rotate(attn: nn.Module, t: torch.Tensor, rope: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """timm's rotation of queries or keys [B, heads, N, head_dim]: every token after the
    ``num_prefix`` prefix tokens by its row of ``rope`` [Bt, H', N - p, 2 head_dim]."""
    half = bool(getattr(attn, "rotate_half", False))
    return torch.cat([t[:, :, :num_prefix], apply_rot_embed_cat(t[:, :, num_prefix:], rope, half=half)], dim=2)


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


def softmax_sized(logits: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Size-weighted attention [B, H, N, N]: ``A_ij = exp(l_ij - max_j l_ij) s_j / sum_j exp(l_ij - max_j l_ij) s_j``.

    DTEM's attention (movinghoon/DTEM@13f20463, ``dtem/dtem.py:80-82``, "as in DynamicViT"), in
    float32 as there. With every ``s_j > 0`` it equals ``softmax(l + log s)`` (proportional
    attention); unlike the log bias it stays exact and differentiable where soft merging left a
    size at 0 (the key is hidden, and the gradient still reaches ``s``).
    """
    weights = (logits - logits.max(dim=-1, keepdim=True)[0]).to(torch.float32).exp()
    weights = weights * size[:, None, None, :].to(torch.float32)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype)


# At most this many tokens, one image, the explicit softmax beats SDPA on the CPU: 2-19% at 11-100 tokens
# with ViT-B's 12 heads of 64, and it loses 1.8-2.2x at 150-197 (``benchmarks/attention_batch1.py``,
# BENCHMARKS.md). Token reduction spends most blocks there (ToMe high: 9 of 12 blocks under 100 tokens).
EXPLICIT_MAX_TOKENS = 100


def explicit_is_faster(q: torch.Tensor) -> bool:
    """Whether the explicit softmax should replace SDPA for queries ``q`` [B, heads, N, head_dim]: one
    image of at most :data:`EXPLICIT_MAX_TOKENS` tokens in float32 on the CPU (what was measured),
    without autograd (no attention map is kept for a backward) and outside tracing, compiling and
    export (their graphs keep SDPA)."""
    return (q.shape[0] == 1 and q.shape[2] <= EXPLICIT_MAX_TOKENS and q.device.type == "cpu"
            and q.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export())


def attention(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
              return_keys: bool = False, policy: Optional[torch.Tensor] = None,
              return_cls_attn: bool = False, rope: Optional[torch.Tensor] = None, num_prefix: int = 0,
              key_weight: Optional[torch.Tensor] = None):
    """Run timm's ``Attention`` module on ``x`` [B, N, C] with an optional additive bias.

    Calls the module's own ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate`` and ``proj``; uses
    SDPA when the module's ``fused_attn`` is set (the bias becomes SDPA's float ``attn_mask``)
    and the explicit softmax otherwise, or where the explicit form is the faster one
    (:func:`explicit_is_faster`: one image of few tokens at inference on the CPU). ``bias``
    broadcasts to [B, heads, N, N] (e.g. log token
    sizes [B, 1, 1, N], or -inf for keys that must be ignored). ``policy`` [B, N] (training-time
    token pruning, see :attr:`TokenState.policy`) hides dropped keys with
    :func:`softmax_with_policy`, always on the explicit path. ``key_weight`` [B, N] (soft token
    sizes, :attr:`TokenState.soft_tokens`) multiplies the softmax numerators
    (:func:`softmax_sized`), also on the explicit path.

    Returns ``(output, keys)``: the attention output and, if ``return_keys``, the keys averaged
    over heads [B, N, head_dim] (the ToMe matching metric; they include LoRA deltas and k_norm).
    With ``return_cls_attn`` it returns ``(output, keys, cls_attn)``, ``cls_attn`` [B, N] being the
    attention of the first token (CLS) to every token, averaged over heads (EViT's token
    importance). Under SDPA that row is computed on its own (one extra ``q_cls K^T`` row per
    head), never the full attention matrix. It is taken before attention dropout (the same when
    ``attn_drop`` is 0, timm's default and the papers' setting).

    ``rope`` [Bt, H', N - num_prefix, 2 head_dim] (timm's Eva family, see :mod:`tokentune.core.rope`)
    rotates the queries and keys of the tokens after the ``num_prefix`` prefix tokens, as timm's
    ``EvaAttention``/``AttentionRope`` do. The returned keys are taken *before* the rotation: the
    rotation encodes where a token is, ToMe matches on what it is (and a merged token keeps its
    destination's rotation, so the matching should not depend on it).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = project_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = k.mean(1) if return_keys else None
    if rope is not None:
        q, k = rotate(attn, q, rope, num_prefix).type_as(v), rotate(attn, k, rope, num_prefix).type_as(v)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:                                   # grouped-query attention: timm's tiling of kv heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    cls_attn = None
    if getattr(attn, "fused_attn", False) and policy is None and key_weight is None and not explicit_is_faster(q):
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
        if policy is not None:
            probs = softmax_with_policy(logits, policy)
        elif key_weight is not None:
            probs = softmax_sized(logits, key_weight)
        else:
            probs = logits.softmax(dim=-1)
        if return_cls_attn:
            cls_attn = probs[:, :, 0].mean(dim=1)
        out = attn.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
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
