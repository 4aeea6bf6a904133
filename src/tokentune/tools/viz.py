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

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..core.dispatch import activation_stats, dispatchers
from ..core.vit import input_size
from ..engine.data import load_image, normalization_stats, to_rgb
from ..engine.evaluate import summarize
from ..errors import TokenTuneError
from ..fileio import atomic_write
from ..utils import unwrap_model

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


# ----------------------------------------------------------------------------- merged tokens
def _merging_blocks(model: nn.Module) -> List[int]:
    return [i for i, b in enumerate(getattr(model, "blocks", [])) if getattr(b, "merge", None) is not None]


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
    prefix = int(base.num_prefix_tokens)
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


# ----------------------------------------------------------------------------- trade-off chart
_ACCURACY_KEYS = ("accuracy", "top1", "acc", "mean_of_groups", "mean_of_tasks")
_THROUGHPUT_KEYS = ("throughput", "img_per_s", "images_per_s", "img/s (median)", "img/s")
_GMACS_KEYS = ("gmacs",)
_GFLOPS_KEYS = ("gflops",)
_LABEL_KEYS = ("label", "method", "model", "name")


@dataclass
class TradeoffPoint:
    """One method in the accuracy-versus-efficiency chart.

    Attributes:
        label: the method's name in the chart (points from several files join on it).
        accuracy: top-1 (%) (mean over the runs that gave one).
        throughput: images per second.
        gmacs: multiply-adds per image, in billions (the papers' "GFLOPs").
        gflops: FLOPs per image (2 per multiply-add), in billions.
        runs: how many run results were averaged into ``accuracy``.
        sources: the files each value came from.
        environment: the measurement environment of the bench table the efficiency values came
            from (device, dtype, threads, versions), when it states one.
    """

    label: str
    accuracy: Optional[float] = None
    throughput: Optional[float] = None
    gmacs: Optional[float] = None
    gflops: Optional[float] = None
    runs: int = 0
    sources: Dict[str, str] = field(default_factory=dict)
    environment: Optional[Dict[str, Any]] = None


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str):
        try:
            v = float(value.replace(",", ""))
            return v if math.isfinite(v) else None
        except ValueError:
            return None
    return None


def _find(row: Dict[str, Any], keys: Sequence[str], contains: Sequence[str] = ()) -> Optional[float]:
    lowered = {str(k).lower().strip(): v for k, v in row.items()}
    for k in keys:
        if k in lowered and _number(lowered[k]) is not None:
            return _number(lowered[k])
    for k, v in lowered.items():
        if any(c in k for c in contains) and "min" not in k and "max" not in k and _number(v) is not None:
            return _number(v)
    return None


def _row_values(row: Dict[str, Any]) -> Dict[str, Optional[float]]:
    return {
        "accuracy": _find(row, _ACCURACY_KEYS, ("top1", "top-1", "accuracy")),
        "throughput": _find(row, _THROUGHPUT_KEYS, ("img/s", "images/s", "throughput")),
        "gmacs": _find(row, _GMACS_KEYS, ("gmacs",)),
        "gflops": _find(row, _GFLOPS_KEYS, ("gflops",)),
    }


def _label(row: Dict[str, Any]) -> Optional[str]:
    for k in _LABEL_KEYS:
        if isinstance(row.get(k), str) and row[k].strip():
            return row[k].strip()
    return None


def _records(path: str) -> Tuple[str, List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """``(kind, rows, environment)`` of one JSON file: ``run`` results or a ``table`` (bench, summary, list)."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise TokenTuneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(obj, list):
        return "table", [r for r in obj if isinstance(r, dict)], None
    if isinstance(obj, dict) and isinstance(obj.get("rows"), list):
        env = obj.get("environment") if isinstance(obj.get("environment"), dict) else None
        return "table", [r for r in obj["rows"] if isinstance(r, dict)], env
    if isinstance(obj, dict):
        return "run", [obj], None
    raise TokenTuneError(f"{path} holds no results (a JSON object or list of rows was expected)")


def _json_files(paths: Iterable[PathLike]) -> List[str]:
    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            found = sorted(os.path.join(d, "results.json") for d, _, names in os.walk(p) if "results.json" in names)
            if not found:
                raise TokenTuneError(f"no results.json under {p!r}; pass run directories, result files or bench JSON files")
            files.extend(found)
        else:
            raise TokenTuneError(f"{p!r} does not exist; pass run directories, result files or bench JSON files")
    return list(dict.fromkeys(files))


def load_tradeoff_points(paths: Iterable[PathLike], rename: Optional[Dict[str, str]] = None,
                         metric: str = "top1") -> List[TradeoffPoint]:
    """Collect accuracy and efficiency per method from result files; values join on the label.

    Understood inputs (files, or directories searched for ``results.json``):

    * runs' ``results.json`` (``tokentune train``): per method (its ``label``, else the method,
      with the model when several appear) the accuracy of ``tokentune summarize``: seeds averaged
      per task, then the mean of the three VTAB-1k group means when every group has a task, else
      the mean over tasks (a method with runs only on other data, e.g. image folders: the mean
      over those datasets);
    * any other JSON object with an accuracy (an ``eval --json`` record): averaged per label;
    * a table with ``rows`` (``tokentune.bench.write_results`` JSON, a run summary) or a JSON list
      of rows: each row's label (``label``/``method``/``model``/``name``), accuracy (``accuracy``,
      ``top1``, ``mean_of_groups``, ...), throughput (``throughput``, ``img/s (median)``, ...),
      ``GMACs`` and ``GFLOPs``.

    Args:
        paths: files or directories.
        rename: label -> label, applied first (e.g. a bench row name -> the method name).
        metric: the accuracy field of run results (``top1`` or ``best_top1_over_epochs``).
    """
    rename = dict(rename or {})
    points: Dict[str, TradeoffPoint] = {}
    acc_sum: Dict[str, float] = {}
    files = _json_files(paths)
    runs = [f for f in files if os.path.basename(f) == "results.json"]
    if runs:
        # runs of tokentune train: per-method accuracy as the VTAB-1k table gives it (seeds averaged
        # per task, then the mean of the Natural/Specialized/Structured means when all are present)

        summary = summarize([os.path.dirname(f) for f in runs], metric=metric, label="auto")
        vtab_labels = {row["label"] for row in summary["rows"]}
        rows = summary["rows"] + [{"label": r["label"], "per_task": r["per_dataset"], "runs_per_task": r["runs_per_dataset"]}
                                  for r in summary["other_rows"] if r["label"] not in vtab_labels]
        for row in rows:
            per_task = [v for v in row["per_task"].values() if v is not None]
            acc = next((v for v in (row.get("mean_of_groups"), row.get("mean_of_tasks")) if v is not None),
                       sum(per_task) / len(per_task) if per_task else None)
            if acc is None:
                continue
            label = rename.get(row["label"], row["label"])
            point = points.setdefault(label, TradeoffPoint(label))
            point.accuracy, point.runs = float(acc), int(sum(row["runs_per_task"].values()))
            point.sources["accuracy"] = os.path.commonpath(runs) if len(runs) > 1 else runs[0]
    for path in files:
        if path in runs:
            continue
        kind, rows, env = _records(path)
        for row in rows:
            label = _label(row)
            if label is None:
                continue
            label = rename.get(label, label)
            point = points.setdefault(label, TradeoffPoint(label))
            values = _row_values(row)
            if kind == "run":
                acc = _number(row.get(metric)) if metric in row else values["accuracy"]
                if acc is not None:
                    acc_sum[label] = acc_sum.get(label, 0.0) + acc
                    point.runs += 1
                    point.accuracy = acc_sum[label] / point.runs
                    point.sources.setdefault("accuracy", path)
                values["accuracy"] = None
            for name, value in values.items():
                if value is None:
                    continue
                if getattr(point, name) is not None and point.sources.get(name) != path:
                    raise TokenTuneError(f"{name} of {label!r} is given in both {point.sources[name]} and {path}; "
                                         "pass one file per value (e.g. one bench table) or rename one of the labels")
                if getattr(point, name) is not None:
                    raise TokenTuneError(f"{name} of {label!r} is given twice in {path}; rename one of the rows")
                setattr(point, name, value)
                point.sources[name] = path
                if name != "accuracy" and env is not None:
                    point.environment = env
    return list(points.values())


X_AXES = {
    "throughput": ("throughput", "throughput (images/s)"),
    "gmacs": ("gmacs", "GMACs per image (the papers' \"GFLOPs\")"),
    "gflops": ("gflops", "GFLOPs per image (2 per multiply-add)"),
}


def _pareto(points: List[Tuple[float, float]], higher_x_better: bool) -> List[Tuple[float, float]]:
    """Points no other point beats on both axes, in x order."""
    front = []
    for x, y in points:
        dominated = any((ox >= x if higher_x_better else ox <= x) and oy >= y and (ox, oy) != (x, y)
                        for ox, oy in points)
        if not dominated:
            front.append((x, y))
    return sorted(front)


def plot_tradeoff(points_or_paths: Union[Sequence[TradeoffPoint], Sequence[PathLike]], path: PathLike, *,
                  x: str = "throughput", rename: Optional[Dict[str, str]] = None, metric: str = "top1",
                  title: Optional[str] = None, frontier: bool = True, size: Tuple[float, float] = (6.0, 4.5),
                  dpi: int = 100) -> str:
    """Accuracy versus throughput (or FLOPs) across methods.

    Args:
        points_or_paths: :class:`TradeoffPoint` s, or files/directories for
            :func:`load_tradeoff_points`.
        path: the picture to write.
        x: ``"throughput"``, ``"gmacs"`` (the papers' GFLOPs) or ``"gflops"``.
        rename, metric: see :func:`load_tradeoff_points`.
        title: figure title.
        frontier: draw the Pareto front (no other method is both more accurate and faster/cheaper).
        size, dpi: figure size in inches and resolution.

    Returns:
        ``path``.
    """
    if x not in X_AXES:
        raise TokenTuneError(f"unknown x axis {x!r}; choose from {', '.join(X_AXES)}")
    points = list(points_or_paths)
    if points and not isinstance(points[0], TradeoffPoint):
        points = load_tradeoff_points(points, rename=rename, metric=metric)
    attr, xlabel = X_AXES[x]
    usable = [p for p in points if p.accuracy is not None and getattr(p, attr) is not None]
    if not usable:
        have_acc = sorted(p.label for p in points if p.accuracy is not None)
        have_x = sorted(p.label for p in points if getattr(p, attr) is not None)
        raise TokenTuneError(f"no method has both an accuracy and a {attr} value (accuracy: {have_acc or 'none'}; "
                             f"{attr}: {have_x or 'none'}); labels must match across files (use rename)")
    fig = _new_figure(size[0], size[1], dpi)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(usable))]
    for p, colour in zip(usable, colours):
        ax.scatter([getattr(p, attr)], [p.accuracy], s=45, color=colour, zorder=3)
        ax.annotate(p.label, (getattr(p, attr), p.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if frontier and len(usable) > 1:
        front = _pareto([(getattr(p, attr), p.accuracy) for p in usable], higher_x_better=(attr == "throughput"))
        if len(front) > 1:
            ax.plot([f[0] for f in front], [f[1] for f in front], "--", color="grey", linewidth=1, zorder=2,
                    label="Pareto front")
            ax.legend(loc="best", fontsize=8, frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    if title:
        ax.set_title(title, fontsize=10)
    envs = [p.environment for p in usable if p.environment]
    if attr == "throughput" and envs and all(e == envs[0] for e in envs) and len(envs) == len(usable):
        env = envs[0]
        note = ", ".join(str(env[k]) if k == "device" else f"{k} {env[k]}"
                         for k in ("device", "dtype", "threads", "torch") if k in env)
        fig.text(0.01, 0.005, f"measured: {note}", fontsize=6, color="grey", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path, dpi)


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
