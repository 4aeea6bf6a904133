"""Pictures: merged-token maps (ToMe/PYRA), accuracy-versus-speed charts, DyT token activation.

matplotlib is an optional dependency (``pip install 'tokentune[viz]'``). Figures are drawn with
matplotlib's object-oriented API on an Agg canvas, so no GUI backend is touched and the global
pyplot state of the caller is left alone.

* :func:`plot_merged_tokens`: run a model with source tracing on, map every token after a block
  back to the patches it stands for, and draw each merged group in the mean colour of its pixels
  with its borders (the ToMe paper's visualisation), at one or several depths.
* :func:`plot_tradeoff`: accuracy versus throughput or FLOPs across methods, from run results
  (``results.json``), run summaries and benchmark tables (:func:`tokentune.bench.write_results`).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...core.vit import input_size
from ...engine.data import load_image, normalization_stats, to_rgb
from ...errors import TokenTuneError
from ...fileio import atomic_write
from ...utils import unwrap_model

PathLike = Union[str, "os.PathLike[str]"]
ImageLike = Any        # path, PIL.Image, HxWx3 numpy array, or [3, H, W] float tensor in [0, 1]

TITLE_SPACE = 0.4      # inches above each panel for its title


# ----------------------------------------------------------------------------- matplotlib
def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, or one clear line when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise TokenTuneError("pictures need matplotlib; install it with pip install 'tokentune[viz]'") from exc
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float, dpi: int):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _input_grid(pixels, panels: int, panel_size: float, dpi: int):
    """A figure with one row per image: the input, then ``panels`` empty axes per row.

    Returns the figure and ``axes[r][c]`` for the panels; finish with :func:`_grid_layout`.
    """
    rows, cols = len(pixels), 1 + panels
    fig = _new_figure(cols * panel_size, rows * (panel_size + TITLE_SPACE), dpi)
    axes = []
    for r in range(rows):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(pixels[r], interpolation="nearest")
        ax.set_title("input", fontsize=9)
        ax.set_axis_off()
        axes.append([fig.add_subplot(rows, cols, r * cols + c + 2) for c in range(panels)])
    return fig, axes


def _grid_layout(fig, rows: int, panel_size: float) -> None:
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - TITLE_SPACE / (panel_size + TITLE_SPACE) / rows * 0.9,
                        wspace=0.04, hspace=TITLE_SPACE / panel_size)


def _save(fig, path: PathLike, dpi: int) -> str:

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=ext))
    return path


# ----------------------------------------------------------------------------- images
def prepare_image(image: ImageLike, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float]
                  ) -> Tuple[torch.Tensor, np.ndarray]:
    """An image -> (normalised input [3, H, W], display pixels [H, W, 3] in [0, 1]).

    The image is resized to ``size`` (bicubic, no crop: the VTAB-1k preprocessing).
    """
    h, w = size
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise TokenTuneError(f"an image tensor must be [3, H, W] with values in [0, 1], got shape {tuple(t.shape)}")
        if tuple(t.shape[1:]) != (h, w):
            t = torch.nn.functional.interpolate(t[None], size=(h, w), mode="bicubic", align_corners=False,
                                                antialias=True)[0]
        pixels = t.clamp(0, 1)
    else:
        from PIL import Image


        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise TokenTuneError(f"image {os.fspath(image)!r} does not exist")
            pil = load_image(os.fspath(image))
        elif isinstance(image, np.ndarray):
            arr = image
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            pil = to_rgb(Image.fromarray(arr))
        elif isinstance(image, Image.Image):
            pil = to_rgb(image)
        else:
            raise TokenTuneError(f"cannot use a {type(image).__name__} as an image; pass a file path, a PIL image, "
                                 "an HxWx3 array or a [3, H, W] tensor in [0, 1]")
        pil = pil.resize((w, h), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - m) / s, pixels.permute(1, 2, 0).numpy()


def _model_inputs(model: nn.Module, images: Union[ImageLike, Sequence[ImageLike]],
                  mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    base = unwrap_model(model)
    size = input_size(base)
    d_mean, d_std = normalization_stats("auto", base)
    mean, std = mean or d_mean, std or d_std
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] > 1:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    prepared = [prepare_image(img, size, mean, std) for img in images]
    p = next(iter(base.parameters()))
    batch = torch.stack([t for t, _ in prepared]).to(device=p.device, dtype=p.dtype)
    return batch, [px for _, px in prepared]


# ----------------------------------------------------------------------------- image files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def expand_images(paths: Sequence[str], limit: Optional[int] = None) -> List[str]:
    """Image files from files and directories (a directory's images in name order, recursively)."""
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names
                           if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise TokenTuneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {p!r}")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise TokenTuneError(f"image {p!r} does not exist")
    return files[:limit] if limit else files
