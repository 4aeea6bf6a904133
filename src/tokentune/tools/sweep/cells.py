"""One cell's life: its state on disk (done, failed, running, resumable, new), its lock, and its run.

Everything the sweep knows lives in files below ``<out>/.sweep/`` next to the run directories, so a
controller killed at any moment (or a second controller, or a Slurm job on another node sharing
the file system) reads the same state:

* ``cells/<cell>.yaml``   the cell's ``tokentune train --config`` file;
* ``done/<cell>``          written after ``tokentune train`` exited 0 (the run finished);
* ``failed/<cell>.json``   its exit code and error line (retried only with ``--retry-failed``);
* ``locks/<cell>.json``    held while a process runs the cell (host, pids, refreshed every few seconds);
* ``logs/<cell>.log``      what the cell's ``tokentune train`` printed.

A cell is never run by two processes at once: its lock is created exclusively, and a lock whose
holder is alive (same host: its process exists; another host: refreshed in the last
``STALE_AFTER_S`` seconds) makes everyone else wait. A run directory that exists without a
``done`` marker is continued with ``--resume``, which is exact.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import yaml

from ...engine.rundir import RunDir
from ...errors import TokenTuneError
from ...fileio import atomic_write_json, atomic_write_text
from .spec import Cell

#: a lock not refreshed for this long, held on another host, is taken as abandoned
STALE_AFTER_S = 120.0
HEARTBEAT_S = 5.0

DONE, FAILED, RUNNING, RESUME, NEW = "done", "failed", "running", "resume", "new"


def _flat(name: str) -> str:
    return name.replace(os.sep, "__")


@dataclass
class SweepDir:
    """The ``.sweep`` folder of a sweep's output root."""

    root: str

    def path(self, kind: str, cell: Cell, suffix: str = "") -> str:
        return os.path.join(self.root, ".sweep", kind, _flat(cell.name) + suffix)

    def prepare(self) -> None:
        for kind in ("cells", "done", "failed", "locks", "logs"):
            try:
                os.makedirs(os.path.join(self.root, ".sweep", kind), exist_ok=True)
            except OSError as exc:
                raise TokenTuneError(f"cannot create the sweep folder {self.root}: {exc.strerror}; choose a writable "
                                     "'out'") from None

    def write_cell(self, cell: Cell) -> str:
        path = self.path("cells", cell, ".yaml")
        atomic_write_text(path, yaml.safe_dump(cell.options, sort_keys=False, default_flow_style=None))
        return path

    def failure(self, cell: Cell) -> Optional[Dict[str, object]]:
        path = self.path("failed", cell, ".json")
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def state(self, cell: Cell) -> str:
        if os.path.exists(self.path("done", cell)):
            return DONE
        if holder_alive(self.path("locks", cell, ".json")):
            return RUNNING
        if self.failure(cell) is not None:
            return FAILED
        return RESUME if RunDir(cell.run_dir).is_run() else NEW

    def clear_failure(self, cell: Cell) -> None:
        try:
            os.remove(self.path("failed", cell, ".json"))
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------- locks
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: str) -> Optional[Dict[str, object]]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}        # being written: treat as held


def holder_alive(path: str) -> bool:
    """Whether the lock at ``path`` is held by a live process."""
    lock = _read_lock(path)
    if lock is None:
        return False
    if lock.get("host") == socket.gethostname():
        return any(_pid_alive(int(p)) for p in lock.get("pids", []) if p)
    try:
        return time.time() - os.path.getmtime(path) < STALE_AFTER_S
    except OSError:
        return False


def acquire(path: str, pids: List[int]) -> bool:
    """Take the lock at ``path`` (removing an abandoned one); False when a live process holds it."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if holder_alive(path):
                return False
            try:
                os.remove(path)     # abandoned: its holder died (kill -9, node lost)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"host": socket.gethostname(), "pids": pids, "since": time.time()}, fh)
        return True
    return False


def update_lock(path: str, pids: List[int]) -> None:
    atomic_write_json(path, {"host": socket.gethostname(), "pids": pids, "since": time.time()})


def release(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- running a cell
#: what a cell's process runs before ``tokentune``'s command line: it asks Linux for SIGTERM when the sweep
#: process that started it dies, even by kill -9 (PR_SET_PDEATHSIG; ``tokentune train`` then saves and stops),
#: and stops at once if that process died before the request. Done here rather than in a ``preexec_fn``, so
#: that the controller starts cells with vfork (fast, and safe beside its threads).
CHILD_PRELUDE = """import ctypes, os, runpy, sys
parent = int(os.environ.pop("TOKENTUNE_SWEEP_PARENT", "0") or 0)
if parent and sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 15)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(143)
runpy.run_module("tokentune", run_name="__main__", alter_sys=True)
"""


def train_command(config_file: str, cell: Cell, resume: bool) -> List[str]:
    """The cell's ``tokentune train`` (``python -m tokentune train ...``, with :data:`CHILD_PRELUDE` first)."""
    cmd = [sys.executable, "-c", CHILD_PRELUDE, "train", "--config", config_file, "--out", cell.run_dir,
           "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def start(sweep: SweepDir, cell: Cell, env: Optional[Dict[str, str]] = None) -> Optional[subprocess.Popen]:
    """Start the cell's ``tokentune train`` (resuming its run directory if one exists) under its lock;
    None when another live process holds the lock."""
    lock = sweep.path("locks", cell, ".json")
    if not acquire(lock, [os.getpid()]):
        return None
    try:
        resume = RunDir(cell.run_dir).is_run()
        config = sweep.write_cell(cell)
        log = open(sweep.path("logs", cell, ".log"), "ab")
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}\n".encode())
        log.flush()
        env = dict(os.environ if env is None else env, TOKENTUNE_SWEEP_PARENT=str(os.getpid()))
        proc = subprocess.Popen(train_command(config, cell, resume), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
    except BaseException:
        release(lock)
        raise
    update_lock(lock, [os.getpid(), proc.pid])
    return proc


def error_line(log_path: str) -> str:
    """The ``error: ...`` line of a failed cell's log (else its last line)."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            lines = [line.rstrip() for line in fh if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or ["no output"])[-1][:300]


def finish(sweep: SweepDir, cell: Cell, returncode: int) -> str:
    """Record how the cell's process ended and release its lock; returns the cell's new state."""
    lock = sweep.path("locks", cell, ".json")
    try:
        if returncode == 0 and os.path.isfile(RunDir(cell.run_dir).results):
            atomic_write_text(sweep.path("done", cell), time.strftime("%Y-%m-%d %H:%M:%S\n"))
            sweep.clear_failure(cell)
            return DONE
        if returncode in (0, 130, 143, -signal.SIGTERM, -signal.SIGINT):
            return RESUME          # stopped early (--max-steps, a signal): its checkpoint is kept, the next start resumes it
        atomic_write_json(sweep.path("failed", cell, ".json"),
                          {"returncode": returncode, "error": error_line(sweep.path("logs", cell, ".log"))})
        return FAILED
    finally:
        release(lock)


def heartbeat(sweep: SweepDir, cell: Cell) -> None:
    """Refresh the cell's lock (a holder on another host stays live while it refreshes)."""
    try:
        os.utime(sweep.path("locks", cell, ".json"))
    except OSError:
        pass


def run_blocking(sweep: SweepDir, cell: Cell, env: Optional[Dict[str, str]] = None) -> str:
    """Run one cell to its end in this process (what a Slurm job does); returns its state.

    A cell that another live process runs (a requeued job whose predecessor is still saving) is
    waited for, then continued."""
    while True:
        if os.path.exists(sweep.path("done", cell)):
            return DONE
        proc = start(sweep, cell, env)
        if proc is not None:
            break
        time.sleep(HEARTBEAT_S)
    try:        # preemption: SIGTERM reaches this process; the run saves its checkpoint and stops
        old = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    except ValueError:        # not the main thread
        old = None
    try:
        while True:
            try:
                code = proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                heartbeat(sweep, cell)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return finish(sweep, cell, code)
