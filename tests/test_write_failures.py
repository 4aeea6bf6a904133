"""Every write a run makes (run directory, log.jsonl, metrics.csv, TensorBoard, W&B, checkpoints) fails
with one line when the disk is full, the file system read-only or the directory not ours, at the
start of a run as in its middle; checkpoints already written stay intact."""
import builtins
import errno
import os
import sys
import types

import pytest
from safetensors.torch import load_file
from test_cli import TINY_ARGS, run
from test_data import make_folder
from test_train import assert_same, cfg, make_data, make_model

from tokentune.engine import loggers
from tokentune.engine.training import train
from tokentune.errors import TokenTuneError

CODES = [errno.ENOSPC, errno.EROFS, errno.EACCES]
HINTS = {errno.ENOSPC: "free some space", errno.EROFS: "the file system is read-only",
         errno.EACCES: "you may not write there"}


class _FailingOpen:
    """``open`` for the loggers module: files named ``*<name>*`` opened for writing fail with ``code``
    at write number ``after + 1`` (counted over all of them) and after it."""

    def __init__(self, name, code, after=0):
        self.name, self.code, self.after, self.writes = name, code, after, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        if self.name in os.path.basename(str(path)) and mode[0] in "aw":
            return _FailingFile(fh, self, str(path))
        return fh


class _FailingFile:
    def __init__(self, fh, owner, path):
        self.fh, self.owner, self.path = fh, owner, path

    def write(self, data):
        self.owner.writes += 1
        if self.owner.writes > self.owner.after:
            raise OSError(self.owner.code, os.strerror(self.owner.code), self.path)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _one_line(text, code, name):
    assert text.count("\n") <= 1 and "Traceback" not in text, text
    assert "cannot write " in text and name in text and os.strerror(code) in text and HINTS[code] in text, text


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
def test_the_first_log_write_failing_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys, code):
    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=2)
    monkeypatch.setattr(loggers, "open", _FailingOpen("log.jsonl", code), raising=False)
    status, _, err = run(["train", "--image-folder", str(folder), "--epochs", "1", "--log-every", "1",
                          "--out", str(tmp_path / "run")] + TINY_ARGS, capsys)
    assert status == 2 and err.startswith("error: ")
    _one_line(err, code, "log.jsonl")


def test_a_disk_full_before_the_run_stops_it_before_any_work(tmp_path, monkeypatch, capsys):
    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=2)

    def full(fd):        # data written to a full disk fails when it is flushed (delayed allocation)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    status, out, err = run(["train", "--image-folder", str(folder), "--epochs", "1", "--out", str(tmp_path / "run")]
                           + TINY_ARGS, capsys)
    assert status == 2 and "cannot write to the run directory" in err and "No space left on device" in err
    assert err.count("\n") == 1 and "epoch" not in out and not os.listdir(tmp_path / "run")


def test_the_log_failing_in_the_middle_keeps_the_checkpoint_and_resume_ends_as_uninterrupted(tmp_path, monkeypatch):
    data, c = make_data(16), cfg(epochs=2, log_every=1)
    train(make_model(), data, None, c, out_dir=str(tmp_path / "whole"), log=None)
    monkeypatch.setattr(loggers, "open", _FailingOpen("log.jsonl", errno.ENOSPC, after=3), raising=False)
    with pytest.raises(TokenTuneError) as info:            # 2 steps + the epoch record, then step 3
        train(make_model(), data, None, c, out_dir=str(tmp_path / "cut"), log=None)
    _one_line(str(info.value), errno.ENOSPC, "log.jsonl")
    assert "checkpoints already written are intact" in str(info.value)
    monkeypatch.undo()
    assert train(make_model(), data, None, c, out_dir=str(tmp_path / "cut"), resume=True, log=None).finished
    assert_same(load_file(str(tmp_path / "whole" / "model.safetensors")),
                load_file(str(tmp_path / "cut" / "model.safetensors")))


@pytest.mark.parametrize("after", [0, 4], ids=["start", "middle"])
def test_tensorboard_write_failures_are_one_line(tmp_path, monkeypatch, after):
    pytest.importorskip("tensorboard")
    code = errno.EROFS if after == 0 else errno.ENOSPC
    monkeypatch.setattr(loggers, "open", _FailingOpen("tfevents", code, after=after), raising=False)
    with pytest.raises(TokenTuneError) as info:
        train(make_model(), make_data(16), None, cfg(epochs=1, warmup_epochs=0, log_every=1, loggers=("tensorboard",)),
              out_dir=str(tmp_path), log=None)
    _one_line(str(info.value), code, "tfevents")


def test_tensorboard_events_are_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_model(), make_data(16), None, cfg(epochs=2, log_every=1, loggers=("tensorboard",)),
          out_dir=str(tmp_path), log=None, max_steps=3)
    train(make_model(), make_data(16), None, cfg(epochs=2, log_every=1, loggers=("tensorboard",)),
          out_dir=str(tmp_path), log=None, resume=True)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    # the interrupted and the resumed run each wrote an events file; every step is there once (the order in
    # which the files are read is tensorboard's, by file name)
    assert sorted(e.step for e in acc.Scalars("train/loss")) == [1, 2, 3, 4]
    assert sorted(e.step for e in acc.Scalars("epoch/train_loss")) == [2, 4]


def test_a_wandb_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def init(**kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(kwargs["dir"], "wandb"))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(TokenTuneError) as info:
        train(make_model(), make_data(16), None, cfg(epochs=1, warmup_epochs=0, loggers=("wandb",)),
              out_dir=str(tmp_path), log=None)
    _one_line(str(info.value), errno.EACCES, "wandb")
