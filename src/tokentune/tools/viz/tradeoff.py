"""Accuracy versus throughput or FLOPs across methods, from run results and benchmark tables."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ...engine.evaluate import summarize
from ...engine.rundir import RESULTS_NAME, RunDir
from ...errors import TokenTuneError
from .common import (
    PathLike,
    _new_figure,
    _save,
)

# ----------------------------------------------------------------------------- trade-off chart
_ACCURACY_KEYS = ("accuracy", "top1", "acc", "mean_of_groups", "mean_of_tasks")
_THROUGHPUT_KEYS = ("throughput", "img_per_s", "images_per_s", "img/s (median)", "img/s")
_GMACS_KEYS = ("gmacs",)
_GFLOPS_KEYS = ("gflops",)
_LABEL_KEYS = ("label", "row", "method", "model", "name")


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
            found = sorted(RunDir(d).results for d, _, names in os.walk(p) if RESULTS_NAME in names)
            if not found:
                raise TokenTuneError(f"no {RESULTS_NAME} under {p!r}; pass run directories, result files or bench JSON files")
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
    runs = [f for f in files if os.path.basename(f) == RESULTS_NAME]
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

