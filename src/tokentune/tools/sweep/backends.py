"""Where cells run: ``local`` (processes on this machine, one device each) or ``slurm`` (submitit).

Both run a cell the same way (:mod:`.cells`: lock, ``tokentune train --config CELL --out DIR
[--resume]``, done/failed marker); they differ only in who starts that. Neither keeps state of its
own: a restarted controller reads the markers and locks and carries on.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ...errors import TokenTuneError
from ...fileio import atomic_write_json
from . import cells as C
from .spec import Cell, SlurmOptions

POLL_S = 0.5


@dataclass
class Progress:
    """Counts of the cells by state, told to ``on_change`` whenever they change."""

    states: Dict[str, str] = field(default_factory=dict)
    on_change: Optional[Callable[["Progress"], None]] = None

    def set(self, cell: Cell, state: str) -> None:
        if self.states.get(cell.name) != state:
            self.states[cell.name] = state
            if self.on_change is not None:
                self.on_change(self)

    def counts(self) -> Dict[str, int]:
        out = {k: 0 for k in (C.DONE, C.RUNNING, C.FAILED, "queued")}
        for state in self.states.values():
            out[state if state in out else "queued"] += 1
        return out


def worker_envs(workers: int) -> List[Dict[str, str]]:
    """One environment per local worker: its own GPU where there are GPUs, else a share of the CPU threads."""
    base = dict(os.environ)
    visible = base.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    envs = []
    for i in range(workers):
        env = dict(base)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        else:
            threads = str(max(1, (os.cpu_count() or 1) // workers))
            env.setdefault("OMP_NUM_THREADS", threads)
            env.setdefault("MKL_NUM_THREADS", threads)
        envs.append(env)
    return envs


def run_local(sweep: C.SweepDir, cells: Sequence[Cell], workers: int, progress: Progress) -> None:
    """Run ``cells`` on this machine, ``workers`` at a time; cells another live process runs are waited for.

    SIGTERM/SIGINT stop the running cells (each saves its checkpoint) and return; kill -9 of this
    process stops them too (they get SIGTERM), and the next start resumes them."""
    envs = worker_envs(workers)
    free = list(range(workers))
    running: Dict[str, tuple] = {}          # cell name -> (cell, process, worker slot)
    todo = [c for c in cells]
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True
        for _, proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        last_beat = time.monotonic()
        while (todo and not stop["now"]) or running:
            waiting = []
            for cell in todo:
                if stop["now"] or not free:
                    waiting.append(cell)
                    continue
                state = sweep.state(cell)
                if state in (C.DONE, C.FAILED):
                    progress.set(cell, state)
                    continue
                proc = C.start(sweep, cell, envs[free[0]]) if state != C.RUNNING else None
                if proc is None:            # another process runs it: wait for that one
                    progress.set(cell, C.RUNNING)
                    waiting.append(cell)
                    continue
                running[cell.name] = (cell, proc, free.pop(0))
                progress.set(cell, C.RUNNING)
            todo = waiting
            for name, (cell, proc, slot) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    del running[name]
                    free.append(slot)
                    progress.set(cell, C.finish(sweep, cell, code))
            if time.monotonic() - last_beat > C.HEARTBEAT_S:
                last_beat = time.monotonic()
                for cell, _, _ in running.values():
                    C.heartbeat(sweep, cell)
            if todo or running:
                time.sleep(POLL_S)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop["now"]:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- slurm (submitit)
def _submitit():
    try:
        import submitit
    except ImportError:
        raise TokenTuneError("the slurm backend needs submitit: pip install 'tokentune[sweep]'") from None
    return submitit


def make_cell_job(root: str):
    """A submitit Checkpointable that runs one cell; on preemption or time-out submitit requeues it and the
    cell resumes its run directory exactly."""
    submitit = _submitit()

    class CellJob(submitit.helpers.Checkpointable):
        def __init__(self, root: str) -> None:
            self.root = root

        def __call__(self, cell: Cell) -> str:
            return C.run_blocking(C.SweepDir(self.root), cell)

    return CellJob(root)


def slurm_executor(sweep: C.SweepDir, options: SlurmOptions, cluster: Optional[str] = None):
    """A submitit executor for the sweep's Slurm options (``cluster="local"``: submitit's local executor,
    which runs the same job code as processes on this machine)."""
    submitit = _submitit()
    try:
        executor = submitit.AutoExecutor(folder=os.path.join(sweep.root, ".sweep", "submitit"),
                                         cluster=cluster or "slurm", slurm_max_num_timeout=options.max_requeue)
    except RuntimeError as exc:       # no srun/sbatch here
        raise TokenTuneError(f"the slurm backend needs Slurm ({' '.join(str(exc).split())}): start the sweep on a login "
                             "node, or try the sweep file on this machine with --slurm-cluster local") from None
    params: Dict[str, Any] = dict(timeout_min=options.time_min, gpus_per_node=options.gpus_per_task,
                                  cpus_per_task=options.cpus_per_task, tasks_per_node=1, nodes=1,
                                  name="tokentune-sweep", slurm_array_parallelism=options.array_parallelism)
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(options, key) is not None:
            params[f"slurm_{key}"] = getattr(options, key)
    if options.additional:
        params["slurm_additional_parameters"] = dict(options.additional)
    try:
        executor.update_parameters(**params)
    except (ValueError, NameError, TypeError, AssertionError) as exc:     # submitit checks types with assert
        raise TokenTuneError(f"submitit rejects the slurm options: {' '.join(str(exc).split())[:300]}") from None
    return executor


def run_slurm(sweep: C.SweepDir, cells: Sequence[Cell], options: SlurmOptions, progress: Progress,
              cluster: Optional[str] = None, wait: bool = True) -> List[Any]:
    """Submit the cells that are neither done, failed nor running as one job array (at most
    ``array_parallelism`` at once), then (``wait``) follow them through the markers until all have ended."""
    executor = slurm_executor(sweep, options, cluster)
    todo = []
    for cell in cells:
        state = sweep.state(cell)
        progress.set(cell, state if state in (C.DONE, C.FAILED, C.RUNNING) else "queued")
        if state not in (C.DONE, C.FAILED, C.RUNNING):
            todo.append(cell)
    job = make_cell_job(sweep.root)
    # Slurm limits the array's concurrency itself; submitit's local executor has no such limit, so waves
    wave = len(todo) if executor.cluster == "slurm" else max(1, options.array_parallelism)
    jobs: List[Any] = []
    for start in range(0, len(todo), wave):
        part = todo[start:start + wave]
        try:
            submitted = executor.map_array(job, part)
        except Exception as exc:  # noqa: BLE001 - sbatch's refusal (bad partition, limits) in one line
            raise TokenTuneError(f"the cluster refused the job array: {' '.join(str(exc).split())[:300]}") from None
        jobs.extend(submitted)
        if wait or start + wave < len(todo):
            _follow(sweep, part, submitted, progress)
    return jobs


def _follow(sweep: C.SweepDir, cells: Sequence[Cell], jobs: Sequence[Any], progress: Progress) -> None:
    """Update ``progress`` from the markers until every job has ended; a job that died outside its cell
    (node failure, out of memory before the cell started) is recorded as the cell's failure."""
    pending = {c.name: (c, j) for c, j in zip(cells, jobs)}
    while pending:
        for name, (cell, job) in list(pending.items()):
            state = sweep.state(cell)
            progress.set(cell, state if state in (C.DONE, C.FAILED, C.RUNNING) else "queued")
            if not job.done():
                continue
            del pending[name]
            if sweep.state(cell) not in (C.DONE, C.FAILED):
                try:
                    job.result()
                    error = "the job ended without finishing the cell"
                except Exception as exc:  # noqa: BLE001 - recorded as the cell's error line
                    error = " ".join(str(exc).split())[-300:]
                atomic_write_json(sweep.path("failed", cell, ".json"), {"returncode": None, "error": error})
            progress.set(cell, sweep.state(cell))
        if pending:
            time.sleep(POLL_S * 4)
