"""``tokentune sweep``: a grid of training runs (tasks x methods x seeds x options), locally or on Slurm,
ending in the VTAB-1k table (:mod:`tokentune.tools.sweep`)."""
from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Dict, Union

from ..core.factory import check_model_options
from ..errors import TokenTuneError
from ..tools.sweep import SweepResult, parse_sweep, read_sweep_file, run_sweep
from . import train
from .config import config_values

HELP = "run a grid of training runs (tasks x methods x seeds x options) locally or on Slurm, then the table"
DESCRIPTION = ("Every cell is a normal run directory below the sweep's 'out': a finished cell is skipped, an "
               "unfinished one resumes exactly, a failed one is reported with its error line (run it again with "
               "--retry-failed). Kill the sweep at any moment and start it again: nothing finished is lost and no "
               "cell runs twice. The sweep file (YAML) names tasks (VTAB-1k names, natural/specialized/structured/"
               "all, or {name, image_folder}), methods (specs or recipe:NAME), seeds, grid and options (train options "
               "as in a --config file), backend (local/slurm), workers and slurm settings; see the README. With "
               "'backend: slurm', run it on a Slurm login node: the cells go out as one job array through submitit "
               "(sbatch --array=0-N%array_parallelism), preempted or timed-out cells requeue and resume.")


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="SWEEP.yaml", help="the sweep file")
    parser.add_argument("--dry-run", action="store_true", help="print the cells (and their states) and exit")
    parser.add_argument("--status", action="store_true", help="print every cell's state and exit")
    parser.add_argument("--workers", type=int, metavar="N", default=None,
                        help="local backend: cells run at once, one GPU each (else the CPU threads split) "
                             "[default: the file's, else 1]")
    parser.add_argument("--backend", choices=["local", "slurm"], default=None, help="[default: the file's, else local]")
    parser.add_argument("--retry-failed", action="store_true", help="run the failed cells again")
    parser.add_argument("--no-wait", action="store_true", help="slurm: return once the job array is submitted")
    parser.add_argument("--slurm-cluster", choices=["slurm", "local"], default=None,
                        help="submitit executor of the slurm backend; 'local' runs the same job code as processes on "
                             "this machine (a test of a sweep file before a cluster) [default: slurm]")
    parser.add_argument("--no-picture", action="store_true", help="no accuracy-versus-GMACs picture")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@functools.lru_cache(maxsize=1)
def _train_parser() -> argparse.ArgumentParser:
    """The train command's parser, built once (it is only read)."""
    parser = argparse.ArgumentParser(add_help=False)
    train.add(parser)
    return parser


def check_train_options(options: Dict[str, Any], where: str) -> None:
    """A cell's options checked exactly as ``tokentune train --config`` checks them before reading data
    (option names and values, the recipe, the method's options against its spec): one line each."""
    args = argparse.Namespace(**config_values(_train_parser(), options, where))
    try:
        opts = train._resolve_train_options(args)
        check_model_options(opts["method"], opts["model_options"])
    except TokenTuneError as exc:
        raise TokenTuneError(f"{where}: {exc}") from None


def sweep(file_or_spec: Union[str, Dict[str, Any]], **kwargs) -> SweepResult:
    """Run (or continue) a sweep from a sweep file's path or its mapping; keywords as :func:`tokentune.tools.sweep.run_sweep`.

    Example::

        result = tokentune.sweep("vtab.yaml", workers=2)
        print(result.files["markdown"])
    """
    spec = read_sweep_file(file_or_spec) if isinstance(file_or_spec, str) else parse_sweep(file_or_spec)
    return run_sweep(spec, check=check_train_options, **kwargs)


def _print_cells(result: SweepResult, verbose: bool) -> None:
    counts: Dict[str, int] = {}
    for state in result.states.values():
        counts[state] = counts.get(state, 0) + 1
    if verbose:
        width = max(len(c.name) for c in result.cells)
        for cell in result.cells:
            print(f"{cell.name:<{width}}  {result.states[cell.name]:<8} {cell.label}")
    print(f"{len(result.cells)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def run(args: argparse.Namespace) -> int:
    spec = read_sweep_file(args.file)
    if args.status or args.dry_run:
        result = run_sweep(spec, check=check_train_options, dry_run=True)
        _print_cells(result, verbose=True)
        return 0
    result = run_sweep(spec, check=check_train_options, workers=args.workers, backend=args.backend,
                       retry_failed=args.retry_failed, progress=False if args.no_progress else None,
                       cluster=None if args.slurm_cluster in (None, "slurm") else args.slurm_cluster,
                       wait=not args.no_wait, picture=not args.no_picture)
    _print_cells(result, verbose=False)
    for name, error in result.failed.items():
        print(f"failed: {name}: {error}  (log: {os.path.join(spec.out, '.sweep', 'logs', name.replace(os.sep, '__'))}.log)")
    if result.files.get("markdown"):
        with open(result.files["markdown"], encoding="utf-8") as fh:
            print(fh.read(), end="")
        print("table: " + ", ".join(result.files[k] for k in ("markdown", "csv", "json", "picture") if k in result.files))
    return 1 if result.failed else 0
