"""The composition layer: timm's ViT, its own submodules, and one place where methods plug in.

A timm ``VisionTransformer`` keeps its weights, patch embedding, position embedding, prefix
tokens, final norm and head untouched. Each timm ``Block`` is replaced by an
:class:`AdaptedBlock` that *adopts* the block's own ``norm1``/``attn``/``ls1``/``drop_path1``/
``norm2``/``mlp``/``ls2``/``drop_path2`` modules (so parameter names, LayerScale, qk_norm,
fused SDPA and weight loading keep working) and adds optional plug-ins::

    x = x + drop_path1(ls1(attn(norm1(x))))          attn: timm's qkv/q_norm/k_norm/proj + SDPA
    x, state = merge(x, keys, state)                  ToMe / PYRA (between attention and MLP)
    x = x + drop_path2(ls2(mlp(norm2(x)))) + adapter(x)

Token dispatchers (DyT) make attention, the MLP or the whole block *skippable* per token: a
dispatcher returns a :class:`Dispatch` (which tokens take part) and the block either multiplies
the skippable update by the mask (training: the straight-through gate) or gathers the active
tokens, computes them only, and scatters the result back (inference).

A :class:`TokenState` travels with the tokens from block to block. It is created per forward
and every block returns a new one instead of mutating it, so gradient checkpointing (which
re-runs a block in backward) and re-entrant calls stay correct.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import TokenTuneError


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
        records: one dict per block that recorded something (token counts, DyT masks, ...).
        options: per-forward switches passed as ``model(x, **options)`` (e.g. a method's
            "complete model" pass); read by plug-ins, never by the composition layer.
    """

    num_prefix: int
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    prop_attn: bool = False
    trace_source: bool = False
    records: Tuple[Dict[str, Any], ...] = ()
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> "TokenState":
        return dataclasses.replace(self, **changes)

    def record(self, **items) -> "TokenState":
        return dataclasses.replace(self, records=self.records + (items,))

    def attn_bias(self) -> Optional[torch.Tensor]:
        """Additive attention bias [B, 1, 1, N] for proportional attention, or None."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size.log().transpose(1, 2).unsqueeze(1)


@dataclass
class Dispatch:
    """Which tokens take part in a skippable computation, as decided by a token dispatcher.

    Attributes:
        active: [B, N] bool, the hard decision (prefix tokens are always active).
        gate: [B, N] float multiplier for the mask-multiply path; in training the straight-through
            estimator (forward values exactly 0/1, gradient of the soft mask). None = ``active``.
        skip: compute the active tokens only (gather, compute, scatter back) instead of
            multiplying by the mask; inference only, it carries no gradient to the dispatcher.
    """

    active: torch.Tensor
    gate: Optional[torch.Tensor] = None
    skip: bool = False

    def multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """[B, N, 1] mask to multiply an update by."""
        gate = self.gate if self.gate is not None else self.active.to(like.dtype)
        return gate.unsqueeze(-1)


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


# ----------------------------------------------------------------------------- block
_ADOPTED = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class AdaptedBlock(nn.Module):
    """A timm ``Block`` whose submodules are adopted as-is, plus method plug-ins.

    Plug-ins (each None when unused):
        merge: :class:`tokentune.tome.TokenMerging` run between attention and MLP.
        adapter: a module on the post-attention stream, added in parallel with the MLP.
        attn_dispatcher, mlp_dispatcher, layer_dispatcher: token dispatchers (DyT), called as
            ``dispatcher(x, state) -> (Dispatch or None, state)``; they decide which tokens take
            part in attention (as queries, keys and values), in the MLP, or in both (one decision
            for the whole block). None from a dispatcher means every token takes part.
        attn_adapter: a module on the block input, added in parallel with attention.
        layer_adapter: a module on the block input, added in parallel with the whole block.

    With dispatchers the block computes (``M`` the dispatch mask, as in DyT)::

        x1 = x  + M_attn * drop_path1(ls1(attn(norm1(x)))) + attn_adapter(x)
        x1 = merge(x1)
        x2 = x1 + M_mlp  * drop_path2(ls2(mlp(norm2(x1)))) + adapter(x1) + layer_adapter(x)

    where attention runs among the active tokens only. With ``Dispatch.skip`` the inactive
    tokens are left out of the computation instead of being multiplied by zero.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        missing = [n for n in _ADOPTED if not hasattr(block, n)]
        if missing:
            raise TokenTuneError(
                f"unsupported block type {type(block).__name__} (missing {', '.join(missing)}); "
                "tokentune supports pre-norm timm ViT blocks (timm.models.vision_transformer.Block)")
        check_attention(block.attn)
        for name in _ADOPTED:
            setattr(self, name, getattr(block, name))
        self.timm_block_class = type(block)
        self.merge: Optional[nn.Module] = None
        self.adapter: Optional[nn.Module] = None
        self.attn_dispatcher: Optional[nn.Module] = None
        self.mlp_dispatcher: Optional[nn.Module] = None
        self.layer_dispatcher: Optional[nn.Module] = None
        self.attn_adapter: Optional[nn.Module] = None
        self.layer_adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        if self.is_dispatched():
            return self._forward_dispatched(x, state)
        h, keys = attention(self.attn, self.norm1(x), bias=state.attn_bias(),
                            return_keys=self.merge is not None)
        x = x + self.drop_path1(self.ls1(h))
        if self.merge is not None:
            x, state = self.merge(x, keys, state)
        mlp_out = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.adapter is None:
            return x + mlp_out, state
        return x + mlp_out + self.adapter(x), state

    # ------------------------------------------------------------------ token dispatch (DyT)
    def is_dispatched(self) -> bool:
        """Whether the block carries DyT plug-ins (dispatchers or the extra adapters)."""
        return (self.mlp_dispatcher is not None or self.attn_dispatcher is not None or self.layer_dispatcher is not None
                or self.attn_adapter is not None or self.layer_adapter is not None)

    def _forward_dispatched(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        x_in = x
        first = self.layer_dispatcher if self.layer_dispatcher is not None else self.attn_dispatcher
        d_attn = None
        if first is not None:
            d_attn, state = first(x, state)
        # adapters run on every token, in parallel with what may be skipped; they are called
        # right after their dispatcher (the reference's order, so seeded dropout draws match)
        side_layer = self.layer_adapter(x_in) if self.layer_adapter is not None else None
        side_attn = self.attn_adapter(x_in) if self.attn_adapter is not None else None
        x, keys = self._attention_step(x, state, d_attn)
        if side_attn is not None:
            x = x + side_attn
        if self.merge is not None:
            if keys is None:
                raise TokenTuneError("token merging needs the attention keys of every token; "
                                     "combine ToMe only with MLP Dispatch (dyt_variant='mlp')")
            x, state = self.merge(x, keys, state)
        d_mlp = d_attn if self.layer_dispatcher is not None else None
        if self.mlp_dispatcher is not None:
            d_mlp, state = self.mlp_dispatcher(x, state)
        side = self.adapter(x) if self.adapter is not None else None
        # the MLP may write into x in place when x is this block's own intermediate tensor
        x = self._mlp_step(x, d_mlp, inplace=x is not x_in)
        if side is not None:
            x = x + side
        if side_layer is not None:
            x = x + side_layer
        return x, state

    def _attention_step(self, x: torch.Tensor, state: TokenState, d: Optional[Dispatch]):
        """``x + M * attention update``; returns the new stream and the keys (dense only)."""
        if d is None:
            h, keys = attention(self.attn, self.norm1(x), bias=state.attn_bias(), return_keys=self.merge is not None)
            return x + self.drop_path1(self.ls1(h)), keys
        if d.skip:
            return self._attention_active(x, state, d.active), None
        # mask-multiply: inactive tokens are hidden as keys, their own update is gated to zero
        h, _ = attention(self.attn, self.norm1(x), bias=key_mask_bias(d.active, state.attn_bias()))
        return x + self.drop_path1(self.ls1(h)) * d.multiplier(h), None

    def _attention_active(self, x: torch.Tensor, state: TokenState, active: torch.Tensor) -> torch.Tensor:
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
            return self._attention_step(x, state, None)[0]
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
        h, _ = attention(self.attn, self.norm1(xs), bias=bias)
        update = self.drop_path1(self.ls1(h)).to(x.dtype)
        if valid is not None:
            update = torch.where(valid.unsqueeze(-1), update, torch.zeros((), dtype=x.dtype, device=x.device))
        # index_copy of (x + update) is much faster on CPU than index_add/scatter_add
        return flat.clone().index_copy_(0, rows, (xs + update).reshape(-1, C)).view(B, N, C)

    def _mlp_step(self, x: torch.Tensor, d: Optional[Dispatch], inplace: bool = False) -> torch.Tensor:
        """``x + M * MLP update`` (the mask applied after drop_path2/ls2, as the DyT reference)."""
        if d is not None and d.skip:
            return self._mlp_active(x, d.active, inplace)
        update = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x + update if d is None else x + update * d.multiplier(update)

    def _mlp_active(self, x: torch.Tensor, active: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The MLP on the active tokens of the whole batch at once: flatten to (B*N, C), gather
        the active rows, run norm2 + MLP once, write ``x + update`` back at those rows (into ``x``
        itself when ``inplace`` and autograd cannot need it, else into a copy)."""
        B, N, C = x.shape
        flat = x.reshape(B * N, C)
        rows = active.reshape(-1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return x
        if rows.numel() == B * N:
            return self._mlp_step(x, None)
        picked = flat.index_select(0, rows)
        update = self.drop_path2(self.ls2(self.mlp(self.norm2(picked))))
        # index_copy of (x + update) is much faster on CPU than index_add/scatter_add
        out = flat if inplace and not torch.is_grad_enabled() else flat.clone()
        return out.index_copy_(0, rows, picked + update.to(x.dtype)).view(B, N, C)

    def plugins(self):
        """Names of the plug-in modules this block carries (beyond timm's own submodules)."""
        return [name for name, _ in self.named_children() if name not in _ADOPTED]

    def to_timm_block(self) -> nn.Module:
        """The plain timm block with the same (shared) submodules; plug-ins must be gone."""
        if self.plugins():
            raise TokenTuneError(f"this block still has plug-ins {self.plugins()}; only plain blocks convert back to timm")
        block = self.timm_block_class.__new__(self.timm_block_class)
        nn.Module.__init__(block)
        for name in _ADOPTED:
            setattr(block, name, getattr(self, name))
        block.train(self.training)
        return block


# ----------------------------------------------------------------------------- model
class TokenTuneMixin:
    """Forward of a timm ViT whose blocks are :class:`AdaptedBlock` s.

    Mixed in front of the timm model's own class (``TokenTuneVisionTransformer`` etc.), so every
    timm method (``reset_classifier``, ``pretrained_cfg``, ``forward_head``, ...) still works and
    parameter names stay timm's.
    """

    tokentune_prop_attn: bool = False
    tokentune_trace_source: bool = False

    def initial_state(self, x: torch.Tensor, **options) -> TokenState:
        return TokenState(num_prefix=self.num_prefix_tokens, prop_attn=self.tokentune_prop_attn,
                          trace_source=self.tokentune_trace_source, options=options)

    def forward_tokens(self, images: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        """Images -> final normalised tokens and the final :class:`TokenState`."""
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = self.initial_state(x, **options)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x, state = checkpoint(block, x, state, use_reentrant=False)
            else:
                x, state = block(x, state)
        return self.norm(x), state

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[0]

    def forward(self, images: torch.Tensor, return_state: bool = False, **options):
        """Logits; with ``return_state=True`` also the final :class:`TokenState`.

        ``options`` reach the plug-ins through ``TokenState.options``.
        """
        x, state = self.forward_tokens(images, **options)
        logits = self.forward_head(x)
        return (logits, state) if return_state else logits


_CLASS_CACHE: Dict[type, type] = {}


def _adapted_class(base: type) -> type:
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type(f"TokenTune{base.__name__}", (TokenTuneMixin, base),
                                  {"__module__": __name__, "timm_class": base})
    return _CLASS_CACHE[base]


def adapt_vit(model: nn.Module) -> nn.Module:
    """Convert a timm ViT in place: blocks -> :class:`AdaptedBlock`, forward -> token-state loop."""
    if isinstance(model, TokenTuneMixin):
        return model
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens"):
        if not hasattr(model, attr):
            raise TokenTuneError(
                f"{type(model).__name__} is not a timm VisionTransformer (no {attr}); "
                "use a ViT/DeiT model name such as vit_base_patch16_224")
    if getattr(model, "attn_pool", None) is not None:
        raise TokenTuneError("models with attention pooling (global_pool='map') are not supported; use 'token' or 'avg'")
    blocks = [b if isinstance(b, AdaptedBlock) else AdaptedBlock(b) for b in model.blocks]
    model.blocks = nn.Sequential(*blocks)
    model.__class__ = _adapted_class(type(model))
    return model


def restore_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`adapt_vit` in place (every plug-in must have been removed)."""
    if not isinstance(model, TokenTuneMixin):
        return model
    model.blocks = nn.Sequential(*[b.to_timm_block() for b in model.blocks])
    model.__class__ = model.timm_class
    for attr in ("tokentune_prop_attn", "tokentune_trace_source", "tokentune_spec", "tome_schedule"):
        model.__dict__.pop(attr, None)
    return model


def adapted_blocks(model: nn.Module):
    """The model's :class:`AdaptedBlock` s in order."""
    return [b for b in model.blocks if isinstance(b, AdaptedBlock)]


def num_input_tokens(model: nn.Module) -> int:
    """Tokens entering the first block at the model's configured input size."""
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        raise TokenTuneError("cannot tell the token count of this model; set img_size when creating it")
    return int(grid[0] * grid[1]) + int(model.num_prefix_tokens)
