"""The ``tokentune`` command line: one module per subcommand, each with ``add(parser)`` (declare
its options), ``run(args) -> exit code``, ``HELP`` and ``DESCRIPTION``; :mod:`.options` turns
config dataclasses into options.

Adding a subcommand: write ``tokentune/cli/<name>.py`` with those four names and list it in
:data:`COMMANDS` (or call :func:`register_command` from another package before :func:`main`).
Errors are one line (``error: ...``) with exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..errors import TokenTuneError, error_line
from ..version import __version__
from . import accelerate, bench, data, demo, export, search, summarize, sweep, train, viz
from . import eval as eval_
from .config import add_config_options, apply_config_file, config_path, leaf_parser, render_config
from .options import DEFAULT_MODEL, DataclassOption, add_dataclass_options, convert, describe, field_docs  # noqa: F401


@dataclass
class Command:
    """A subcommand: ``add(parser)`` declares its options, ``run(args) -> exit code`` runs it."""

    help: str
    add: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def _command(module) -> Command:
    return Command(module.HELP, module.add, module.run, module.DESCRIPTION)


#: Subcommands in ``--help`` order.
COMMANDS: Dict[str, Command] = {
    "train": _command(train), "eval": _command(eval_), "summarize": _command(summarize), "demo": _command(demo),
    "export": _command(export), "viz": _command(viz), "bench": _command(bench), "data": _command(data),
    "search": _command(search), "accelerate": _command(accelerate), "sweep": _command(sweep),
}


def register_command(name: str, command: Command) -> None:
    COMMANDS[name] = command


EPILOG = """examples:
  tokentune demo
  tokentune train --data vtab-1k --dataset cifar --method lora --pretrained ViT-B_16.npz --out runs/cifar-lora
  tokentune train --data vtab-1k --dataset cifar --method lora+tome --tome-r 16x11,10 --pretrained ViT-B_16.npz
  tokentune train --out runs/cifar-lora --resume
  tokentune eval runs/cifar-lora --deploy
  tokentune summarize runs/
  tokentune export runs/cifar-lora exported/cifar-lora --onnx
  tokentune viz merge runs/cifar-pyra image.jpg --out merge.png
  tokentune data prepare-vtab dumps/cifar --task cifar --out vtab-1k
  tokentune search diffrate runs/cifar-lora --target-gmacs 8.7 --out cifar-rates.json
  tokentune accelerate runs/cifar-lora --target-speedup 1.5 --batch-size 64 --out fast/cifar
  tokentune train --config cifar-lora.yaml --lr 3e-3
  tokentune sweep vtab.yaml --workers 2
Run 'tokentune COMMAND --help' for every option of a command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokentune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Adapt pretrained Vision Transformers cheaply (LoRA, adapters) and run them fast "
                    "(ToMe, PYRA, Dynamic Tuning).")
    parser.add_argument("--version", action="version", version=f"tokentune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add(p)
        p.set_defaults(_run=cmd.run)
        for leaf in _leaves(p):
            add_config_options(leaf)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> List[argparse.ArgumentParser]:
    """The parsers that hold a command's options: itself, or its sub-subcommands (``viz merge``, ...)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return [parser] if sub is None else [leaf for p in dict.fromkeys(sub.choices.values()) for leaf in _leaves(p)]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``tokentune`` console script; returns the exit code."""
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        leaf = leaf_parser(parser, argv)
        path = config_path(leaf, argv) if leaf is not None else None
        if leaf is not None and path is not None:
            apply_config_file(leaf, path)
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 2
        if getattr(args, "print_config", False):
            print(render_config(leaf, args), end="")
            return 0
        return int(args._run(args) or 0)
    except TokenTuneError as exc:
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if rank != "0" else ""
        print(f"{prefix}error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a training run keeps its last checkpoint: continue it with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only out-of-memory becomes a one-line error; bugs keep their traceback
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        print("error: out of GPU memory; lower --batch-size (keep the optimizer batch with --grad-accum), add "
              "--grad-checkpointing or use --amp bf16", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
