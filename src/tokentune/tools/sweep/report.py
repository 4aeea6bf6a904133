"""The end of a sweep: per-task top-1 (mean ± std over seeds), the VTAB-1k group means and overall
means exactly as ``tokentune summarize`` computes them, the published number of a recipe's paper
beside ours, as Markdown and CSV, and an accuracy-versus-GMACs picture over the methods."""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, List, Optional, Sequence

from ...core.flops import count_flops
from ...core.method import get_recipe
from ...engine.data import VTAB_GROUPS
from ...engine.evaluate import summarize
from ...errors import TokenTuneError
from ...fileio import atomic_write_json, atomic_write_text
from ..export import example_images, open_model
from ..viz.tradeoff import TradeoffPoint, plot_tradeoff
from .spec import Cell


def _fmt(mean: Optional[float], std: Optional[float] = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def published_of(cells: Sequence[Cell]) -> Dict[str, Dict[str, Any]]:
    """{row label: the recipe's published numbers} for rows that run a recipe as it is (no grid option)."""
    out = {}
    for cell in cells:
        recipe = cell.options.get("recipe")
        if recipe and cell.label == recipe:
            published = get_recipe(recipe).published
            if published:
                out[cell.label] = published
    return out


def sweep_summary(run_dirs: Sequence[str], cells: Sequence[Cell]) -> Dict[str, Any]:
    """``tokentune summarize``'s summary of the finished runs, with the published numbers added per row."""
    if not run_dirs:
        raise TokenTuneError("no cell of the sweep has finished yet; nothing to summarize")
    summary = summarize(run_dirs, metric="top1", label="method")
    published = published_of(cells)
    for row in summary["rows"] + summary.get("other_rows", []):
        row["published"] = published.get(row["label"])
    return summary


def _published_text(published: Optional[Dict[str, Any]]) -> str:
    if not published:
        return "-"
    values = [f"{k} {v:.2f}" for k, v in published.items() if k != "source" and isinstance(v, (int, float))]
    return "; ".join(values) + (f" ({published['source']})" if published.get("source") else "")


def summary_table(summary: Dict[str, Any]) -> str:
    """The sweep's Markdown table (mean ± std over seeds, run counts, published numbers)."""
    tasks = summary["tasks"]
    lines: List[str] = []
    if summary["rows"]:
        header = ["method"] + tasks + list(VTAB_GROUPS) + ["Mean (3 groups)", "Mean (tasks)", "runs", "published"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in summary["rows"]:
            cells = [row["label"]] + [_fmt(row["per_task"].get(t), row["per_task_std"].get(t)) for t in tasks]
            cells += [_fmt(row["groups"][g]["mean"]) for g in VTAB_GROUPS]
            cells += [_fmt(row["mean_of_groups"]), _fmt(row["mean_of_tasks"]) + f" ({row['num_tasks']})",
                      str(sum(row["runs_per_task"].values())), _published_text(row.get("published"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("other_rows"):
        datasets = summary["other_datasets"]
        lines += ["| " + " | ".join(["method"] + datasets + ["runs"]) + " |", "|" + "---|" * (len(datasets) + 2)]
        for row in summary["other_rows"]:
            cells = [row["label"]] + [_fmt(row["per_dataset"].get(d), row["per_dataset_std"].get(d)) for d in datasets]
            lines.append("| " + " | ".join(cells + [str(sum(row["runs_per_dataset"].values()))]) + " |")
        lines.append("")
    lines.append("Values: top-1 (%) on the test split after the last epoch, mean ± sample std over the seeds "
                 "(± only where a cell has several runs). Group and overall means as tokentune summarize "
                 "computes them (means of the per-task means); 'runs': runs in the row; 'published': what the "
                 "recipe's paper reports, measured as it says.")
    return "\n".join(lines) + "\n"


def summary_csv(summary: Dict[str, Any]) -> str:
    """One line per (row, column): label, column, mean, std, runs."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "column", "mean", "std", "runs"])
    for row in summary["rows"]:
        for t in summary["tasks"]:
            if t in row["per_task"]:
                writer.writerow([row["label"], t, row["per_task"][t], row["per_task_std"][t] or "",
                                 row["runs_per_task"][t]])
        for g in VTAB_GROUPS:
            writer.writerow([row["label"], g, row["groups"][g]["mean"] or "", "", row["groups"][g]["tasks"]])
        writer.writerow([row["label"], "mean_of_groups", row["mean_of_groups"] or "", "", ""])
        writer.writerow([row["label"], "mean_of_tasks", row["mean_of_tasks"], "", row["num_tasks"]])
    for row in summary.get("other_rows", []):
        for d, mean in row["per_dataset"].items():
            writer.writerow([row["label"], d, mean, row["per_dataset_std"][d] or "", row["runs_per_dataset"][d]])
    return buf.getvalue()


def gmacs_of(run_dir: str) -> float:
    """Multiply-adds per image (billions) of a finished run's model, as deployed."""
    model = open_model(run_dir)
    images = example_images(model, batch_size=1)
    return count_flops(model, images) / 2e9


def write_report(out: str, summary: Dict[str, Any], first_run: Dict[str, str], picture: bool = True) -> Dict[str, str]:
    """``sweep.md``, ``sweep.csv``, ``sweep.json`` and (with matplotlib) ``sweep-tradeoff.png`` in ``out``."""
    files = {"markdown": os.path.join(out, "sweep.md"), "csv": os.path.join(out, "sweep.csv"),
             "json": os.path.join(out, "sweep.json")}
    atomic_write_text(files["markdown"], summary_table(summary))
    atomic_write_text(files["csv"], summary_csv(summary))
    if picture and summary["rows"]:
        points = _tradeoff_points(summary, first_run)
        summary["gmacs"] = {p.label: p.gmacs for p in points}
        try:
            files["picture"] = plot_tradeoff(points, os.path.join(out, "sweep-tradeoff.png"), x="gmacs",
                                             title="VTAB-1k mean over tasks vs multiply-adds")
        except TokenTuneError as exc:
            summary["picture_skipped"] = str(exc)
    atomic_write_json(files["json"], summary)
    return files


def _tradeoff_points(summary: Dict[str, Any], first_run: Dict[str, str]) -> List[TradeoffPoint]:
    return [TradeoffPoint(label=row["label"], accuracy=row["mean_of_tasks"], gmacs=gmacs_of(first_run[row["label"]]),
                          runs=sum(row["runs_per_task"].values())) for row in summary["rows"] if row["label"] in first_run]
