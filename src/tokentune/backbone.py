"""Backbones: any timm ViT by name, with weights from the hub or from a local file.

Every checkpoint format is absorbed here, through timm's own loaders:

* ``pretrained=True``: the timm hub weights of ``name`` (``vit_base_patch16_224.orig_in21k`` for
  the VTAB-1k papers' Google ImageNet-21k ViT-B/16);
* ``pretrained="ViT-B_16.npz"``: Google's original JAX/Flax ``.npz`` (timm's npz loader);
* ``pretrained="weights.pth"`` / ``".pt"`` / ``".bin"`` / ``".safetensors"``: a timm-style state
  dict (wrapped in ``state_dict``/``model`` keys or not; DeiT/original key layouts are remapped
  and position embeddings resampled by timm's checkpoint filter).

A head whose class count differs from ``num_classes`` is dropped and re-initialised.
"""
from __future__ import annotations

import difflib
import os
from typing import Optional, Union

import torch
from torch import nn

from .errors import TokenTuneError

WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")

# Names whose weights are NOT what their name suggests (a classic VTAB-1k pitfall).
_LEGACY_NOTES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.orig_in21k",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224.orig_in21k",
}


def _check_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    base = name.split(".")[0]
    if timm.is_model(base):
        raise TokenTuneError(f"timm has no pretrained tag {name!r}; see timm.list_pretrained('{base}*')")
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
    raise TokenTuneError(f"unknown model {name!r}{hint}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else text


def create_backbone(name: str, pretrained: Union[bool, str, os.PathLike] = False,
                    num_classes: Optional[int] = None, **timm_kwargs) -> nn.Module:
    """Create the timm model ``name`` with weights from the hub (True) or a local file (path)."""
    import timm

    _check_name(name)
    if num_classes is not None:
        timm_kwargs["num_classes"] = int(num_classes)
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if isinstance(pretrained, str):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise TokenTuneError(f"pretrained weights file {pretrained!r} does not exist; pass an existing "
                                 f"{'/'.join(WEIGHT_SUFFIXES)} file or pretrained=True for the hub")
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in WEIGHT_SUFFIXES:
            raise TokenTuneError(f"cannot read weights from {pretrained!r}: unknown suffix {suffix!r}; "
                                 f"use one of {', '.join(WEIGHT_SUFFIXES)}")
        overlay = dict(file=path, source="", hf_hub_id=None, url=None)
        if suffix == ".npz":
            overlay["custom_load"] = True      # timm's loader for Google's JAX checkpoints
        else:
            # hand timm the state dict itself so it keeps a head of the right size
            state_dict = load_weights_file(path)
            head = state_dict.get("head.weight")
            overlay.update(state_dict=state_dict, file=None,
                           num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else -1)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
            if isinstance(getattr(model, "pretrained_cfg", None), dict):
                model.pretrained_cfg.pop("state_dict", None)    # do not keep a second copy alive
                model.pretrained_cfg["file"] = path
            return model
        except TokenTuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
            raise TokenTuneError(f"weights in {pretrained!r} do not fit {name!r}: {_short(exc)}; "
                                 "check that the file is a checkpoint of this architecture") from exc
    if pretrained:
        if name in _LEGACY_NOTES:
            import warnings
            warnings.warn(f"timm maps {name!r} to AugReg weights; the VTAB-1k papers used Google's original "
                          f"ImageNet-21k weights, timm name {_LEGACY_NOTES[name]!r}", stacklevel=3)
        try:
            return timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as exc:  # noqa: BLE001
            raise TokenTuneError(
                f"could not fetch pretrained weights for {name!r} ({_short(exc)}); download them once and pass "
                f"the local file, e.g. pretrained='ViT-B_16.npz' (or --pretrained PATH)") from exc
    return timm.create_model(name, pretrained=False, **timm_kwargs)


def load_weights_file(path: str) -> dict:
    """Read a ``.safetensors``/``.pth`` state dict (only tensors), with a clear error."""
    if not os.path.isfile(path):
        raise TokenTuneError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TokenTuneError(f"cannot read checkpoint {path!r}: {_short(exc)}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TokenTuneError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
