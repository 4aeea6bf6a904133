"""What a resumed run restores besides tensors: where it stands (:class:`Progress`), the random
state of every generator, and the checks that a run is continued with options that compute the
same thing."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..core.vit import spec_of
from ..errors import TokenTuneError
from ..utils import jsonable
from .config import TrainConfig

# options that may differ when resuming: they do not change what is computed (``epochs`` may
# change too, see check_resume_compatible)
RESUMABLE_CHANGES = ("eval_every", "num_workers", "loggers", "log_every")
#: defaults of options added after runs were saved: a saved config without them had these values
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


# ----------------------------------------------------------------------------- run state
@dataclass
class Progress:
    """Where a run stands; exactly what ``resume.pt`` restores (besides tensors and RNG states).

    Attributes:
        epoch: the epoch being trained (0-based); ``len(history)`` between epochs.
        batches_done: micro-batches of ``epoch`` already trained (0 between epochs).
        global_step: optimizer steps done.
        train_time_s: training time without evaluation, over all resumed segments.
        history: one record per finished epoch.
        partial: running sums of the epoch in progress (loss, images, hook logs, time).
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    train_time_s: float = 0.0
    history: List[Dict[str, Any]] = field(default_factory=list)
    partial: Dict[str, Any] = field(default_factory=lambda: fresh_partial())


def fresh_partial() -> Dict[str, Any]:
    return {"loss_sum": 0.0, "images": 0, "logs": {}, "time": 0.0}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> Dict[str, Any]:
    mt, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (mt, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    mt, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((mt, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def spec_key(model: nn.Module) -> Dict[str, Any]:
    return spec_key_of(spec_of(model) or {})


def spec_key_of(spec: Dict[str, Any]) -> Dict[str, Any]:
    """What of a build spec (``model.tokentune.spec`` or a run's config.json) must not change on resume."""
    key = {k: spec.get(k) for k in ("model", "method", "num_classes", "configs", "train_head")}
    key.update({k: spec[k] for k in ("task", "task_config") if spec.get(k) is not None})   # only runs of a task
    if spec and not spec.get("pretrained"):    # a random backbone is frozen: resuming needs the same one
        key["init_seed"] = spec.get("init_seed")
    return jsonable(key)


def check_resume_compatible(saved_cfg: Dict[str, Any], saved_spec: Optional[Dict[str, Any]], cfg: TrainConfig,
                             model: nn.Module, path: str, epochs_done: int, epoch_started: bool) -> None:
    """Refuse to continue a run with options that change what was computed.

    ``epochs`` may change (extend, or shorten to no fewer than the epochs already trained): the
    schedule is recomputed for the new length from the current position.
    """
    now = jsonable(dataclasses.asdict(cfg))
    saved_cfg = dict(jsonable(_DEFAULTS), **saved_cfg)
    diffs = [k for k in now if k not in RESUMABLE_CHANGES and k != "epochs" and saved_cfg.get(k) != now[k]]
    if diffs:
        k = diffs[0]
        raise TokenTuneError(f"cannot resume {path}: option {k} was {saved_cfg.get(k)!r} and is now {now[k]!r}"
                             f"{f' (and {len(diffs) - 1} more)' if len(diffs) > 1 else ''}; resume with the "
                             "run's options or start a new output directory")
    least = epochs_done + (1 if epoch_started else 0)
    if cfg.epochs < max(least, 1):
        raise TokenTuneError(f"cannot resume {path} with epochs={cfg.epochs}: {least} epoch(s) are already "
                             f"{'started' if epoch_started else 'done'}; give --epochs {max(least, 1)} or more")
    saved_spec, spec = saved_spec or {}, spec_key(model)
    diffs = [k for k in spec if k in saved_spec and saved_spec[k] != spec[k]]   # older states lack init_seed
    if diffs:
        k = diffs[0]
        how = f" (create_model(..., seed={saved_spec[k]}))" if k == "init_seed" else ""
        raise TokenTuneError(f"cannot resume {path}: the model's {k} was {saved_spec[k]!r} and is now "
                             f"{spec[k]!r}; build the model as in the interrupted run{how}")


def adopt_saved_defaults(cfg: TrainConfig, saved_cfg: Dict[str, Any], given: TrainConfig) -> TrainConfig:
    """Options left to a default that depends on ``epochs`` keep the run's value when ``epochs`` changes."""
    if given.warmup_epochs is None and saved_cfg.get("warmup_epochs") is not None:
        return dataclasses.replace(cfg, warmup_epochs=saved_cfg["warmup_epochs"])
    return cfg
