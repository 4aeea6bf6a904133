"""Loggers behind one interface: a file log always, TensorBoard and Weights & Biases as optional extras.

A logger has ``log(kind, record)`` (``kind``: ``"step"`` every ``TrainConfig.log_every`` optimizer
steps with ``global_step``, ``epoch`` (1-based), ``step`` (in the epoch), ``loss`` (of the step's
last micro-batch on the main process), ``lr``; ``"epoch"`` with the epoch's record:
``train_loss``, ``lr``, ``top1``, ``test_loss``, the methods' logged terms) and ``close()``.
:func:`training_loggers` builds those a run asks for and :class:`LoggingCallback` feeds them from
:func:`tokentune.train`'s callbacks, on the main process only.

* :class:`FileLogger` (every run directory): ``log.jsonl``, one JSON object per record, and
  ``metrics.csv``, the epoch records as a table. After ``--resume`` the lines of steps the
  interrupted run logged after its last checkpoint are dropped before new ones are written, so
  the log reads as that of an uninterrupted run.
* :class:`TensorBoardLogger` (``loggers=("tensorboard",)``; ``pip install 'tokentune[tensorboard]'``):
  ``<run>/tensorboard``, scalars ``train/loss``, ``train/lr``, ``epoch/<name>``. The events are
  written and flushed in the training process itself (tensorboard's record format, torch's scalar
  summaries), not by ``SummaryWriter``'s background thread, so a failed write stops the run with
  one line rather than a thread's traceback.
* :class:`WandbLogger` (``loggers=("wandb",)``; ``pip install 'tokentune[wandb]'``): one W&B run per
  run directory (its id is derived from the directory, so ``--resume`` continues it); project from
  ``WANDB_PROJECT`` (default ``tokentune``), offline with ``WANDB_MODE=offline`` as usual.

Every write of a logger that fails (disk full, read-only file system, no permission), at the start
of a run as in its middle, is one :class:`~tokentune.errors.TokenTuneError` line naming the file
(:func:`tokentune.fileio.reported_writes`); checkpoints already written stay intact.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import socket
import time
from typing import Any, Dict, List, Optional, Sequence

from ..errors import TokenTuneError
from ..fileio import atomic_write_text, reported_writes
from ..utils import jsonable, require_extra
from .rundir import CSV_NAME, LOG_NAME, TENSORBOARD_DIR, RunDir

#: what a failed logger write adds to its error line
KEPT = "; the checkpoints already written are intact (continue with --resume once it is fixed)"


class Logger:
    """The interface: ``log(kind, record)`` and ``close()``."""

    def log(self, kind: str, record: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileLogger(Logger):
    """``log.jsonl`` (every record) and ``metrics.csv`` (epoch records) in a run directory."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.path = run.file(LOG_NAME)
        self.started = False
        self.epochs: List[Dict[str, Any]] = []

    def _start(self, kind: str, epoch: int, global_step: int) -> None:
        """Drop what an interrupted run logged after the checkpoint this run continues from: the first
        record of this run is ``kind`` at ``epoch`` (1-based) and ``global_step``."""
        self.started = True
        if not os.path.isfile(self.path):
            return

        def later(rec: Dict[str, Any]) -> bool:
            if rec.get("kind") == "epoch":
                return rec.get("epoch", 0) >= epoch
            return rec.get("global_step", 0) >= global_step if kind == "step" else rec.get("epoch", 0) > epoch

        kept = []
        try:
            with open(self.path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except OSError as exc:
            raise TokenTuneError(f"cannot read {self.path}: {exc.strerror or exc}; check its permissions") from None
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:      # a line cut by a kill
                continue
            if not later(rec):
                kept.append(rec)
        self.epochs = [r for r in kept if r.get("kind") == "epoch"]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write_text(self.path, text)

    def log(self, kind: str, record: Dict[str, Any]) -> None:
        if not self.started:
            self._start(kind, int(record.get("epoch", 0)), int(record.get("global_step", 0)))
        entry = dict(kind=kind, **jsonable(record))
        with reported_writes(self.path, KEPT), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if kind == "epoch":
            self.epochs.append(entry)
            self._write_csv()

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for r in self.epochs for k in r if k != "kind"))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.epochs)
        text = out.getvalue()
        atomic_write_text(self.run.file(CSV_NAME), text)


class TensorBoardLogger(Logger):
    """Scalars in ``<run>/tensorboard`` (``tensorboard --logdir RUN``): one event file per run segment,
    named as ``SummaryWriter`` names them, written and flushed record by record in this process."""

    def __init__(self, run: RunDir) -> None:
        require_extra("tensorboard", "tensorboard", "logging to TensorBoard")
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import scalar

        self.event, self.scalar = Event, scalar
        directory = run.file(TENSORBOARD_DIR)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"
        self.path = os.path.join(directory, name)
        self.file = None
        with reported_writes(self.path, KEPT):
            os.makedirs(directory, exist_ok=True)
            self.file = open(self.path, "wb")
            self.records = RecordWriter(self.file)
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, *events) -> None:
        with reported_writes(self.path, KEPT):
            for event in events:
                self.records.write(event.SerializeToString())
            self.file.flush()

    def log(self, kind: str, record: Dict[str, Any]) -> None:
        step = int(record.get("global_step", 0))
        prefix = "train" if kind == "step" else "epoch"
        now = time.time()
        self._write(*(self.event(wall_time=now, step=step, summary=self.scalar(f"{prefix}/{key}", float(value)))
                      for key, value in record.items()
                      if key not in ("global_step", "epoch", "step") and isinstance(value, (int, float))))

    def close(self) -> None:
        if self.file is not None:
            with reported_writes(self.path, KEPT):
                self.file.close()


class WandbLogger(Logger):
    """One Weights & Biases run per run directory (resumed with it)."""

    def __init__(self, run: RunDir, config: Dict[str, Any]) -> None:
        wandb = require_extra("wandb", "wandb", "logging to Weights & Biases")
        run_id = hashlib.sha1(run.path.encode()).hexdigest()[:16]
        self.wandb = wandb
        self.path = os.path.join(run.path, "wandb")
        with reported_writes(self.path, KEPT):
            self.session = wandb.init(project=os.environ.get("WANDB_PROJECT", "tokentune"), id=run_id,
                                      resume="allow", dir=run.path, name=os.path.basename(run.path),
                                      config=jsonable(config))

    def log(self, kind: str, record: Dict[str, Any]) -> None:
        prefix = "train" if kind == "step" else "epoch"
        values = {f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "global_step"}
        with reported_writes(self.path, KEPT):
            self.session.log(values, step=int(record.get("global_step", 0)))

    def close(self) -> None:
        with reported_writes(self.path, KEPT):
            self.session.finish()


def training_loggers(run: Optional[RunDir], names: Sequence[str], config: Dict[str, Any]) -> List[Logger]:
    """The file logger of ``run`` and the optional ones named (``tensorboard``, ``wandb``)."""
    if names and run is None:
        raise TokenTuneError(f"loggers {', '.join(names)} write into the run directory; pass out_dir (--out)")
    loggers: List[Logger] = [FileLogger(run)] if run is not None else []
    for name in names:
        loggers.append(TensorBoardLogger(run) if name == "tensorboard" else WandbLogger(run, config))
    return loggers


class LoggingCallback:
    """A :func:`tokentune.train` callback that passes steps (every ``every``) and epochs to ``loggers``."""

    def __init__(self, loggers: Sequence[Logger], every: int) -> None:
        self.loggers = list(loggers)
        self.every = max(int(every), 1)

    def __call__(self, event: str, info: Dict[str, Any]) -> None:
        if event == "step" and info["global_step"] % self.every == 0:
            record = {k: info[k] for k in ("global_step", "step", "loss", "lr")}
            record["epoch"] = info["epoch"] + 1          # 1-based, as in the epoch records
        elif event == "epoch":
            record = dict(info["record"], global_step=info["global_step"])
        else:
            return
        for logger in self.loggers:
            logger.log(event, record)

    def close(self, raising: bool = True) -> None:
        """Close every logger; the first failure is raised afterwards (``raising=False``: dropped, as
        when another error is already stopping the run)."""
        failure = None
        for logger in self.loggers:
            try:
                logger.close()
            except TokenTuneError as exc:
                failure = failure or exc
        if failure is not None and raising:
            raise failure
