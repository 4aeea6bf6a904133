"""Token dispatch, whatever method decides it: the dispatcher base class, what a dispatcher records
in the token state, and activation statistics.

A *dispatcher* (a :class:`Dispatcher` module a method puts on a block, such as DyT's) decides per
token whether it takes part in a skippable computation and returns a
:class:`~tokentune.core.state.Dispatch`; it records its decision as a :class:`DispatchRecord` in
``TokenState.records`` (key ``"dispatch"``). Everything here reads only those records, so tools
(benchmarks, pictures) work for any dispatching method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import TokenTuneError
from ..utils import unwrap_model
from .state import TokenState
from .vit import adapted_blocks


class Dispatcher(nn.Module):
    """Base class of token dispatchers: ``forward(x, state) -> (Dispatch or None, state)``.

    Attributes:
        layer: index of its block.
        kind: what it dispatches: ``"attn"``, ``"mlp"`` or ``"layer"`` (the whole block).
    """

    layer: int
    kind: str


def dispatchers(model: nn.Module) -> List[Dispatcher]:
    """Every :class:`Dispatcher` of the model, in block order."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, Dispatcher)]


@dataclass
class DispatchRecord:
    """What one dispatcher decided in one forward (kept in ``TokenState.records`` under ``dispatch``).

    Attributes:
        layer: block index.
        kind: ``"attn"``, ``"mlp"`` or ``"layer"``.
        mask: [B, N] the gate in training (straight-through: values 0/1, soft gradient) or the
            hard mask as float in eval; prefix tokens included (always 1).
        num_prefix: prefix tokens at the front of ``mask``.
        complete: [B] bool rows that ran the complete model (excluded from rates), or None.
        source: ToMe's [B, N, N0] token -> input-token map at this block when traced, else None.
    """

    layer: int
    kind: str
    mask: torch.Tensor
    num_prefix: int
    complete: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    def patch_mask(self, dynamic_only: bool = True) -> torch.Tensor:
        """[B', N - num_prefix] the mask on the patch tokens (of the dynamic rows)."""
        mask = self.mask[:, self.num_prefix:]
        if dynamic_only and self.complete is not None:
            mask = mask[~self.complete]
        return mask


def dispatch_records(state: TokenState) -> List[DispatchRecord]:
    """The :class:`DispatchRecord` s of a forward, in block order."""
    return [r["dispatch"] for r in state.records if "dispatch" in r]


def activation_rate(state: TokenState) -> Optional[torch.Tensor]:
    """Mean activation over dispatchers, patch tokens and (dynamic) images; None if no dispatcher.

    Each dispatcher's mean is taken over its own tokens, then the dispatchers are averaged:
    with a constant token count this is the reference's mean over [B, layers, tokens]; with ToMe
    every block counts once whatever its number of merged tokens.
    """
    masks = [r.patch_mask() for r in dispatch_records(state)]
    rates = [m.mean() for m in masks if m.numel() > 0]
    return torch.stack(rates).mean() if rates else None


@dataclass
class ActivationStats:
    """Activation rates of a model's token dispatchers over a dataset.

    Attributes:
        names: one per dispatcher, ``"blocks.{i}.{kind}"``.
        per_layer: activation rate of each dispatcher over all patch tokens of all images.
        overall: mean of ``per_layer`` (the paper's "Overall" of Fig. 5).
        num_images: images seen.
        masks: [num_images, dispatchers, num_patches] bool per-image masks on the patch grid
            (through ToMe's source map when merging), if requested.
        grid: patch grid (rows, cols) for reshaping ``masks``.
    """

    names: List[str]
    per_layer: List[float]
    overall: float
    num_images: int
    masks: Optional[torch.Tensor] = None
    grid: Optional[Tuple[int, int]] = None

    def summary(self) -> str:
        lines = [f"overall activation {100 * self.overall:.1f}% over {self.num_images} images"]
        lines += [f"  {n}: {100 * r:.1f}%" for n, r in zip(self.names, self.per_layer)]
        return "\n".join(lines)


def _patch_positions(record: DispatchRecord) -> torch.Tensor:
    """[B, num_patches] bool: each input patch takes the decision of the token it belongs to."""
    mask = record.mask.detach()
    if record.complete is not None:
        mask = mask.masked_fill(record.complete[:, None], 1.0)
    if record.source is None:
        return mask[:, record.num_prefix:] > 0.5
    per_input = torch.bmm(mask[:, None, :].to(record.source.dtype), record.source)[:, 0]
    return per_input[:, record.num_prefix:] > 0.5


@torch.no_grad()
def activation_stats(model: nn.Module, data: Iterable, device: Union[str, torch.device, None] = None,
                     keep_masks: bool = False, max_batches: Optional[int] = None) -> ActivationStats:
    """Per-dispatcher and overall activation rates (patch tokens only) over ``data``.

    Args:
        model: a model with token dispatchers, e.g. DyT (evaluated in eval mode; its mode is restored).
        data: a DataLoader or any iterable of image batches or ``(images, targets, ...)``; batches of
            clips ([B, T, 3, H, W], a video task's) count and picture their frames as images.
        device: where to run (default: the model's device).
        keep_masks: also return every image's masks on the patch grid (for visualisation).
        max_batches: stop after this many batches.
    """
    core = unwrap_model(model)
    if not dispatchers(core):
        raise TokenTuneError("this model has no token dispatchers; build it with a dispatching method (method='dyt')")
    device = torch.device(device) if device is not None else next(core.parameters()).device
    merging = any(b.merge is not None for b in adapted_blocks(core))
    trace = bool(keep_masks and merging)       # masks on the patch grid need ToMe's source map
    old_mode = core.training
    core.eval()
    sums: List[torch.Tensor] = []
    counts: List[int] = []
    names: List[str] = []
    masks: List[torch.Tensor] = []
    images_seen = 0
    try:
        for step, batch in enumerate(data):
            if max_batches is not None and step >= max_batches:
                break
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if images.dim() > 4:            # clips [B, T, 3, H, W] (or views of clips): statistics of their frames
                images = images.flatten(0, images.dim() - 4)
            _, state = core.forward_tokens(images.to(device), trace_source=trace)
            records = dispatch_records(state)
            if not sums:
                names = [f"blocks.{r.layer}.{r.kind}" for r in records]
                sums = [torch.zeros((), dtype=torch.float64) for _ in records]
                counts = [0] * len(records)
            for j, r in enumerate(records):
                m = r.patch_mask()
                sums[j] += m.double().sum().cpu()
                counts[j] += m.numel()
            if keep_masks:
                masks.append(torch.stack([_patch_positions(r) for r in records], dim=1).cpu())
            images_seen += images.shape[0]
    finally:
        core.train(old_mode)
    per_layer = [float(s) / max(c, 1) for s, c in zip(sums, counts)]
    grid = tuple(int(g) for g in core.patch_embed.grid_size) if hasattr(core.patch_embed, "grid_size") else None
    return ActivationStats(names, per_layer, sum(per_layer) / max(len(per_layer), 1), images_seen,
                           torch.cat(masks) if masks else None, grid)
