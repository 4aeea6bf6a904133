"""Run directories under faults: a checkpoint is consistent as a whole, a killed run resumes to the
same weights, write failures and bad output directories are one line, configs are type-checked."""
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_cli import TINY_ARGS, run
from test_data import make_folder
from test_train import assert_same, cfg, make_data, make_model

import tokentune
from tokentune import TrainConfig, cli, fileio
from tokentune.engine.training import learning_rate, train
from tokentune.errors import TokenTuneError

FINAL_SAVE = ["model.safetensors", "config.json", "metrics.json", "results.json", "resume.pt"]


_REAL_REPLACE = os.replace


class _Killed(BaseException):
    """Stands for SIGKILL: no handler of the training loop may catch it."""


def _model():
    return make_model(lora_dropout=0.1, drop_path_rate=0.1)     # RNG-consuming: resume must restore it


def _train(out, resume=False, epochs=2, warmup_epochs=1):
    return train(_model(), make_data(16), make_data(8, seed=1), cfg(epochs=epochs, warmup_epochs=warmup_epochs),
                 out_dir=str(out), resume=resume, log=None)


def _metrics(run_dir):
    """metrics.json without the wall-clock times."""
    return [{k: v for k, v in h.items() if k != "time_s"} for h in json.loads((run_dir / "metrics.json").read_text())]


def _renames(monkeypatch, kill_at=None, after=False):
    """Record every atomic rename; raise _Killed at rename number ``kill_at`` (before or after it)."""
    seen = []
    real = os.replace

    def replace(src, dst):
        index = len(seen)
        seen.append(os.path.basename(dst))
        if index == kill_at and not after:
            raise _Killed
        real(src, dst)
        if index == kill_at:
            raise _Killed
    monkeypatch.setattr(os, "replace", replace)
    return seen


@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "after-rename"])
def test_a_kill_at_every_step_of_the_final_save_resumes_to_the_same_final_weights(tmp_path, monkeypatch, after):
    seen = _renames(monkeypatch)
    whole = _train(tmp_path / "whole")
    assert seen[-len(FINAL_SAVE):] == FINAL_SAVE               # data files first, the marker last
    first_final = len(seen) - len(FINAL_SAVE)
    want = load_file(str(tmp_path / "whole" / "model.safetensors"))
    want_metrics = _metrics(tmp_path / "whole")
    for j, name in enumerate(FINAL_SAVE):
        out = tmp_path / f"killed-{name}"
        _renames(monkeypatch, kill_at=first_final + j, after=after)
        with pytest.raises(_Killed):
            _train(out)
        monkeypatch.setattr(os, "replace", _REAL_REPLACE)
        (out / ".tmp-model.safetensors-dead").write_bytes(b"half")     # what a real kill leaves behind
        resumed = _train(out, resume=True)
        assert resumed.finished and resumed.global_step == whole.global_step, name
        assert_same(want, load_file(str(out / "model.safetensors")))
        assert resumed.top1 == whole.top1
        results = json.loads((out / "results.json").read_text())
        assert results["top1"] == whole.top1 and results["epochs_done"] == 2
        assert _metrics(out) == want_metrics
        assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_history_and_results_agree_after_a_kill_before_the_marker(tmp_path, monkeypatch):
    seen = _renames(monkeypatch)
    _train(tmp_path / "whole")
    _renames(monkeypatch, kill_at=len(seen) - 1)                # the final resume.pt never lands
    with pytest.raises(_Killed):
        _train(tmp_path / "cut")
    monkeypatch.setattr(os, "replace", _REAL_REPLACE)
    state = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] == 1       # the marker still describes epoch 1
    r = train(_model(), make_data(16), make_data(8, seed=1), cfg(epochs=2), out_dir=str(tmp_path / "cut"),
              resume=True, log=None)
    assert r.finished
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


# ----------------------------------------------------------------------------- restart, extend
def test_corrupt_resume_state_says_how_to_continue_and_that_path_works(tmp_path):
    _train(tmp_path)
    (tmp_path / "resume.pt").write_bytes(b"garbage")
    with pytest.raises(TokenTuneError, match="corrupt: continue from the weights of the last finished epoch "
                                             "with --restart-from-weights") as info:
        train(_model(), make_data(16), None, cfg(epochs=3), out_dir=str(tmp_path), resume=True, log=None)
    assert "\n" not in str(info.value)
    os.remove(tmp_path / "resume.pt")
    with pytest.raises(TokenTuneError, match="no resume.pt to resume exactly from; continue from those weights "
                                             "with --restart-from-weights"):
        train(_model(), make_data(16), None, cfg(epochs=3), out_dir=str(tmp_path), resume=True, log=None)
    before = load_file(str(tmp_path / "model.safetensors"))
    r = train(_model(), make_data(16), make_data(8, seed=1), cfg(epochs=3), out_dir=str(tmp_path), resume="weights",
              log=None)
    assert r.finished and r.epochs_done == 3 and [h["epoch"] for h in r.history] == [1, 2, 3]
    after = load_file(str(tmp_path / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)       # it trained one more epoch
    assert json.loads((tmp_path / "results.json").read_text())["epochs_done"] == 3


def test_restart_from_weights_continues_from_the_saved_weights(tmp_path):
    """After a corrupt marker, training continues from model.safetensors, not from scratch."""
    _train(tmp_path / "a")
    (tmp_path / "a" / "resume.pt").write_bytes(b"")
    model = _model()
    seen = {}

    def grab(event, info):
        if event == "step" and "w" not in seen:
            seen["w"] = {n: p.detach().clone() for n, p in info["model"].named_parameters() if p.requires_grad}
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    train(model, make_data(16), None, cfg(epochs=3), out_dir=str(tmp_path / "a"), resume="weights", log=None,
          callbacks=[grab])
    # the first step started from the saved weights: one AdamW step moves each value by at most ~lr
    assert all((seen["w"][k] - saved[k]).abs().max() < 5e-3 for k in saved)


def test_a_finished_run_can_be_extended_but_not_shortened(tmp_path):
    first = _train(tmp_path, warmup_epochs=0)
    with pytest.raises(TokenTuneError, match="2 epoch\\(s\\) are already done; give --epochs 2 or more"):
        _train(tmp_path, resume=True, epochs=1, warmup_epochs=0)
    again = _train(tmp_path, resume=True, warmup_epochs=0)
    assert again.finished and again.global_step == first.global_step          # nothing to do
    more = _train(tmp_path, resume=True, epochs=4, warmup_epochs=0)
    assert more.finished and more.epochs_done == 4 and more.global_step == 2 * first.global_step
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 4
    assert more.history[:2] == first.history


def test_cli_restart_from_weights_and_extension(tmp_path, capsys):
    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=4)
    out = tmp_path / "run"
    code, _, err = run(["train", "--image-folder", str(folder), "--epochs", "1", "--out", str(out)] + TINY_ARGS, capsys)
    assert code == 0, err
    code, stdout, err = run(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "changing the run's length from 1 to 2 epochs" in stdout
    assert json.loads((out / "results.json").read_text())["epochs_done"] == 2
    (out / "resume.pt").write_bytes(b"\0" * 10)
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--restart-from-weights" in err
    code, stdout, err = run(["train", "--out", str(out), "--restart-from-weights", "--epochs", "3", "--no-progress"],
                            capsys)
    assert code == 0, err
    assert "restarting" in stdout and json.loads((out / "results.json").read_text())["epochs_done"] == 3


# ----------------------------------------------------------------------------- output directories
def test_bad_output_directories_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=4)
    (tmp_path / "file").write_text("x")
    code, _, err = run(["train", "--image-folder", str(folder), "--epochs", "1", "--out", str(tmp_path / "file")]
                       + TINY_ARGS, capsys)
    assert code == 2 and err.count("\n") == 1 and "is a file, not a directory; choose another path" in err

    real_open = os.open

    def read_only(path, flags, mode=0o777):
        if os.path.basename(path).startswith(".tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, mode)
    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run(["train", "--image-folder", str(folder), "--epochs", "1", "--out", str(tmp_path / "ro")]
                       + TINY_ARGS, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "cannot write to the run directory" in err and "read-only" in err


@pytest.mark.parametrize("failure", ["oserror", "torch-enforce"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    import safetensors.torch

    whole = _train(tmp_path / "whole")
    real_save, real_torch_save = safetensors.torch.save_file, torch.save
    calls = {"n": 0}

    def full_safetensors(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:                          # the checkpoint after epoch 2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, *a, **k)

    def full_torch(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_torch_save(obj, path, *a, **k)
    if failure == "oserror":
        monkeypatch.setattr(safetensors.torch, "save_file", full_safetensors)
    else:
        monkeypatch.setattr(torch, "save", full_torch)
        monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(TokenTuneError) as info:
        _train(tmp_path / "cut")
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "previous version of the file is intact" in msg
    monkeypatch.undo()
    r = train(_model(), make_data(16), make_data(8, seed=1), cfg(epochs=2), out_dir=str(tmp_path / "cut"),
              resume=True, log=None)
    assert r.finished and r.top1 == whole.top1
    assert_same(load_file(str(tmp_path / "whole" / "model.safetensors")),
                load_file(str(tmp_path / "cut" / "model.safetensors")))


def test_files_follow_the_umask_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / ".tmp-resume.pt-0badc0de").write_bytes(b"left by a killed writer")
        _train(tmp_path)
    finally:
        os.umask(old)
    for name in FINAL_SAVE:
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o644, name
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


# ----------------------------------------------------------------------------- config values
def test_config_types_are_checked_in_one_line(capsys):
    with pytest.raises(TokenTuneError, match=r"invalid TrainConfig.epochs=2.5 \(float\): expected an integer"):
        TrainConfig(epochs=2.5)
    with pytest.raises(TokenTuneError, match=r"invalid TrainConfig.batch_size='32' \(str\): expected an integer"):
        TrainConfig(batch_size="32")
    with pytest.raises(TokenTuneError, match="invalid TrainConfig.betas"):
        TrainConfig(betas=(0.9,))
    with pytest.raises(TokenTuneError, match=r"invalid lora_dropout=1.5: a dropout probability is in \[0, 1\)"):
        tokentune.LoRAConfig(dropout=1.5)
    with pytest.raises(TokenTuneError, match="invalid lora_rank='8'"):
        tokentune.create_model("vit_tiny_patch16_224", method="lora", lora_rank="8", img_size=32, patch_size=8,
                               embed_dim=48, depth=1, num_heads=3)
    code = cli.main(["train", "--image-folder", "x", "--lora-dropout", "1.5"] + TINY_ARGS)
    err = capsys.readouterr().err
    assert code == 2 and err == "error: invalid lora_dropout=1.5: a dropout probability is in [0, 1)\n"


def test_default_warmup_is_a_tenth_of_the_run():
    assert TrainConfig(epochs=100).resolved().warmup_epochs == 10             # the references' setting
    short = TrainConfig(epochs=3, lr=1e-3, warmup_lr=0.0, min_lr=0.0)
    assert learning_rate(short, 0, 0, 10) == 0.0
    assert learning_rate(short, 0, 3, 10) == pytest.approx(1e-3)                 # warm-up ends at 0.3 epochs
    train(make_model(), make_data(8), None, TrainConfig(epochs=2, batch_size=8, num_workers=0), log=None)
