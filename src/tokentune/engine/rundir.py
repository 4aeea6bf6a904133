"""The run directory: the one owner of its file names, and of writing a checkpoint as a whole.

A run directory holds::

    model.safetensors   the trained tensors (LoRA, adapters, PYRA, dispatchers, head; all for "full")
    config.json         how to rebuild the model (timm name, method spec, configs, ...) + run records;
                        local paths in it are relative to the directory, and timm refuses it (TIMM_GUARD)
    metrics.json        one record per finished epoch
    results.json        the final record (only once the run has finished)
    resume.pt           the commit marker: epoch, step, optimizer, RNG states, trained tensors
    log.jsonl           training loss/lr every log_every steps and every epoch's record (engine.loggers)
    metrics.csv         the epoch records as a table
    tensorboard/        TensorBoard events, when that logger is on

A checkpoint is the set of these files. :meth:`RunDir.write_checkpoint` writes the data files
first and the marker ``resume.pt`` last, each atomically (:mod:`tokentune.fileio`). Whatever
instant a crash, a kill or a full disk strikes, ``resume.pt`` therefore describes a checkpoint
that is complete on disk, and it carries everything needed to redo the work after it (trained
tensors, optimizer and RNG state): ``--resume`` continues from it and ends with exactly the weights
an uninterrupted run would have. Data files newer than the marker are simply rewritten.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..core.hub import portable_backbone, resolved_backbone
from ..core.weights import load_torch_file
from ..errors import TokenTuneError
from ..fileio import (
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    check_writable_directory,
    remove_stale_temporaries,
)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
RESULTS_NAME = "results.json"
RESUME_NAME = "resume.pt"
LOG_NAME = "log.jsonl"
CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
RESUME_FORMAT = 1
#: an export directory's own config (written by :mod:`tokentune.tools.export`; named here so that a run
#: directory's reader can tell an export from a damaged run)
DEPLOYED_CONFIG = "deployed.json"
#: ``architecture`` entry of a run's ``config.json``. timm reads a folder's ``config.json`` for
#: ``timm.create_model("local-dir:DIR")`` / ``"hf-hub:REPO"``; a run directory holds only the trained
#: tensors, so timm must refuse it: it stops at this name with "Unknown model (...)", which says what to do.
TIMM_GUARD = "tokentune-run: not a timm model, load it with tokentune.load_trained"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    return " ".join(str(exc).split())[:limit]


class RunDir:
    """A run directory (see the module docstring); ``RunDir(path).weights`` etc. are file paths."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def weights(self) -> str:
        return self.file(WEIGHTS_NAME)

    @property
    def config(self) -> str:
        return self.file(CONFIG_NAME)

    @property
    def metrics(self) -> str:
        return self.file(METRICS_NAME)

    @property
    def results(self) -> str:
        return self.file(RESULTS_NAME)

    @property
    def resume(self) -> str:
        return self.file(RESUME_NAME)

    # ------------------------------------------------------------------ state of the directory
    def run_files(self) -> List[str]:
        """The files that make this directory a run (weights or resume marker) that exist."""
        return [n for n in (RESUME_NAME, WEIGHTS_NAME) if os.path.exists(self.file(n))]

    def is_run(self) -> bool:
        """Whether the directory holds a run: a resume marker, or a ``config.json`` written by :meth:`write_model`
        (not timm's ``config.json`` of an export)."""
        if os.path.isfile(self.resume):
            return True
        try:
            with open(self.config, encoding="utf-8") as fh:
                config = json.load(fh)
            return config.get("architecture") == TIMM_GUARD or "method" in config    # older runs: no guard
        except (OSError, ValueError, AttributeError):
            return False

    def prepare(self) -> List[str]:
        """Create the directory, prove it writable, delete temporaries a killed writer left.

        Returns the names of the removed temporaries. Only the main process calls it.
        """
        check_writable_directory(self.path, "run directory")
        return remove_stale_temporaries(self.path)

    # ------------------------------------------------------------------ writing
    def write_model(self, tensors: Dict[str, torch.Tensor], config: Dict[str, Any]) -> None:
        """``model.safetensors`` then ``config.json`` (what :func:`tokentune.load_trained` reads)."""
        from safetensors.torch import save_file

        atomic_write(self.weights, lambda tmp: save_file(tensors, tmp))
        atomic_write_json(self.config, self._portable(config))

    def _portable(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """``config`` as written: the backbone recorded as a name or hub id, a local weights file or
        ``local-dir:`` model relative to this directory (never an absolute path), and the
        :data:`TIMM_GUARD` entry (see :meth:`read_config` for the inverse)."""
        out = self._portable_run(portable_backbone(config, self.path))
        out["architecture"] = TIMM_GUARD
        return out

    def _portable_run(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """``record`` with the command line's backbone (``run.cli``) relative to this directory."""
        cli = (record.get("run") or {}).get("cli")
        if isinstance(cli, dict):
            record = dict(record, run=dict(record["run"], cli=portable_backbone(cli, self.path)))
        return record

    def write_checkpoint(self, *, tensors: Dict[str, torch.Tensor], config: Dict[str, Any],
                         history: List[Dict[str, Any]], resume_state: Dict[str, Any],
                         results: Optional[Dict[str, Any]] = None) -> None:
        """Write one checkpoint as a whole: data files first, the ``resume.pt`` marker last."""
        self.write_model(tensors, config)
        atomic_write_json(self.metrics, history)
        if results is not None:
            atomic_write_json(self.results, self._portable_run(results))
        atomic_torch_save(self.resume, resume_state)

    # ------------------------------------------------------------------ reading
    def read_config(self) -> Dict[str, Any]:
        """``config.json``; a missing, damaged or foreign file is one clear error."""
        if not os.path.isfile(self.config):
            raise TokenTuneError(f"{self.path!r} has no {CONFIG_NAME}; pass a directory written by tokentune "
                                 "train/save_trained")
        damaged = ("it records how to rebuild the model, so the run cannot be loaded without it: restore it from a "
                   "copy, save the model again with save_trained, or train the run again")
        config = _read_json(self.config, damaged)
        if os.path.isfile(self.file(DEPLOYED_CONFIG)) and not (isinstance(config, dict) and "model" in config):
            raise TokenTuneError(f"{self.path!r} is an export (deployed model), not a run directory; evaluate the run "
                                 "it was exported from (tokentune eval RUN --deploy), or load the export with "
                                 "tokentune.open_model / load_deployed")
        if isinstance(config, dict) and "model" not in config and isinstance(config.get("architecture"), str):
            raise TokenTuneError(f"{self.path!r} holds a timm model (architecture {config['architecture']!r}), not a "
                                 f"tokentune run; use it as a backbone: --model local-dir:{self.path} "
                                 "(create_model('local-dir:DIR'))")
        missing = [k for k in ("model", "method", "num_classes") if k not in config] if isinstance(config, dict) \
            else ["model"]
        if missing:
            raise TokenTuneError(f"{self.config} is not a tokentune model config (it has no {missing[0]!r} entry); "
                                 f"{damaged}")
        config = resolved_backbone(config, self.path)
        config.pop("architecture", None)
        cli = (config.get("run") or {}).get("cli")
        if isinstance(cli, dict):
            config["run"] = dict(config["run"], cli=resolved_backbone(cli, self.path))
        return config

    def read_metrics(self) -> List[Dict[str, Any]]:
        return _read_json(self.metrics) if os.path.isfile(self.metrics) else []

    def read_resume(self) -> Optional[Dict[str, Any]]:
        """The resume marker (None when there is none); a corrupt one is one clear error."""
        if not os.path.isfile(self.resume):
            return None
        fix = ("it is corrupt: continue from the weights of the last finished epoch with --restart-from-weights "
               "(resume='weights'; optimizer and random state start afresh), or start a new run in another directory")
        state = load_torch_file(self.resume, fix, opt_in=None)     # weights-only: it holds no code
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise TokenTuneError(f"{self.resume} is not a tokentune resume state of format {RESUME_FORMAT}; {fix}")
        return state


def _read_json(path: str, damaged: str = "the file is corrupt"):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise TokenTuneError(f"{path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno}); {damaged}") from None
    except UnicodeDecodeError:
        raise TokenTuneError(f"{path} is damaged (not UTF-8 text); {damaged}") from None
    except OSError as exc:
        raise TokenTuneError(f"cannot read {path}: {exc.strerror or _one_line(exc)}") from None
