"""Saving and loading only what was trained, atomically.

A *run directory* (or any directory given to :func:`save_trained`) holds:

* ``model.safetensors``: the trainable parameters (LoRA, adapters, PYRA, dispatchers, head; the
  whole model for ``full``), under their model names;
* ``config.json``: how to rebuild the model (timm name, method spec, configs, num_classes,
  where the pretrained weights came from).

Every file is written to a temporary name in the same directory, flushed to disk and renamed
over the target, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .errors import TokenTuneError

from .fileio import atomic_torch_save, atomic_write, atomic_write_json  # noqa: F401 - re-exported
from .rundir import CONFIG_NAME, WEIGHTS_NAME, RunDir  # noqa: F401 - re-exported


def rename_keys(state_dict, rules) -> Dict[str, torch.Tensor]:
    """Rename keys by the first matching ``(compiled regex, replacement)`` rule; drop ``module.``.

    Used by the converters of the reference implementations' checkpoints (PYRA, DyT).
    """
    out = {}
    for key, value in state_dict.items():
        key = key[7:] if key.startswith("module.") else key
        for pattern, repl in rules:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def trained_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable parameters, detached, contiguous and on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model: nn.Module, directory: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model.safetensors`` (trainable parameters) and ``config.json`` into ``directory``."""
    spec = getattr(model, "tokentune_spec", None)
    if spec is None:
        raise TokenTuneError("save_trained needs a model built by tokentune.create_model")
    RunDir(directory).write_model(trained_state_dict(model), dict(spec, **(extra or {})))


def read_config(directory: str) -> Dict[str, Any]:
    return RunDir(directory).read_config()


def load_state_into(model: nn.Module, tensors: Dict[str, torch.Tensor], source: str = "checkpoint",
                    require_all_trainable: bool = True) -> None:
    """Copy ``tensors`` into ``model`` by name; any name or shape mismatch is one clear error."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unknown = [k for k in tensors if k not in params]
    if unknown:
        raise TokenTuneError(f"{source} does not fit this model: it has {len(unknown)} unknown tensor(s), e.g. "
                             f"{unknown[0]!r}; build the model with the method/options it was trained with")
    for k, v in tensors.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise TokenTuneError(f"{source} does not fit this model: {k!r} has shape {tuple(v.shape)} there but "
                                 f"{tuple(params[k].shape)} here; check the model name, method options and num_classes")
    if require_all_trainable:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors]
        if missing:
            raise TokenTuneError(f"{source} does not fit this model: trainable {missing[0]!r} (and {len(missing) - 1} more) "
                                 "missing; build the model with the method it was trained with")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(dtype=params[k].dtype))


def load_trained(directory: str, pretrained: Union[bool, str, None] = None, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild the model saved in ``directory`` and load its trained parameters.

    Args:
        directory: written by :func:`save_trained` (or ``tokentune train``).
        pretrained: override where the frozen backbone weights come from (default: as recorded).
        model: load into this model instead of rebuilding one.
    """
    from safetensors.torch import load_file
    from .methods import create_model

    config = read_config(directory)
    if model is None:
        options = dict(config.get("timm_kwargs", {}))
        for name, cfg in config.get("configs", {}).items():
            options[name] = cfg
        model = create_model(config["model"], method=config["method"], num_classes=config["num_classes"],
                             pretrained=config.get("pretrained", False) if pretrained is None else pretrained,
                             train_head=config.get("train_head", True), **options)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise TokenTuneError(f"{directory!r} has no {WEIGHTS_NAME}; the run saved no weights yet")
    load_state_into(model, load_file(path), source=path)
    return model
