"""``tokentune demo``: the offline demo on scikit-learn's digits."""
from __future__ import annotations

import argparse

from ..tools.demo import DemoConfig, run_demo
from ..tools.task_demo import TASKS, TaskDemoConfig, run_task_demo
from .options import add_dataclass_options

HELP = "offline demo on scikit-learn's digits (about 2 minutes on a 2-core CPU)"
DESCRIPTION = ("Pre-train a tiny ViT on digits 0-4, adapt it to digits 5-9 with several methods and print accuracy, "
               "trainable parameters, tokens, FLOPs and throughput side by side. No download.")


def add(parser: argparse.ArgumentParser) -> None:

    g = parser.add_argument_group("demo options (tokentune.demo.DemoConfig)")
    add_dataclass_options(g, DemoConfig, "", "d__")
    parser.add_argument("--task", choices=list(TASKS), default=None,
                        help="run a task demo instead: segmentation (digit scenes and masks) or video (moving digits); "
                             "it takes --seed, --threads, --cache, --workdir, --progress, --epochs, --lr, --batch-size")


def run(args: argparse.Namespace) -> int:

    given = {k[3:]: v for k, v in vars(args).items() if k.startswith("d__")}
    if args.task:
        shared = {k: v for k, v in given.items() if k in TaskDemoConfig.__dataclass_fields__}
        run_task_demo(TaskDemoConfig(task=args.task, **shared))
        return 0
    run_demo(DemoConfig(**given))
    return 0
