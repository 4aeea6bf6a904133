"""Which patches ToMe/PYRA merged into one token, at several depths (the ToMe paper's figure)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...core.vit import num_prefix
from ...errors import TokenTuneError
from ...utils import unwrap_model
from .common import (
    ImageLike,
    PathLike,
    _grid_layout,
    _input_grid,
    _model_inputs,
    _save,
)


# ----------------------------------------------------------------------------- merged tokens
def _merging_blocks(model: nn.Module) -> List[int]:
    return [i for i, b in enumerate(getattr(model, "blocks", []))
            if getattr(b, "merge", None) is not None or getattr(getattr(b, "reduce", None), "merges", False)]


@torch.no_grad()
def token_groups(model: nn.Module, images: torch.Tensor, depths: Optional[Sequence[int]] = None
                 ) -> Dict[int, Tuple[torch.Tensor, int]]:
    """Which merged token every patch belongs to after each of ``depths`` blocks.

    Args:
        model: a tokentune model with token merging (ToMe, PYRA, ...), trained or deployed.
        images: normalised input batch [B, 3, H, W].
        depths: numbers of blocks run (1 = after the first block; default: every block).

    Returns:
        ``{depth: (groups [B, gh, gw] int64, tokens)}``: patches with the same id are one token
        after ``depth`` blocks (ids are token positions, prefix tokens excluded from the grid);
        ``tokens`` is the token count at that depth, prefix tokens included.
    """
    base = unwrap_model(model)
    if not _merging_blocks(base):
        raise TokenTuneError("this model merges no tokens, so there are no merged groups to draw; build it with "
                             "token merging, e.g. method='lora+tome' with tome_r=... or method='pyra'")
    depth_total = len(base.blocks)
    depths = list(range(1, depth_total + 1)) if depths is None else [int(d) for d in depths]
    bad = [d for d in depths if not 1 <= d <= depth_total]
    if bad:
        raise TokenTuneError(f"depth {bad[0]} is outside 1..{depth_total} (the model has {depth_total} blocks)")
    grid = tuple(int(g) for g in base.patch_embed.grid_size)
    prefix = num_prefix(base)
    captured: Dict[int, Tuple[Optional[torch.Tensor], int]] = {}

    def hook(index):
        def fn(module, args, out):
            x, state = out
            captured[index + 1] = (state.source, int(x.shape[1]))
        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(base.blocks)]
    was_training = base.training
    try:
        base.eval()
        base(images, trace_source=True)
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    out = {}
    batch = images.shape[0]
    for d in depths:
        source, tokens = captured[d]
        n0 = prefix + grid[0] * grid[1]
        if source is None:                               # nothing merged yet: every patch alone
            ids = torch.arange(n0, device=images.device).expand(batch, n0)
        else:
            ids = source.argmax(dim=1)                   # [B, N0]: the token each input token is in
        out[d] = ((ids[:, prefix:] - prefix).reshape(batch, *grid).cpu(), tokens)
    return out


def default_depths(model: nn.Module, panels: int = 4) -> List[int]:
    """Up to ``panels`` depths spread over the blocks that merge, ending with the last block."""
    base = unwrap_model(model)
    total = len(base.blocks)
    merging = _merging_blocks(base)
    if not merging:
        return [total]
    first = merging[0] + 1
    picks = np.linspace(first, total, num=min(panels, total - first + 1))
    return sorted({int(round(p)) for p in picks})


def _group_colours(pixels: np.ndarray, groups: np.ndarray, style: str, seed: int = 0) -> np.ndarray:
    """Pixels [H, W, 3] painted per group: its mean colour (``mean``) or a random colour over the image."""
    h, w, _ = pixels.shape
    gh, gw = groups.shape
    pmap = np.repeat(np.repeat(groups, h // gh, axis=0), w // gw, axis=1)
    flat = pmap.reshape(-1)
    count = np.bincount(flat)
    if style == "mean":
        sums = np.stack([np.bincount(flat, weights=pixels[..., c].reshape(-1), minlength=count.size)
                         for c in range(3)], axis=1)
        colours = sums / np.maximum(count, 1)[:, None]
        return colours[pmap]
    if style == "random":
        rng = np.random.default_rng(seed)
        colours = rng.uniform(0.15, 1.0, size=(count.size, 3))
        return 0.45 * pixels + 0.55 * colours[pmap]
    raise TokenTuneError(f"unknown style {style!r}; use 'mean' (the ToMe paper's) or 'random'")


def _boundaries(groups: np.ndarray, h: int, w: int) -> List[List[Tuple[float, float]]]:
    """Line segments (image pixel coordinates) between neighbouring patches of different groups."""
    gh, gw = groups.shape
    ph, pw = h / gh, w / gw
    segs = []
    for y, x in zip(*np.nonzero(groups[:, 1:] != groups[:, :-1])):      # vertical edges
        segs.append([((x + 1) * pw - 0.5, y * ph - 0.5), ((x + 1) * pw - 0.5, (y + 1) * ph - 0.5)])
    for y, x in zip(*np.nonzero(groups[1:, :] != groups[:-1, :])):      # horizontal edges
        segs.append([(x * pw - 0.5, (y + 1) * ph - 0.5), ((x + 1) * pw - 0.5, (y + 1) * ph - 0.5)])
    return segs


def plot_merged_tokens(model: nn.Module, images: Union[ImageLike, Sequence[ImageLike]], path: PathLike, *,
                       depths: Optional[Sequence[int]] = None, style: str = "mean",
                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                       panel_size: float = 2.5, dpi: int = 100, line_color: str = "white",
                       line_width: float = 0.8) -> str:
    """Draw which patches were merged into one token, for each image at each depth (ToMe's figure).

    Every merged group is painted in the mean colour of its pixels (``style="mean"``, as in the
    ToMe paper) or a random colour over the image (``"random"``), with its borders drawn. One row
    per image: the input, then one panel per depth.

    Args:
        model: a model with token merging (``lora+tome``, ``pyra``, ...), trained or deployed.
        images: an image or a list: file paths, PIL images, HxWx3 arrays or [3, H, W] tensors in
            [0, 1]; each is resized (bicubic, no crop) to the model's input size.
        path: the picture to write (``.png``, ``.pdf``, ``.svg``, ...).
        depths: after how many blocks to draw (1-based; default: up to 4 depths spread over the
            merging blocks, ending with the last).
        style: ``"mean"`` or ``"random"``.
        mean, std: input normalisation (default: the model's pretrained configuration).
        panel_size: inches per panel (the figure is ``panels x panel_size`` wide and
            ``rows x (panel_size + 0.4)`` high).
        dpi: resolution.
        line_color, line_width: group borders.

    Returns:
        ``path``.
    """
    from matplotlib.collections import LineCollection

    batch, pixels = _model_inputs(model, images, mean, std)
    depths = default_depths(model) if depths is None else list(depths)
    groups = token_groups(model, batch, depths)
    fig, axes = _input_grid(pixels, len(depths), panel_size, dpi)
    h, w, _ = pixels[0].shape
    for r in range(len(pixels)):
        for c, d in enumerate(depths):
            g, tokens = groups[d]
            grid = g[r].numpy()
            ax = axes[r][c]
            ax.imshow(_group_colours(pixels[r], grid, style, seed=d), interpolation="nearest")
            ax.add_collection(LineCollection(_boundaries(grid, h, w), colors=line_color, linewidths=line_width))
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_title(f"block {d}: {tokens} tokens", fontsize=9)
            ax.set_axis_off()
    _grid_layout(fig, len(pixels), panel_size)
    return _save(fig, path, dpi)

