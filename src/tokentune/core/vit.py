"""A timm ViT with :class:`~tokentune.core.block.AdaptedBlock` s: the forward that threads the
token state, and the conversion to and from timm's own model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import TokenTuneError
from ..utils import unwrap_model
from .block import AdaptedBlock, AdaptedEvaBlock
from .features import forward_intermediates
from .rope import rope_table
from .state import TokenState


@dataclass
class ModelInfo:
    """Everything tokentune keeps on a model, in one attribute: ``model.tokentune``.

    Attributes:
        spec: the build spec (JSON: model name, method spec, configs, timm keywords, head, seed,
            where the pretrained weights came from) that rebuilds the model; None until
            :func:`tokentune.create_model` has finished.
        state: per-method build state by method name (e.g. ``"tome"``: the fitted schedule),
            written by the methods' ``apply`` and read by the same methods.
        prop_attn: proportional attention (log token sizes added to the attention logits).
        trace_source: default of the per-forward ``trace_source`` option (keep the token ->
            input-patch map in the token state).
        deployed: :func:`tokentune.deploy` has run.
        export: for a model loaded from an export: its directory and ``deployed.json``.
        extra_prefix: prefix tokens a method inserts after timm's own (VPT's prompts); the blocks
            see ``num_prefix_tokens + extra_prefix`` protected tokens (:func:`num_prefix`).
        pool_by_size: average pooling (``global_pool="avg"``) weights each token by its size,
            normalised by the detached total size (the MAE patches of ToMe and DiffRate: the mean
            over patches); False: timm's unweighted mean over the tokens.
    """

    spec: Optional[Dict[str, Any]] = None
    state: Dict[str, Any] = field(default_factory=dict)
    prop_attn: bool = False
    trace_source: bool = False
    deployed: bool = False
    export: Optional[Dict[str, Any]] = None
    extra_prefix: int = 0
    pool_by_size: bool = False


def info_of(model: nn.Module) -> Optional[ModelInfo]:
    """``model.tokentune`` (through compile/DDP wrappers), or None for a model tokentune did not adapt."""
    info = getattr(unwrap_model(model), "tokentune", None)
    return info if isinstance(info, ModelInfo) else None


def spec_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The build spec of a model built by :func:`tokentune.create_model`, else None."""
    info = info_of(model)
    return info.spec if info is not None else None

def _moved(old: str, new: str) -> property:
    """A model attribute of tokentune 0.1 that moved: reading or setting it is one line naming the new place."""
    def fail(*_):
        raise TokenTuneError(f"model.{old} (tokentune 0.1) is now {new}")
    return property(fail, fail, doc=f"Moved: {new}.")


class TokenTuneMixin:
    """Forward of a timm ViT whose blocks are :class:`AdaptedBlock` s.

    Mixed in front of the timm model's own class (``TokenTuneVisionTransformer`` etc.), so every
    timm method (``reset_classifier``, ``pretrained_cfg``, ``forward_head``, ...) still works and
    parameter names stay timm's.
    """

    tokentune: ModelInfo

    # 0.1's public attributes, now in ``model.tokentune``
    tome_schedule = _moved("tome_schedule", "model.tokentune.state['tome'] (ToMe's fitted per-block schedule)")
    dyt_config = _moved("dyt_config", "model.tokentune.state['dyt'] (DyT's config)")
    tokentune_prop_attn = _moved("tokentune_prop_attn", "model.tokentune.prop_attn")
    tokentune_trace_source = _moved("tokentune_trace_source", "model.tokentune.trace_source (or the forward option "
                                    "model(x, trace_source=True))")
    tokentune_export = _moved("tokentune_export", "model.tokentune.export")

    def initial_state(self, x: torch.Tensor, trace_source: Optional[bool] = None, **options) -> TokenState:
        info = self.tokentune
        trace = info.trace_source if trace_source is None else bool(trace_source)
        return TokenState(num_prefix=self.num_prefix_tokens, prop_attn=info.prop_attn, trace_source=trace,
                          options=options)

    @property
    def tokentune_spec(self) -> Optional[Dict[str, Any]]:
        """The build spec (``model.tokentune.spec``; this name stays for one release)."""
        spec = self.tokentune.spec
        return dict(spec, deployed=True) if spec is not None and self.tokentune.deployed else spec

    def embed(self, images: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        """Images -> the tokens the first block receives and the initial :class:`TokenState`
        (timm's patch embedding, position embedding, patch dropout and pre-norm)."""
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return x, self.initial_state(x, **options)

    def forward_tokens(self, images: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        """Images -> final normalised tokens and the final :class:`TokenState`."""
        x, state = self.embed(images, **options)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x, state = checkpoint(block, x, state, use_reentrant=False)
            else:
                x, state = block(x, state)
        return self.norm(x), state

    def forward_features(self, images: torch.Tensor, **options) -> torch.Tensor:
        return self.forward_tokens(images, **options)[0]

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False, **options):
        """timm's ``forward_intermediates`` (same arguments and outputs) with merged tokens unmerged
        to the patch grid; ``options`` are per-forward switches (:mod:`tokentune.core.features`)."""
        return forward_intermediates(self, x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                     stop_early=stop_early, output_fmt=output_fmt,
                                     intermediates_only=intermediates_only, output_dict=output_dict, **options)

    def forward(self, images: torch.Tensor, return_state: bool = False, return_tokens: bool = False, **options):
        """Logits (a task's outputs with a task head); with ``return_state=True`` also the final
        :class:`TokenState`; with ``return_tokens=True`` also the final normalised tokens [B, N, C]
        (token distillation).

        ``options`` are per-forward switches: ``trace_source=True`` keeps the token -> input-patch
        map (``state.source``); every other option reaches the plug-ins through
        ``TokenState.options`` (e.g. DyT's ``dyt_complete`` and ``dyt_execution``).
        """
        head = self._modules.get("task_head")        # a task's head (segmentation, video) takes over
        if head is not None:
            if return_tokens:
                raise TokenTuneError("return_tokens=True needs a classification model; a task head returns its own outputs")
            out, state = head(self, images, **options)
            x = None
        else:
            x, state = self.forward_tokens(images, **options)
            out = self.forward_head_sized(x, state)
        extra = ((state,) if return_state else ()) + ((x,) if return_tokens else ())
        return (out,) + extra if extra else out

    def forward_head_sized(self, x: torch.Tensor, state: TokenState, pre_logits: bool = False) -> torch.Tensor:
        """timm's ``forward_head``, with an attention-pool head (``global_pool="map"``: SigLIP, ...)
        weighting merged tokens by their size.

        A token that stands for ``s`` patches enters the pool's softmax as ``s`` copies of itself
        would: ``log(s)`` is added to its attention logit (proportional attention, as in the
        blocks). With every size 1 (no merging) this is timm's pool exactly.
        """
        pool = getattr(self, "attn_pool", None)
        if pool is None:
            pooled = self.weighted_avg_pool(x, state)
            if pooled is None:
                return self.forward_head(x, pre_logits=pre_logits)
            x = self.head_drop(self.fc_norm(pooled))
            return x if pre_logits else self.head(x)
        if state.size is None:
            return self.forward_head(x, pre_logits=pre_logits)
        size = state.size
        if not self.pool_reads_prefix():
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        x = pool(x, attn_mask=size.log().to(x.dtype).transpose(1, 2).unsqueeze(1))
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def pool_reads_prefix(self) -> bool:
        """Whether timm's pool of this model reads the prefix tokens too (a ViT's
        ``pool_include_prefix`` option, for its average and attention pools alike)."""
        return bool(getattr(self, "pool_include_prefix", False))

    def weighted_avg_pool(self, x: torch.Tensor, state: TokenState) -> Optional[torch.Tensor]:
        """timm's average pool (``global_pool="avg"``) over the tokens a training-time pruner still
        keeps, and weighted by token size where the method asks for it (:attr:`ModelInfo.pool_by_size`);
        None when neither applies (timm's own pool is then exact).

        A token the policy dropped (DynamicViT, DiffRate's search: still computed in training, but
        gone after real pruning) must not enter the average, or training would pool over tokens
        that deployment no longer has: the pool is ``sum_i D_i x_i / sum_i D_i``, the formula of
        DynamicViT's own global feature (PredictorLG, Eq. 3), so with a 0/1 policy it equals the
        plain mean over the kept tokens that the pruned model computes. With sizes ``s_i``
        (DiffRate's MAE patch): ``sum_i D_i s_i x_i / sg(sum_i D_i s_i)``.
        """
        sized = self.tokentune.pool_by_size and state.size is not None
        if getattr(self, "global_pool", None) != "avg" or (state.policy is None and not sized):
            return None
        start = 0 if self.pool_reads_prefix() else self.num_prefix_tokens
        x = x[:, start:]
        weight = x.new_ones(x.shape[0], x.shape[1], 1)
        if state.policy is not None:
            weight = weight * state.policy[:, start:, None].to(x.dtype)
        if sized:
            weight = weight * state.size[:, start:].to(x.dtype)
        total = weight.sum(dim=1)
        if sized:
            total = total.detach()
        # an image whose every token was dropped in training pools to zero, not 0/0 = NaN
        return (x * weight).sum(dim=1) / total.clamp_min(1e-6)


class TokenTuneEvaMixin(TokenTuneMixin):
    """:class:`TokenTuneMixin` for timm's ``Eva`` class (EVA, EVA-02, DINOv3, ``vit_*_rope_*``):
    ``Eva._pos_embed`` returns the rotary table beside the tokens (after timm's own patch dropout,
    which it applies inside), and the table travels in the token state
    (:mod:`tokentune.core.rope`)."""

    def pool_reads_prefix(self) -> bool:
        """Eva's attention-pool head (Perception Encoder) attends over every token, prefix tokens
        included; its average pool leaves them out (timm's ``Eva.pool``)."""
        return self.attn_pool is not None

    def embed(self, images: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        masked = [k for k in ("attn_mask", "is_causal") if options.get(k) is not None and options.get(k) is not False]
        if masked:                  # timm Eva's own masked attention: not threaded through the blocks
            raise TokenTuneError(f"{masked[0]}= (timm Eva's masked attention) is not supported by tokentune's Eva "
                                 "forward; call it without a mask (token reduction decides which tokens attend)")
        x, rot = self._pos_embed(self.patch_embed(images))
        x = self.norm_pre(x)
        state = self.initial_state(x, **options)
        if rot is not None:
            state = state.replace(rope=rope_table(rot, mixed=bool(getattr(self, "rope_mixed", False))))
        return x, state


_CLASS_CACHE: Dict[type, type] = {}


def _adapted_class(base: type) -> type:
    if base not in _CLASS_CACHE:
        mixin = TokenTuneEvaMixin if issubclass(base, Eva) else TokenTuneMixin
        _CLASS_CACHE[base] = type(f"TokenTune{base.__name__}", (mixin, base),
                                  {"__module__": __name__, "timm_class": base})
    return _CLASS_CACHE[base]


def _like_container(container: nn.Module, blocks) -> nn.Module:
    """``blocks`` in timm's own container type (``Sequential`` for ViT, ``ModuleList`` for Eva)."""
    return nn.ModuleList(blocks) if isinstance(container, nn.ModuleList) else nn.Sequential(*blocks)


def _adapt_block(block: nn.Module, layer: int) -> AdaptedBlock:
    if isinstance(block, AdaptedBlock):
        return block
    if isinstance(block, EvaBlock):
        return AdaptedEvaBlock(block, layer)
    if isinstance(block, EvaBlockPostNorm):
        raise TokenTuneError("timm's post-norm Eva blocks (use_post_norm=True: eva02_enormous_patch14_clip_224) are not "
                             "supported; use a pre-norm Eva model (EVA-02, DINOv3, vit_*_rope_*) or a VisionTransformer")
    return AdaptedBlock(block, layer)


def adapt_vit(model: nn.Module) -> nn.Module:
    """Convert a timm ViT in place: blocks -> :class:`AdaptedBlock`, forward -> token-state loop."""
    if isinstance(model, TokenTuneMixin):
        return model
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens"):
        if not hasattr(model, attr):
            raise TokenTuneError(
                f"{type(model).__name__} is not a timm VisionTransformer (no {attr}); "
                "use a ViT/DeiT model name such as vit_base_patch16_224")
    blocks = [_adapt_block(b, i) for i, b in enumerate(model.blocks)]
    model.blocks = _like_container(model.blocks, blocks)
    model.__class__ = _adapted_class(type(model))
    model.tokentune = ModelInfo()
    return model


def restore_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`adapt_vit` in place (every plug-in must have been removed)."""
    if not isinstance(model, TokenTuneMixin):
        return model
    model.blocks = _like_container(model.blocks, [b.to_timm_block() for b in model.blocks])
    model.__class__ = model.timm_class
    model.__dict__.pop("tokentune", None)
    return model


def adapted_blocks(model: nn.Module):
    """The model's :class:`AdaptedBlock` s in order."""
    return [b for b in model.blocks if isinstance(b, AdaptedBlock)]


def input_size(model: nn.Module) -> Tuple[int, int]:
    """(height, width) of the images the model was built for."""
    size = getattr(getattr(unwrap_model(model), "patch_embed", None), "img_size", None)
    if size is None:
        raise TokenTuneError(f"cannot tell the input size of {type(model).__name__}; build it with img_size")
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]), int(size[1])


def num_prefix(model: nn.Module) -> int:
    """Prefix tokens the blocks protect: timm's (CLS, registers, distillation) plus inserted ones (VPT)."""
    model = unwrap_model(model)
    info = info_of(model)
    return int(model.num_prefix_tokens) + (info.extra_prefix if info is not None else 0)


def num_input_tokens(model: nn.Module) -> int:
    """Tokens the blocks see at the model's configured input size (prompt tokens included)."""
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        raise TokenTuneError("cannot tell the token count of this model; set img_size when creating it")
    return int(grid[0] * grid[1]) + num_prefix(model)
