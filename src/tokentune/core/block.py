"""The composition layer: timm's ViT, its own submodules, and one place where methods plug in.

A timm ``VisionTransformer`` keeps its weights, patch embedding, position embedding, prefix
tokens, final norm and head untouched. Each timm ``Block`` is replaced by an
:class:`AdaptedBlock` that *adopts* the block's own ``norm1``/``attn``/``ls1``/``drop_path1``/
``norm2``/``mlp``/``ls2``/``drop_path2`` modules (so parameter names, LayerScale, qk_norm,
fused SDPA and weight loading keep working) and adds optional plug-ins::

    x, state = prompt(x, state)                       VPT: insert / replace prompt (prefix) tokens
    x, state = reduce.before_attention(x, state)      DynamicViT: predict and prune before the block
    x = x + drop_path1(ls1(attn(norm1(x))))          attn: timm's qkv/q_norm/k_norm/proj + SDPA
                                                      (MCTF: reduce.attention reduces x, then attends)
    x, state = reduce(x, state, cls_attn)             EViT: keep / fuse by the CLS attention row
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

from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import TokenTuneError
from .attention import attention, check_attention, key_mask_bias
from .reduce import TokenReducer
from .rope import rope_rows
from .skip import attention_active, attention_indexed, mlp_active, mlp_indexed
from .state import Dispatch, TokenState

_ADOPTED = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class AdaptedBlock(nn.Module):
    """A timm ``Block`` whose submodules are adopted as-is, plus method plug-ins.

    Plug-ins (each None when unused):
        merge: :class:`tokentune.tome.TokenMerging` run between attention and MLP, as
            ``merge(x, metric, state)``; the metric is the head-averaged keys, or, when the module
            has an ``input_metric(h)`` method, its output on the normalised block input ``h``
            (DTEM's decoupled embedding).
        adapter: a module on the post-attention stream, added in parallel with the MLP.
        attn_dispatcher, mlp_dispatcher, layer_dispatcher: token dispatchers (DyT), called as
            ``dispatcher(x, state) -> (Dispatch or None, state)``; they decide which tokens take
            part in attention (as queries, keys and values), in the MLP, or in both (one decision
            for the whole block). None from a dispatcher means every token takes part.
        attn_adapter: a module on the block input, added in parallel with attention.
        layer_adapter: a module on the block input, added in parallel with the whole block.
        prompt: ``prompt(x, state) -> (x, state)`` at the block input: inserts or replaces
            learned prefix tokens (VPT); they count in ``state.num_prefix``, so no token reducer
            touches them.
        reduce: a :class:`~tokentune.core.reduce.TokenReducer` (EViT, DynamicViT): its
            ``before_attention`` runs at the block input, its ``forward`` between attention and
            MLP (with the CLS attention row when it asks for it). With a training-time policy in
            the token state (:attr:`TokenState.policy`) attention hides the dropped keys.

    With dispatchers the block computes (``M`` the dispatch mask, as in DyT)::

        x1 = x  + M_attn * drop_path1(ls1(attn(norm1(x)))) + attn_adapter(x)
        x1 = merge(x1)
        x2 = x1 + M_mlp  * drop_path2(ls2(mlp(norm2(x1)))) + adapter(x1) + layer_adapter(x)

    where attention runs among the active tokens only. With ``Dispatch.skip`` the inactive
    tokens are left out of the computation instead of being multiplied by zero; with
    ``Dispatch.index`` a fixed number of tokens per image is computed (static shapes).
    """

    adopted = _ADOPTED            # the timm block's own parts, kept under their names

    def __init__(self, block: nn.Module, layer: int = 0) -> None:
        super().__init__()
        missing = [n for n in self.adopted if not hasattr(block, n)]
        if missing:
            raise TokenTuneError(
                f"unsupported block type {type(block).__name__} (missing {', '.join(missing)}); "
                "tokentune supports pre-norm timm ViT blocks (timm.models.vision_transformer.Block, "
                "timm.models.eva.EvaBlock)")
        check_attention(block.attn)
        for name in self.adopted:
            setattr(self, name, getattr(block, name))
        self.timm_block_class = type(block)
        # plain attributes of the timm block (e.g. EvaBlock's init_values), restored by to_timm_block
        self.timm_block_attrs = {k: v for k, v in vars(block).items()
                                 if not k.startswith("_") and k != "training" and k not in self.adopted}
        self.layer = int(layer)       # block index: selects mixed RoPE's per-block table
        self.merge: Optional[nn.Module] = None
        self.adapter: Optional[nn.Module] = None
        self.attn_dispatcher: Optional[nn.Module] = None
        self.mlp_dispatcher: Optional[nn.Module] = None
        self.layer_dispatcher: Optional[nn.Module] = None
        self.attn_adapter: Optional[nn.Module] = None
        self.layer_adapter: Optional[nn.Module] = None
        self.prompt: Optional[nn.Module] = None
        self.reduce: Optional[TokenReducer] = None

    def forward(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        if self.prompt is not None:
            x, state = self.prompt(x, state)
        if self.reduce is not None:
            x, state = self.reduce.before_attention(x, state)
        if self.is_dispatched():
            return self._forward_dispatched(x, state)
        need_cls = self.reduce is not None and self.reduce.needs_cls_attn
        # a merge module with its own metric (DTEM's embedding) reads the normalised block input
        own_metric = getattr(self.merge, "input_metric", None)
        if self.reduce is not None and self.reduce.runs_attention:    # the reducer runs attention (MCTF)
            x, state, h = self.reduce.attention(self, x, state)
            keys, cls_attn, xn = None, [], None
        else:
            xn = self.norm1(x)
            h, keys, *cls_attn = attention(self.attn, xn, bias=state.attn_bias(),
                                           return_keys=self.merge is not None and own_metric is None,
                                           policy=state.policy, return_cls_attn=need_cls,
                                           key_weight=state.key_weight(), **self.rope_args(x, state))
        x = x + self.drop_path1(self.ls1(h))
        if self.reduce is not None:
            x, state = self.reduce(x, state, *cls_attn)
        if self.merge is not None:
            x, state = self.merge(x, keys if own_metric is None else own_metric(xn), state)
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
            h, keys = attention(self.attn, self.norm1(x), bias=state.attn_bias(), return_keys=self.merge is not None,
                                **self.rope_args(x, state))
            return x + self.drop_path1(self.ls1(h)), keys
        if d.index is not None:
            return attention_indexed(self, x, state, d.active, d.index), None
        if d.skip:
            return attention_active(self, x, state, d.active), None
        # mask-multiply: inactive tokens are hidden as keys, their own update is gated to zero
        h, _ = attention(self.attn, self.norm1(x), bias=key_mask_bias(d.active, state.attn_bias()),
                         **self.rope_args(x, state))
        return x + self.drop_path1(self.ls1(h)) * d.multiplier(h), None

    def _mlp_step(self, x: torch.Tensor, d: Optional[Dispatch], inplace: bool = False) -> torch.Tensor:
        """``x + M * MLP update`` (the mask applied after drop_path2/ls2, as the DyT reference)."""
        if d is not None and d.index is not None:
            return mlp_indexed(self, x, d.active, d.index, inplace)
        if d is not None and d.skip:
            return mlp_active(self, x, d.active, inplace)
        update = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x + update if d is None else x + update * d.multiplier(update)

    def rope_args(self, x: torch.Tensor, state: TokenState, index: Optional[torch.Tensor] = None) -> dict:
        """The rotary keywords of :func:`~tokentune.core.attention.attention` for the tokens ``x``
        [B, N, C] (or those at ``index`` [B, K] of them, prefix tokens first); {} without RoPE."""
        if state.rope is None:
            return {}
        return {"rope": rope_rows(state, self.layer, x.shape[0], x.shape[1], index), "num_prefix": state.num_prefix}

    def width(self) -> int:
        """The residual stream's width (embedding dimension)."""
        return int(self.attn.proj.out_features)

    def param_like(self) -> dict:
        """``device``/``dtype`` of the block's weights (for plug-ins built beside them)."""
        p = next(self.attn.parameters())
        return {"device": p.device, "dtype": p.dtype}

    def plugins(self):
        """Names of the plug-in modules this block carries (beyond timm's own submodules)."""
        return [name for name, _ in self.named_children() if name not in self.adopted]

    def to_timm_block(self) -> nn.Module:
        """The plain timm block with the same (shared) submodules; plug-ins must be gone."""
        if self.plugins():
            raise TokenTuneError(f"this block still has plug-ins {self.plugins()}; only plain blocks convert back to timm")
        block = self.timm_block_class.__new__(self.timm_block_class)
        nn.Module.__init__(block)
        for name, value in self.timm_block_attrs.items():
            setattr(block, name, value)
        for name in self.adopted:
            setattr(block, name, getattr(self, name))
        block.train(self.training)
        return block


class AdaptedEvaBlock(AdaptedBlock):
    """A timm ``EvaBlock`` (EVA-02, DINOv3, ``vit_*_rope_*``; timm's ``Eva`` class) adopted like
    :class:`AdaptedBlock` adopts ``Block``: its norms, attention (``EvaAttention`` or
    ``AttentionRope``: rotary embeddings from the token state), MLP (``Mlp``, ``GluMlp``,
    ``SwiGLU``) and drop paths are kept under their names, and its LayerScale parameters
    ``gamma_1``/``gamma_2`` (None without LayerScale, ``gamma_2`` None with attention-only
    LayerScale) multiply the branch outputs as timm does. Every plug-in and execution path of
    :class:`AdaptedBlock` (merging, pruning, DyT's skipping) applies unchanged.
    """

    adopted = ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2")

    def ls1(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gamma_1 is None else self.gamma_1 * x

    def ls2(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gamma_2 is None else self.gamma_2 * x
