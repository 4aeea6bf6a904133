"""Experiments at the papers' scale: a grid of ``tokentune train`` runs (tasks x methods x seeds x
options) on this machine's devices or on a Slurm cluster (submitit), surviving kills and
preemption, ending in the VTAB-1k table.

* :mod:`.spec`: the sweep file and its cells;
* :mod:`.cells`: a cell's state on disk, its lock and its run (``tokentune train`` in a process);
* :mod:`.backends`: ``local`` (``workers`` processes, one device each) and ``slurm`` (submitit);
* :mod:`.report`: the final table (Markdown, CSV, JSON) and the accuracy-versus-GMACs picture.

:func:`run_sweep` joins them; ``tokentune sweep FILE`` and :func:`tokentune.sweep` call it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from tqdm.auto import tqdm

from ...engine.config import TrainConfig
from ...engine.data import vtab_dataset
from ...errors import TokenTuneError
from . import cells as C
from .backends import Progress, run_local, run_slurm
from .report import sweep_summary, write_report
from .spec import Cell, SlurmOptions, SweepSpec, check_cells, expand_cells, parse_sweep, read_sweep_file

__all__ = ["Cell", "SlurmOptions", "SweepResult", "SweepSpec", "cell_states", "check_data", "expand_cells",
           "parse_sweep", "read_sweep_file", "run_sweep"]


@dataclass
class SweepResult:
    """What a sweep ended with.

    Attributes:
        cells: every cell, in order.
        states: {cell name: done / failed / running / resume / new}.
        failed: {cell name: its error line}.
        summary: the table's data (``tokentune summarize``'s, with std and published numbers), None when no cell finished.
        files: the report files written (markdown, csv, json, picture).
    """

    cells: List[Cell]
    states: Dict[str, str]
    failed: Dict[str, str] = field(default_factory=dict)
    summary: Optional[Dict[str, Any]] = None
    files: Dict[str, str] = field(default_factory=dict)


def check_data(cells: List[Cell]) -> None:
    """Every cell's data exists (the VTAB-1k task folder and split files, the image folder): one line naming
    the first task whose data is missing, before anything starts."""
    seen = set()
    for cell in cells:
        o = cell.options
        splits = (o.get("train_split", TrainConfig.train_split), o.get("test_split", TrainConfig.test_split))
        key = (o.get("data"), o.get("dataset"), o.get("image_folder"), splits)
        if key in seen:
            continue
        seen.add(key)
        try:
            if o.get("image_folder"):
                if not os.path.isdir(str(o["image_folder"])):
                    raise TokenTuneError(f"image folder {o['image_folder']!r} does not exist")
            elif o.get("dataset") and o.get("data") and not o.get("task"):
                for split in splits:
                    vtab_dataset(str(o["data"]), str(o["dataset"]), split=split, check_files=False)
        except TokenTuneError as exc:
            raise TokenTuneError(f"task {cell.task!r}: {exc}") from None


def cell_states(spec: SweepSpec, cells: Optional[List[Cell]] = None) -> Dict[str, str]:
    """The state of every cell, read from the sweep's folder."""
    sweep = C.SweepDir(spec.out)
    return {c.name: sweep.state(c) for c in (cells if cells is not None else expand_cells(spec))}


def _bar(total: int, enabled: Optional[bool]):
    bar = tqdm(total=total, desc="sweep", unit="cell", disable=False if enabled else None if enabled is None else True,
               dynamic_ncols=True)

    def update(progress: Progress) -> None:
        counts = progress.counts()
        bar.n = counts[C.DONE] + counts[C.FAILED]
        bar.set_postfix(done=counts[C.DONE], running=counts[C.RUNNING], failed=counts[C.FAILED],
                        queued=counts["queued"], refresh=False)
        bar.refresh()
    return bar, update


def run_sweep(spec: SweepSpec, *, check: Optional[Callable[[Dict[str, Any], str], None]] = None,
              dry_run: bool = False, workers: Optional[int] = None, backend: Optional[str] = None,
              retry_failed: bool = False, progress: Optional[bool] = None, cluster: Optional[str] = None,
              wait: bool = True, picture: bool = True) -> SweepResult:
    """Run (or continue) the sweep ``spec`` and write its table.

    Args:
        spec: the parsed sweep file (:func:`read_sweep_file` / :func:`parse_sweep`).
        check: ``check(options, where)`` validates a cell's train options (the command line passes the
            train command's own checks); every distinct option set is checked before anything runs.
        dry_run: only expand and check the cells and read their states.
        workers, backend: override the file's.
        retry_failed: run failed cells again (else they are reported and skipped).
        progress: show the progress bar (None: on a terminal).
        cluster: submitit's cluster for the slurm backend (None: Slurm; ``"local"``: submitit's local
            executor, which runs the same job code as processes here).
        wait: slurm backend: follow the jobs until they end (else return after submitting).
        picture: draw the accuracy-versus-GMACs picture (needs matplotlib).
    """
    cells = expand_cells(spec)
    if check is not None:
        check_cells(cells, check, spec.source)
    check_data(cells)
    sweep = C.SweepDir(spec.out)
    if dry_run:
        return SweepResult(cells, cell_states(spec, cells))
    sweep.prepare()
    if retry_failed:
        for cell in cells:
            sweep.clear_failure(cell)
    bar, update = _bar(len(cells), progress)
    state = Progress(on_change=update)
    try:
        if (backend or spec.backend) == "slurm":
            run_slurm(sweep, cells, spec.slurm, state, cluster=cluster, wait=wait)
        else:
            run_local(sweep, cells, workers or spec.workers, state)
    finally:
        bar.close()
    states = cell_states(spec, cells)
    failed = {c.name: str((sweep.failure(c) or {}).get("error")) for c in cells if states[c.name] == C.FAILED}
    result = SweepResult(cells, states, failed)
    finished = [c for c in cells if states[c.name] == C.DONE]
    if finished:
        first = {}
        for c in finished:
            first.setdefault(c.label, c.run_dir)
        result.summary = sweep_summary([c.run_dir for c in finished], cells)
        result.files = write_report(spec.out, result.summary, first, picture=picture)
    return result
