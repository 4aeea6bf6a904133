"""Feature extraction from adapted ViTs, by timm's contract: ``forward_intermediates`` and
``features_only``-style feature extractors, for every method and for the deployed models.

Dense tasks (segmentation, detection) need per-patch features on the patch grid, but token
merging (ToMe, PYRA) leaves fewer tokens than patches. The features of a merging model are
*unmerged*: every input patch takes the value of the merged token it belongs to (ToMe's source
map: ``TokenState.source``, one 0/1 column per input token). Token pruning (EViT, DynamicViT,
DiffRate) traces the same map: a fused token stands for its sources, a dropped patch has no token
and its features are zeros. Token skipping (DyT) never moves a token, so its features are on the
grid already. Prompt tokens (VPT) are prefix tokens and are split off with CLS.

Cost of unmerging: the source map must be traced while merging (``trace_source``), a
[B, N, N0] tensor merged alongside the tokens in every merging block (N0 input tokens, N tokens
left; ViT-B/16 at 512 px: 1025 x 1025 x 4 bytes = 4.2 MB per image at the first block, less
after), and each returned level costs one gather of [B, N0, C]. The blocks themselves still run
on the merged tokens, so the FLOPs saved by merging are kept; models without merging pay nothing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import TokenTuneError
from .state import TokenState

OUTPUT_FORMATS = ("NCHW", "NLC")


def unmerge(x: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
    """Tokens ``x`` [B, N, C] back on the input tokens [B, N0, C]: each input token takes the value
    of the token that stands for it (``source`` [B, N, N0], ToMe's 0/1 map; None: nothing merged)."""
    if source is None:          # nothing merged, or tokens only reordered (DTEM's soft merging in training)
        return x
    owner = source.argmax(dim=1)                           # [B, N0]: the token each input token belongs to
    out = x.gather(1, owner.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out * (source.amax(dim=1) > 0).unsqueeze(-1).to(out.dtype)   # pruned patches (DiffRate): zeros


def _extra_prefix(model: nn.Module) -> int:
    """Prefix tokens a method inserts after timm's own (VPT's prompts)."""
    return int(getattr(getattr(model, "tokentune", None), "extra_prefix", 0) or 0)


def _merges_before(blocks: Sequence[nn.Module], last: int) -> bool:
    return any(getattr(b, "merge", None) is not None or getattr(b, "reduce", None) is not None
               for b in list(blocks)[:last + 1])


def run_levels(model: nn.Module, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
               norm: bool = False, stop_early: bool = False,
               **options) -> Tuple[torch.Tensor, List[torch.Tensor], TokenState]:
    """Run the adapted ViT and keep the outputs of the blocks in ``indices`` (timm's rule: the last n
    blocks for an int, all for None), optionally through the final norm, unmerged to the input tokens.

    Returns the last block's tokens (merged, not normalised), the levels [B, N0, C] (prefix tokens
    included) and the final :class:`TokenState` (what a task head needs, e.g. for DyT's losses).
    """
    take, last = feature_take_indices(len(model.blocks), indices)
    take = set(int(i) for i in take)
    blocks = model.blocks if not stop_early else model.blocks[:last + 1]
    if _merges_before(blocks, last):
        options["trace_source"] = True                     # unmerging needs the source map
    tokens, state = model.embed(x, **options)
    use_ckpt = model.grad_checkpointing and model.training and torch.is_grad_enabled()
    n0 = tokens.shape[1] + _extra_prefix(model)            # the grid's tokens, prompts included
    levels = []
    for i, block in enumerate(blocks):
        tokens, state = checkpoint(block, tokens, state, use_reentrant=False) if use_ckpt else block(tokens, state)
        if i in take:
            level = unmerge(model.norm(tokens) if norm else tokens, state.source)
            if level.shape[1] != n0:
                raise TokenTuneError(
                    f"block {i} has {level.shape[1]} of {n0} tokens and no token -> patch map (a pruning method such "
                    "as EViT or DynamicViT drops patches): take features from blocks before its first pruning "
                    "location, or use a method that merges (ToMe, PYRA, DiffRate) or skips (DyT)")
            levels.append(level)
    return tokens, levels, state


def to_grid(model: nn.Module, levels: Sequence[torch.Tensor], image_hw: Tuple[int, int]) -> List[torch.Tensor]:
    """Patch tokens [B, N0 - prefix, C] -> feature maps [B, C, H, W] on the patch grid."""
    H, W = model.patch_embed.dynamic_feat_size(image_hw)
    return [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in levels]


def forward_intermediates(model: nn.Module, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                          return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                          output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                          **options) -> Union[List[Any], Tuple[torch.Tensor, List[Any]], Dict[str, Any]]:
    """timm's ``VisionTransformer.forward_intermediates`` for an adapted ViT (see timm for the
    arguments); ``options`` are per-forward switches as for ``model(x, **options)``.

    Intermediates are the outputs of the blocks in ``indices`` (the last n blocks for an int,
    all for None), optionally through the final norm, with merged tokens unmerged to the patch
    grid; prefix tokens are split off (returned beside the patch features with
    ``return_prefix_tokens``). The final features (``forward_features``) keep the merged tokens,
    as the classifier sees them.
    """
    if output_fmt not in OUTPUT_FORMATS:
        raise TokenTuneError(f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}, got {output_fmt!r}")
    tokens, levels, _ = run_levels(model, x, indices, norm, stop_early, **options)
    p = model.num_prefix_tokens + _extra_prefix(model)     # CLS, registers and prompts
    prefix = [y[:, :p] for y in levels] if p else None
    levels = [y[:, p:] for y in levels]
    if output_fmt == "NCHW":
        levels = to_grid(model, levels, tuple(x.shape[-2:]))
    if output_dict:
        out: Dict[str, Any] = {"image_intermediates": levels}
        if prefix is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            out["image_features"] = model.norm(tokens)
        return out
    if return_prefix_tokens and prefix is not None:
        levels = list(zip(levels, prefix))
    if intermediates_only:
        return levels
    return model.norm(tokens), levels


def features_only(model: nn.Module, out_indices: Union[int, Sequence[int]] = 3, output_fmt: str = "NCHW",
                  norm: bool = False, prune: bool = False) -> nn.Module:
    """A feature extractor over ``model`` as ``timm.create_model(..., features_only=True)`` builds one
    for ViTs (timm's ``FeatureGetterNet``): ``extractor(x)`` is the list of intermediates.

    Works for training-time and deployed models (deploy first for the deployed features).
    ``prune=True`` drops the blocks after the last index and the classifier from ``model`` itself
    (timm's default; off here so that the model stays usable).
    """
    if output_fmt not in OUTPUT_FORMATS:
        raise TokenTuneError(f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}, got {output_fmt!r}")
    if isinstance(out_indices, int):
        out_indices = list(range(len(model.blocks)))[-out_indices:] if out_indices > 0 else []
    return FeatureGetterNet(model, out_indices=list(out_indices), output_fmt=output_fmt, norm=norm, prune=prune)
