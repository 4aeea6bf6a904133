"""Which patches token dispatchers (DyT) activate, per layer and over images (DyT's Fig. 5 and 6)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...core.dispatch import activation_stats, dispatchers
from ...errors import TokenTuneError
from ...utils import unwrap_model
from .common import (
    ImageLike,
    PathLike,
    _grid_layout,
    _input_grid,
    _model_inputs,
    _new_figure,
    _save,
)


# ----------------------------------------------------------------------------- DyT activation
def _dispatcher_label(name: str, kinds: int) -> str:
    """``"blocks.3.mlp"`` -> ``"4"`` (1-based block), or ``"4 mlp"`` when a block has several dispatchers."""
    parts = name.split(".")
    block = str(int(parts[1]) + 1) if len(parts) >= 3 and parts[1].isdigit() else name
    return f"{block} {parts[-1]}" if kinds > 1 and len(parts) >= 3 else block


def dyt_activation(model: nn.Module, images: Union[ImageLike, Sequence[ImageLike], torch.Tensor], *,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   batch_size: int = 32, keep_pixels: bool = True):
    """:func:`tokentune.dyt.activation_stats` of a DyT model on images, with per-image masks.

    Args:
        model: a DyT model (trained or deployed).
        images: image files, PIL images, arrays or [3, H, W] tensors in [0, 1] (read and resized
            ``batch_size`` at a time), or an already normalised batch [B, 3, H, W].
        mean, std: input normalisation (default: the model's pretrained configuration).
        batch_size: images per forward.
        keep_pixels: also return the resized display pixels of every image.

    Returns:
        ``(ActivationStats, pixels)``; ``pixels`` is a list of [H, W, 3] arrays in [0, 1], or
        None for a normalised batch or without ``keep_pixels``.
    """

    base = unwrap_model(model)
    if not dispatchers(base):
        raise TokenTuneError("this model has no token dispatchers; build it with a dispatching method, e.g. "
                             "method='dyt' (or 'dyt+tome')")
    if isinstance(images, torch.Tensor) and images.ndim == 4 and mean is None and std is None:
        return activation_stats(base, [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)],
                                keep_masks=True), None
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    pixels: Optional[List[np.ndarray]] = [] if keep_pixels else None

    def batches():
        for i in range(0, len(images), batch_size):
            batch, px = _model_inputs(base, list(images[i:i + batch_size]), mean, std)
            if pixels is not None:
                pixels.extend(px)
            yield batch

    return activation_stats(base, batches(), keep_masks=True), pixels


def plot_activation_rates(stats, path: PathLike, *, title: Optional[str] = None,
                          size: Tuple[float, float] = (7.0, 3.5), dpi: int = 100) -> str:
    """Activation rate of every DyT dispatcher (layer) and overall, as bars (the DyT paper's Fig. 5).

    Args:
        stats: an :class:`tokentune.dyt.ActivationStats`, or ``{label: ActivationStats}`` to
            compare datasets or models side by side (one bar colour each; same dispatchers).
        path: the picture to write.
        title: figure title.
        size, dpi: figure size in inches and resolution.

    Returns:
        ``path``.
    """
    series = dict(stats) if isinstance(stats, dict) else {"": stats}
    if not series:
        raise TokenTuneError("no activation statistics to plot")
    names = next(iter(series.values())).names
    for label, st in series.items():
        if st.names != names:
            raise TokenTuneError(f"activation statistics {label!r} have dispatchers {st.names[:3]}... but the first "
                                 f"have {names[:3]}...; compare models with the same DyT variant and depth")
    kinds = max(sum(1 for n in names if n.split(".")[1:2] == [b]) for b in {n.split(".")[1] for n in names}) \
        if names and all(len(n.split(".")) >= 3 for n in names) else 1
    ticks = [_dispatcher_label(n, kinds) for n in names] + ["overall"]
    fig = _new_figure(size[0], size[1], dpi)
    ax = fig.add_subplot(1, 1, 1)
    k = len(series)
    width = 0.8 / k
    xs = np.arange(len(ticks))
    for j, (label, st) in enumerate(series.items()):
        values = [100.0 * v for v in list(st.per_layer) + [st.overall]]
        ax.bar(xs - 0.4 + width * (j + 0.5), values, width=width, color=f"C{j % 10}",
               label=f"{label} ({st.num_images} image{'s' if st.num_images != 1 else ''})" if label else None)
    ax.set_xticks(xs)
    ax.set_xticklabels(ticks, fontsize=8, rotation=0 if kinds == 1 else 45)
    ax.set_xlabel("block" + (" and dispatcher" if kinds > 1 else ""))
    ax.set_ylabel("activated tokens (%)")
    ax.set_ylim(0, 100)
    ax.axvline(len(ticks) - 1.5, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(True, axis="y", alpha=0.3)
    if k > 1:
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    elif not title:
        only = next(iter(series.values()))
        title = (f"DyT activation rate per layer ({only.num_images} image{'s' if only.num_images != 1 else ''}, "
                 f"overall {100 * only.overall:.1f}%)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_activated_tokens(model: nn.Module, images: Union[ImageLike, Sequence[ImageLike]], path: PathLike, *,
                          layers: Optional[Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
                          std: Optional[Sequence[float]] = None, panel_size: float = 2.5, dpi: int = 100,
                          dim: float = 0.25) -> str:
    """Which patches a DyT model activates in each layer, drawn over each image (the DyT paper's Fig. 6).

    Active patches keep their pixels; skipped patches are dimmed towards grey. With DyT+ToMe a
    patch shows the decision of the merged token it belongs to. One row per image: the input,
    then one panel per dispatcher.

    Args:
        model: a DyT model (``dyt``, ``dyt+tome``, any variant), trained or deployed.
        images: an image or a list (file paths, PIL images, arrays, [3, H, W] tensors in [0, 1]).
        path: the picture to write.
        layers: which dispatchers to draw, as positions in the model's dispatcher list (one per
            block for MLP Dispatch; default: up to 6 spread from the first to the last).
        mean, std: input normalisation (default: the model's pretrained configuration).
        panel_size, dpi: inches per panel (``panel_size + 0.4`` per row) and resolution.
        dim: how much of a skipped patch's colour remains (0 = plain grey).

    Returns:
        ``path``.
    """
    stats, pixels = dyt_activation(model, images, mean=mean, std=std)
    total = len(stats.names)
    if layers is None:
        layers = sorted({int(round(v)) for v in np.linspace(0, total - 1, num=min(6, total))})
    bad = [i for i in layers if not 0 <= int(i) < total]
    if bad:
        raise TokenTuneError(f"dispatcher {bad[0]} is outside 0..{total - 1} (this model has {total}: "
                             f"{', '.join(stats.names[:4])}{', ...' if total > 4 else ''})")
    kinds = 2 if len({n.split('.')[-1] for n in stats.names}) > 1 else 1
    gh, gw = stats.grid
    fig, axes = _input_grid(pixels, len(layers), panel_size, dpi)
    h, w, _ = pixels[0].shape
    for r in range(len(pixels)):
        for c, layer in enumerate(layers):
            mask = stats.masks[r, int(layer)].reshape(gh, gw).numpy()
            pmask = np.repeat(np.repeat(mask, h // gh, axis=0), w // gw, axis=1)[..., None]
            shown = np.where(pmask, pixels[r], dim * pixels[r] + (1 - dim) * 0.5)
            ax = axes[r][c]
            ax.imshow(shown, interpolation="nearest")
            ax.set_title(f"block {_dispatcher_label(stats.names[int(layer)], kinds)}: {100 * mask.mean():.0f}%",
                         fontsize=9)
            ax.set_axis_off()
    _grid_layout(fig, len(pixels), panel_size)
    return _save(fig, path, dpi)

