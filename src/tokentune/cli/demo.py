"""``tokentune demo``: the offline demo on scikit-learn's digits."""
from __future__ import annotations

import argparse

from ..tools.demo import DemoConfig, run_demo
from .options import add_dataclass_options

HELP = "offline demo on scikit-learn's digits (about 2 minutes on a 2-core CPU)"
DESCRIPTION = ("Pre-train a tiny ViT on digits 0-4, adapt it to digits 5-9 with several methods and print accuracy, "
               "trainable parameters, tokens, FLOPs and throughput side by side. No download.")


def add(parser: argparse.ArgumentParser) -> None:

    g = parser.add_argument_group("demo options (tokentune.demo.DemoConfig)")
    add_dataclass_options(g, DemoConfig, "", "d__")


def run(args: argparse.Namespace) -> int:

    cfg = DemoConfig(**{k[3:]: v for k, v in vars(args).items() if k.startswith("d__")})
    run_demo(cfg)
    return 0
