"""``tokentune summarize``: the VTAB-1k table over run directories."""
from __future__ import annotations

import argparse

from ..engine.evaluate import summarize, summary_markdown
from ..fileio import atomic_write_json, atomic_write_text

HELP = "VTAB-1k table over run directories"
DESCRIPTION = ("Per-task top-1, Natural/Specialized/Structured means, the mean of the 3 group means and the mean "
               "over tasks, as Markdown (and JSON).")


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directories, or folders that contain them")
    parser.add_argument("--metric", choices=["top1", "best"], default="top1",
                        help="top1: after the last epoch (report this); best: best over the evaluated epochs "
                             "(optimistic, labelled as such) [default: top1]")
    parser.add_argument("--label", choices=["auto", "method", "model+method", "dir"], default="auto",
                        help="how runs form rows: by method (auto adds the model when several appear), or by "
                             "the name of the folder holding the run [default: auto]")
    parser.add_argument("--md", metavar="FILE", default=None, help="also write the Markdown table to FILE")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the summary as JSON to FILE")


def run(args: argparse.Namespace) -> int:

    metric = "best_top1_over_epochs" if args.metric == "best" else "top1"
    summary = summarize(args.paths, metric=metric, label=args.label)
    text = summary_markdown(summary)
    print(text, end="")
    if args.md:
        atomic_write_text(args.md, text)
    if args.json:
        atomic_write_json(args.json, summary)
    return 0
