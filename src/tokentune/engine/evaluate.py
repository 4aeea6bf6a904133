"""Evaluation (top-1 on a split), per-run results files and VTAB-1k summaries over runs.

A run directory written by ``tokentune train`` holds ``results.json``:

* ``top1``: top-1 accuracy (%) on the test split after the LAST epoch: the number to report;
* ``best_top1_over_epochs`` / ``best_epoch``: the best of the evaluations during training.
  Several papers report this (it selects on the test set, so it is optimistic); it is kept
  separately and always labelled as such;
* ``evaluations``: every evaluated epoch and its top-1; parameter counts
  (:func:`tokentune.count_parameters`), training time, dataset, method and model.

:func:`summarize` turns several run directories into the VTAB-1k table: per-task top-1, the
means of the Natural/Specialized/Structured groups, the mean of the three group means and the
mean over tasks (both labelled), as Markdown and JSON. Runs on image folders (any data that is
not a VTAB-1k task) get a table of their own with a column per dataset name, and never enter a
VTAB-1k mean.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..core.params import count_parameters
from ..core.vit import spec_of
from ..errors import TokenTuneError, error_line
from ..fileio import atomic_write_json
from ..precision import AMP_MODES, amp_dtype, autocast  # noqa: F401 - re-exported
from ..version import __version__
from . import distributed as D
from .data import VTAB_GROUPS, VTAB_TASKS, vtab_task
from .distributed import progress_enabled  # noqa: F401 - re-exported
from .rundir import RESULTS_NAME, RunDir
from .sources import StreamDataset, as_training_data, stream_loader


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, batch_size: int = 256, device: Optional[str] = None,
             amp: str = "auto", num_workers: int = 0, progress: Optional[bool] = None,
             desc: str = "eval") -> Dict[str, float]:
    """Top-1 accuracy (%) of ``model`` on ``dataset`` (items ``(image tensor, label)``; an iterable or a
    :class:`~tokentune.engine.sources.StreamDataset` is read to its end, or to its ``epoch_size``).

    Under ``torchrun`` every process evaluates its own shard and the counts are summed, so the
    result is exact (no padded duplicates). A ``TensorDataset`` of images and labels held in memory
    is read in slices of its tensors (one process), without a DataLoader's copy of every image.

    Returns:
        ``{"top1": %, "correct": n, "total": n, "loss": mean cross-entropy}``.
    """
    from tqdm.auto import tqdm


    dev = torch.device(device) if isinstance(device, str) else (device or next(model.parameters()).device)
    dtype = amp_dtype(amp, dev)
    inf = D.info()
    dataset = as_training_data(dataset)
    if isinstance(dataset, StreamDataset):     # every process reads its share of the whole stream
        dataset.set_epoch(0)
        _, loader = stream_loader(dataset, batch_size, num_workers, False, dev.type == "cuda", inf.rank, inf.world_size,
                                  torch.Generator())        # its own generator: evaluation draws nothing from training's
    elif _in_memory(dataset) and inf.world_size == 1:     # slices of the tensors: no per-image copy and stack
        loader = [tuple(t[i:i + batch_size] for t in dataset.tensors) for i in range(0, len(dataset), batch_size)]
    else:
        sampler = D.ShardSampler(len(dataset), inf.rank, inf.world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                             pin_memory=dev.type == "cuda", generator=torch.Generator())
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    try:
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress_enabled(progress),
                                    dynamic_ncols=True):
            images = images.to(dev, non_blocking=True)
            targets = torch.as_tensor(targets).to(dev, non_blocking=True)
            with autocast(dev, dtype):
                logits = model(images)
            logits = logits.float()
            stats[0] += (logits.argmax(dim=-1) == targets).sum().item()
            stats[1] += targets.numel()
            stats[2] += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    except TokenTuneError as exc:
        raise TokenTuneError(error_line(exc)) from None
    finally:
        model.train(was_training)
    if inf.enabled:
        stats = D.all_reduce_sum(stats.to(dev)).cpu()
    correct, total, loss = stats.tolist()
    if total == 0:
        raise TokenTuneError("the evaluation split is empty; check the test split")
    return {"top1": 100.0 * correct / total, "correct": int(correct), "total": int(total), "loss": loss / total}


def _in_memory(dataset) -> bool:
    """Images and labels held as two tensors (a ``TensorDataset``): evaluated in slices."""
    return isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2


# ----------------------------------------------------------------------------- per-run results
def run_results(*, model: nn.Module, history: Sequence[Dict[str, Any]], dataset: Optional[Dict[str, Any]] = None,
                train_time_s: float = 0.0, epochs: int = 0, finished: bool = True,
                extra: Optional[Dict[str, Any]] = None, metric: str = "top1") -> Dict[str, Any]:
    """The ``results.json`` record of a run (see the module docstring); a task's run reports its own
    ``metric`` (e.g. ``miou``, ``best_miou_over_epochs``) and names it under ``metric``."""

    evals = [{"epoch": h["epoch"], metric: h[metric]} for h in history if h.get(metric) is not None]
    last = evals[-1] if evals else None
    best = max(evals, key=lambda e: e[metric]) if evals else None
    spec = spec_of(model) or {}
    dataset = dict(dataset or {})
    record = {
        "dataset": dataset.get("name"),
        "group": dataset.get("group"),
        "method": spec.get("method"),
        "model": spec.get("model"),
        **({"task": spec.get("task"), "metric": metric} if spec.get("task") else {}),
        metric: last[metric] if last else None,
        f"{metric}_epoch": last["epoch"] if last else None,
        f"best_{metric}_over_epochs": best[metric] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "evaluations": evals,
        "epochs": epochs,
        "epochs_done": len(history),
        "finished": finished,
        "train_time_s": round(float(train_time_s), 2),
        "params": count_parameters(model),
        "data": dataset,
        "tokentune_version": __version__,
    }
    if extra:
        record.update(extra)
    return record


def write_results(directory: str, record: Dict[str, Any]) -> str:
    path = RunDir(directory).results
    atomic_write_json(path, record)
    return path


def read_results(path: str) -> Dict[str, Any]:
    """``results.json`` of a run directory (or the file itself)."""
    file = os.path.join(path, RESULTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TokenTuneError(f"{path!r} has no {RESULTS_NAME}; pass run directories written by tokentune train "
                             "(a run that was interrupted has none until it finishes: continue it with --resume)")
    try:
        with open(file) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise TokenTuneError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def find_runs(paths: Iterable[str]) -> List[str]:
    """Run directories (holding ``results.json``) among ``paths`` and below them."""
    runs = []
    for path in paths:
        if os.path.isfile(path):
            runs.append(os.path.dirname(os.path.abspath(path)))
            continue
        if not os.path.isdir(path):
            raise TokenTuneError(f"{path!r} does not exist; pass run directories or a folder that contains them")
        found = sorted(dirpath for dirpath, _, files in os.walk(path) if RESULTS_NAME in files)
        if not found:
            raise TokenTuneError(f"no {RESULTS_NAME} under {path!r}; train runs first (tokentune train --out DIR)")
        runs.extend(found)
    return list(dict.fromkeys(runs))


# ----------------------------------------------------------------------------- VTAB summary
def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _vtab_task_of(rec: Dict[str, Any]) -> Optional[str]:
    """The VTAB-1k task a run record measured, or None (image folders and any other data)."""

    if (rec.get("data") or {}).get("kind") not in (None, "vtab"):
        return None           # an image folder named "cifar" is not VTAB-1k's cifar split
    try:
        return vtab_task(rec.get("dataset") or "").name
    except TokenTuneError:
        return None


def _dataset_name(rec: Dict[str, Any]) -> str:
    """A non-VTAB run's column name: its dataset name, else its data folder's name."""
    root = (rec.get("data") or {}).get("root")
    return rec.get("dataset") or (os.path.basename(os.path.normpath(root)) if root else "") or "unnamed dataset"


def _std(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (n - 1) of several runs (seeds); None for fewer than two."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _vtab_row(name: str, cells: Dict[str, List[float]]) -> Dict[str, Any]:

    per_task = {t: _mean(v) for t, v in cells.items()}
    groups = {}
    for g in VTAB_GROUPS:
        members = [t for t, task in VTAB_TASKS.items() if task.group == g]
        vals = [per_task[t] for t in members if t in per_task]
        groups[g] = {"mean": _mean(vals), "tasks": len(vals), "of": len(members)}
    group_means = [g["mean"] for g in groups.values() if g["mean"] is not None]
    return {
        "label": name,
        "per_task": per_task,
        "per_task_std": {t: _std(v) for t, v in cells.items()},
        "runs_per_task": {t: len(v) for t, v in cells.items()},
        "groups": groups,
        "mean_of_groups": _mean(group_means) if len(group_means) == len(VTAB_GROUPS) else None,
        "mean_of_tasks": _mean(list(per_task.values())),
        "num_tasks": len(per_task),
    }


def summarize(paths: Iterable[str], metric: str = "top1", label: str = "auto") -> Dict[str, Any]:
    """VTAB-1k summary of the runs under ``paths``, with runs on other data kept apart.

    Args:
        paths: run directories (or folders containing them).
        metric: ``top1`` (last epoch; the default and the number to report) or
            ``best_top1_over_epochs`` (optimistic, as some papers).
        label: how runs are grouped into rows: ``auto`` (the method, plus the model when several
            models appear), ``method``, ``model+method`` or ``dir`` (the parent folder name).

    Returns:
        A dict with ``rows`` (one per label with VTAB-1k runs: per-task accuracy, group means,
        ``mean_of_groups``, ``mean_of_tasks``, task counts), ``tasks`` (their column order),
        ``other_rows`` (one per label with runs on image folders, other non-VTAB data and tasks,
        whose column names the task's metric, e.g. ``ade20k (miou)``: ``per_dataset`` accuracy and
        ``runs_per_dataset``; never part of a VTAB mean),
        ``other_datasets`` (their column order, by dataset name) and ``metric``. Several runs of
        the same label and dataset (seeds) are averaged and counted.
    """

    if metric not in ("top1", "best_top1_over_epochs"):
        raise TokenTuneError(f"unknown metric {metric!r}; use top1 (last epoch) or best_top1_over_epochs")
    records = []
    for run in find_runs(paths):
        rec = read_results(run)
        rec["_dir"] = run
        records.append(rec)
    models = {r.get("model") for r in records}

    def row_label(rec):
        given = rec.get("label") or (rec.get("run") or {}).get("label")
        if label == "method" or (label == "auto" and len(models) <= 1):
            return given or str(rec.get("method"))
        if label in ("auto", "model+method"):
            return given or f"{rec.get('model')} {rec.get('method')}"
        if label == "dir":
            return os.path.basename(os.path.dirname(rec["_dir"])) or rec["_dir"]
        raise TokenTuneError(f"unknown label mode {label!r}; use auto, method, model+method or dir")

    vtab: Dict[str, Dict[str, List[float]]] = {}
    other: Dict[str, Dict[str, List[float]]] = {}
    for rec in records:
        own = rec.get("metric") or "top1"          # a task's run reports its own metric (e.g. miou)
        value = rec.get(metric if own == "top1" else (own if metric == "top1" else f"best_{own}_over_epochs"))
        if value is None:
            continue
        task = _vtab_task_of(rec) if own == "top1" and not rec.get("task") else None
        cells = (vtab if task else other).setdefault(row_label(rec), {})
        column = _dataset_name(rec) + (f" ({own})" if own != "top1" else "")
        cells.setdefault(task or column, []).append(float(value))
    if not vtab and not other:
        raise TokenTuneError(f"none of the {len(records)} run(s) has a {metric} value; they have not finished an evaluation")
    tasks = {t for cells in vtab.values() for t in cells}
    return {"metric": metric, "tasks": [t for t in VTAB_TASKS if t in tasks],
            "rows": [_vtab_row(name, cells) for name, cells in vtab.items()],
            "other_datasets": sorted({d for cells in other.values() for d in cells}),
            "other_rows": [{"label": name, "per_dataset": {d: _mean(v) for d, v in cells.items()},
                            "per_dataset_std": {d: _std(v) for d, v in cells.items()},
                            "runs_per_dataset": {d: len(v) for d, v in cells.items()}} for name, cells in other.items()],
            "runs": [r["_dir"] for r in records]}


def _fmt(value: Optional[float], partial: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" + ("*" if partial else "")


def _runs(count: Optional[int]) -> str:
    """How many runs a cell averages, when several do."""
    return f" (n={count})" if count and count > 1 else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def summary_markdown(summary: Dict[str, Any]) -> str:
    """The summary as Markdown: the VTAB-1k table, a table of the other datasets, and a legend."""

    tasks = summary["tasks"]
    lines: List[str] = []
    partial_seen = False
    if summary["rows"]:
        body = []
        for row in summary["rows"]:
            cells = [row["label"]] + [_fmt(row["per_task"].get(t)) + _runs(row["runs_per_task"].get(t)) for t in tasks]
            for g in VTAB_GROUPS:
                info = row["groups"][g]
                partial = info["mean"] is not None and info["tasks"] < info["of"]
                partial_seen |= partial
                cells.append(_fmt(info["mean"], partial))
            cells += [_fmt(row["mean_of_groups"]), _fmt(row["mean_of_tasks"]) + f" ({row['num_tasks']})"]
            body.append(cells)
        lines += _table(["method"] + tasks + list(VTAB_GROUPS) + ["Mean (3 groups)", "Mean (tasks)"], body) + [""]
    other_rows = summary.get("other_rows") or []
    if other_rows:
        datasets = summary["other_datasets"]
        if lines:
            lines += ["Other datasets (not VTAB-1k, in no mean above):", ""]
        lines += _table(["method"] + datasets,
                        [[row["label"]] + [_fmt(row["per_dataset"].get(d)) + _runs(row["runs_per_dataset"].get(d))
                                           for d in datasets] for row in other_rows])
        lines.append("")
    what = ("top-1 (%) on the test split after the last epoch" if summary["metric"] == "top1"
            else "BEST top-1 (%) over the evaluated epochs (selected on the test split: optimistic)")
    legend = f"Values: {what}."
    if summary["rows"]:
        legend += (" Group columns: mean over the group's tasks; 'Mean (3 groups)': mean of the "
                   "Natural/Specialized/Structured means (only when every group has a task); 'Mean (tasks)': mean "
                   "over the VTAB-1k tasks present (their count in brackets).")
    legend = [legend]
    if partial_seen:
        legend.append("* group mean over fewer tasks than the group has.")
    runs = [row["runs_per_task"] for row in summary["rows"]] + [row["runs_per_dataset"] for row in other_rows]
    if any(n > 1 for counts in runs for n in counts.values()):
        legend.append("A cell marked (n=K) is the mean of K runs with the same row label (seeds; tell other runs "
                      "apart with tokentune train --label or summarize --label dir).")
    return "\n".join(lines) + "\n" + "\n".join(legend) + "\n"
