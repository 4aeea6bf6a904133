"""Saving and loading only what was trained, atomically.

A *run directory* (or any directory given to :func:`save_trained`) holds:

* ``model.safetensors``: the trainable parameters (LoRA, adapters, PYRA, dispatchers, head; the
  whole model for ``full``), under their model names;
* ``config.json``: how to rebuild the model (timm name, method spec, configs, num_classes,
  where the pretrained weights came from, the seed of its random initialisation).

Every file is written to a temporary name in the same directory, flushed to disk and renamed
over the target, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..core.factory import added_methods, create_model, rebuild_options
from ..core.hub import resolve_location
from ..core.vit import spec_of
from ..core.weights import load_safetensors, load_state_into, rename_keys  # noqa: F401 - re-exported
from ..errors import TokenTuneError
from ..fileio import atomic_torch_save, atomic_write, atomic_write_json  # noqa: F401 - re-exported
from .rundir import CONFIG_NAME, RESUME_NAME, WEIGHTS_NAME, RunDir  # noqa: F401 - re-exported


def trained_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable parameters, detached, contiguous and on the CPU, and the buffers of the modules that
    own one (BatchNorm's running statistics in a task head: they change in training too)."""
    out = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buf in module.named_buffers(prefix=prefix, recurse=False):
                out[name] = buf.detach().to("cpu").contiguous()
    return out


def save_trained(model: nn.Module, directory: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model.safetensors`` (trainable parameters) and ``config.json`` into ``directory``."""
    spec = spec_of(model)
    if spec is None:
        raise TokenTuneError("save_trained needs a model built by tokentune.create_model")
    RunDir(directory).write_model(trained_state_dict(model), dict(spec, **(extra or {})))


def read_config(directory: str) -> Dict[str, Any]:
    """``config.json`` of a run directory (also ``local-dir:DIR`` or ``hf-hub:owner/repo``), as a dict;
    a missing or damaged file is one clear error."""
    return RunDir(resolve_location(os.fspath(directory), "the run", [CONFIG_NAME, WEIGHTS_NAME])).read_config()


def _init_seed_of(directory: str, config: Dict[str, Any], pretrained: Union[bool, str]) -> Optional[int]:
    """The seed the saved model was initialised from (None: unknown, and nothing frozen depends on it)."""
    if config.get("init_seed") is not None:
        return int(config["init_seed"])
    train_config = config.get("train_config") or {}
    if (config.get("run") or {}).get("cli") and "seed" in train_config:
        return int(train_config["seed"])    # older `tokentune train` seeded torch with it just before building
    if not pretrained:
        raise TokenTuneError(f"{directory!r} was trained on a random backbone (pretrained=False) but does not record "
                             "the seed it was initialised with (saved by an older tokentune), so its frozen weights "
                             "cannot be rebuilt; build the model as it was trained (same torch.manual_seed before "
                             "create_model) and pass it as model=, or train the run again")
    return None


def _weights_fix(directory: str, config: Dict[str, Any]) -> str:
    """What to do about a damaged ``model.safetensors``: what the directory still holds."""
    if os.path.isfile(os.path.join(directory, RESUME_NAME)):
        return (f"its {RESUME_NAME} still holds the trained weights of the last saved epoch: "
                f"`tokentune train --out {directory} --resume` (train(..., resume=True) in Python) rewrites "
                f"{WEIGHTS_NAME} from it")
    return "save the model again with save_trained, or train it again"


def load_trained(directory: str, pretrained: Union[bool, str, None] = None, model: Optional[nn.Module] = None,
                 add_method: Union[str, Sequence[str], None] = None) -> nn.Module:
    """Rebuild the model saved in ``directory`` (a folder, ``local-dir:DIR`` or ``hf-hub:owner/repo``)
    and load its trained parameters.

    The model is rebuilt with the recorded ``init_seed`` (see :func:`tokentune.create_model`), so
    frozen weights that were randomly initialised (a random backbone, a frozen new head) equal
    the saved model's; without a recorded seed (older runs) a random backbone is refused.

    Args:
        directory: written by :func:`save_trained` (or ``tokentune train``), also as
            ``local-dir:DIR`` or as a hub repository ``hf-hub:owner/repo[@revision]`` that
            :func:`tokentune.push_to_hub` wrote (only its config and weights are fetched).
        pretrained: override where the frozen backbone weights come from (default: as recorded;
            a recorded weights file is looked up relative to the run directory).
        model: load into this model instead of rebuilding one.
        add_method: training-free methods to add to the trained model (off the shelf), as
            ``tokentune eval --add-method`` takes them: ``"pitome:pitome_r=0.9"``, ``["tome:r=flops:2.0"]``
            (see :func:`tokentune.core.factory.added_methods`); the run's own methods and weights are
            kept. A combination that cannot compose (two token reducers) is refused in one line.
    """
    directory = resolve_location(os.fspath(directory), "the run", allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    config = read_config(directory)
    if add_method is not None and model is not None:
        raise TokenTuneError("load_trained takes add_method only when it rebuilds the model (model=None)")
    if model is None:
        options = rebuild_options(config)
        method = config["method"]
        if add_method:
            names, added = added_methods(add_method)
            method = "+".join([method] + names)
            options.update(added)
        source = config.get("pretrained", False) if pretrained is None else pretrained
        if pretrained is None and isinstance(source, str) and not os.path.isfile(source):
            raise TokenTuneError(f"the run in {directory!r} was trained from the weights file "
                                 f"{os.path.basename(source)!r}, which is not at {source!r} (the path is recorded "
                                 f"relative to the run directory); pass pretrained=PATH (--pretrained PATH), or "
                                 f"pretrained=True for the timm hub weights of {config['model']!r}")
        model = create_model(config["model"], method=method, num_classes=config["num_classes"],
                             pretrained=source, train_head=config.get("train_head", True),
                             # runs saved before the option existed kept a pretrained head of the same size
                             pretrained_head=config.get("pretrained_head", True),
                             seed=_init_seed_of(directory, config, source), **options)
    path = RunDir(directory).weights
    if not os.path.isfile(path):
        raise TokenTuneError(f"{directory!r} has no {WEIGHTS_NAME}; the run saved no weights yet")
    load_state_into(model, load_safetensors(path, _weights_fix(directory, config)), source=path)
    return model
