"""Where cells run: ``local`` (processes on this machine, one device each) or ``slurm`` (submitit).

Both run a cell the same way (:mod:`.cells`: lock, ``tokentune train --config CELL --out DIR
[--resume]``, done/failed marker); they differ only in who starts that. Neither keeps state of its
own: a restarted controller reads the markers and locks and carries on.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
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
    # one thread count for OpenMP and MKL: the one set, else a share of the cores (torch sizes its OpenMP pool
    # from MKL_NUM_THREADS when only that is set, so a lone OMP_NUM_THREADS=1 would not hold)
    threads = base.get("OMP_NUM_THREADS") or base.get("MKL_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // workers))
    envs = []
    for i in range(workers):
        env = dict(base)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        else:
            env.setdefault("OMP_NUM_THREADS", threads)
            env.setdefault("MKL_NUM_THREADS", threads)
        envs.append(env)
    return envs


def _watch(proc, name: str, exited: "queue.Queue[str]") -> None:
    """Tell ``exited`` the moment ``proc`` ends (a thread per running cell: the controller sleeps until then)."""
    def wait() -> None:
        proc.wait()
        exited.put(name)
    threading.Thread(target=wait, name=f"sweep-wait-{proc.pid}", daemon=True).start()


def run_local(sweep: C.SweepDir, cells: Sequence[Cell], workers: int, progress: Progress) -> None:
    """Run ``cells`` on this machine, ``workers`` at a time; cells another live process runs are waited for.

    The controller sleeps until one of its cells' processes exits (then starts the next cell at
    once), waking every ``HEARTBEAT_S`` to refresh the running cells' locks, and every ``POLL_S``
    only while a cell waits for another process's lock. SIGTERM/SIGINT stop the running cells
    (each saves its checkpoint) and return; kill -9 of this process stops them too (they get
    SIGTERM), and the next start resumes them."""
    envs = worker_envs(workers)
    free = list(range(workers))
    running: Dict[str, tuple] = {}          # cell name -> (cell, process, worker slot)
    exited: "queue.Queue[str]" = queue.Queue()
    todo = list(cells)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True
        for _, proc, _ in list(running.values()):
            proc.send_signal(signal.SIGTERM)
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        last_beat = time.monotonic()
        while (todo and not stop["now"]) or running:
            todo, held = _start_free(sweep, todo, free, envs, running, exited, progress, stop)
            if not running and not (todo and held):
                continue
            try:        # sleep until a cell's process exits (a signal runs _stop meanwhile)
                names = [exited.get(timeout=POLL_S if held else max(0.0, last_beat + C.HEARTBEAT_S - time.monotonic()))]
            except queue.Empty:
                names = []
            while not exited.empty():
                names.append(exited.get_nowait())
            for name in names:
                cell, proc, slot = running.pop(name)
                free.append(slot)
                progress.set(cell, C.finish(sweep, cell, proc.returncode))
            if time.monotonic() - last_beat >= C.HEARTBEAT_S:
                last_beat = time.monotonic()
                for cell, _, _ in running.values():
                    C.heartbeat(sweep, cell)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop["now"]:
        raise KeyboardInterrupt


def _start_free(sweep: C.SweepDir, todo: List[Cell], free: List[int], envs: List[Dict[str, str]],
                running: Dict[str, tuple], exited: "queue.Queue[str]", progress: Progress,
                stop: Dict[str, bool]) -> tuple:
    """Start cells of ``todo`` on the free worker slots; returns the cells still to run and whether one of
    them waits for another process's lock."""
    waiting, held = [], False
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
            held = True
            continue
        running[cell.name] = (cell, proc, free.pop(0))
        _watch(proc, cell.name, exited)
        progress.set(cell, C.RUNNING)
    return waiting, held


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
    """Submit the cells that are neither done, failed nor running, then (``wait``) follow them through the
    markers until all have ended.

    On Slurm the cells go out as one job array, which Slurm runs at most ``array_parallelism`` at once.
    submitit's local executor has no such limit, so there each cell is its own job, at most
    ``array_parallelism`` at once, the next submitted as soon as one ends. Cells another live process
    runs (a job of an earlier, killed controller) are followed too, and submitted if they end unfinished."""
    executor = slurm_executor(sweep, options, cluster)
    job = make_cell_job(sweep.root)
    limit = None if executor.cluster == "slurm" else max(1, options.array_parallelism)
    pending, in_flight, jobs = list(cells), {}, []
    while pending or in_flight:
        ready, held = _ready(sweep, pending, progress)
        room = len(ready) if limit is None else max(0, limit - len(in_flight))
        batch, left = ready[:room], ready[room:]
        pending = left + held
        if batch:
            try:
                submitted = executor.map_array(job, batch)
            except Exception as exc:  # noqa: BLE001 - sbatch's refusal (bad partition, limits) in one line
                raise TokenTuneError(f"the cluster refused the job array: {' '.join(str(exc).split())[:300]}") from None
            jobs.extend(submitted)
            in_flight.update({c.name: (c, j) for c, j in zip(batch, submitted)})
        if not wait and not left:       # all submitted (cells other processes run are theirs to finish)
            break
        _settle(sweep, in_flight, progress)
        if pending or in_flight:
            time.sleep(POLL_S if limit is not None else POLL_S * 4)
    return jobs


def _ready(sweep: C.SweepDir, pending: Sequence[Cell], progress: Progress) -> tuple:
    """(cells to submit now, cells another process runs): done and failed cells leave."""
    ready, held = [], []
    for cell in pending:
        state = sweep.state(cell)
        progress.set(cell, state if state in (C.DONE, C.FAILED, C.RUNNING) else "queued")
        if state == C.RUNNING:
            held.append(cell)
        elif state not in (C.DONE, C.FAILED):
            ready.append(cell)
    return ready, held


def _settle(sweep: C.SweepDir, in_flight: Dict[str, tuple], progress: Progress) -> None:
    """Update ``progress`` from the markers and drop the jobs that ended; a job that died outside its cell
    (node failure, out of memory before the cell started) is recorded as the cell's failure."""
    for name, (cell, job) in list(in_flight.items()):
        state = sweep.state(cell)
        progress.set(cell, state if state in (C.DONE, C.FAILED, C.RUNNING) else "queued")
        if not job.done():
            continue
        del in_flight[name]
        if sweep.state(cell) not in (C.DONE, C.FAILED):
            try:
                job.result()
                error = "the job ended without finishing the cell"
            except Exception as exc:  # noqa: BLE001 - recorded as the cell's error line
                error = " ".join(str(exc).split())[-300:]
            atomic_write_json(sweep.path("failed", cell, ".json"), {"returncode": None, "error": error})
        progress.set(cell, sweep.state(cell))
