"""Backbones: any timm ViT by name, with weights from the hub or from a local file.

Every checkpoint format is absorbed here, through timm's own loaders:

* ``pretrained=True``: the timm hub weights of ``name`` (``vit_base_patch16_224.orig_in21k`` for
  the VTAB-1k papers' Google ImageNet-21k ViT-B/16); offline, and without the weights in the local
  cache, this fails at once with one line saying where to get them;
* ``pretrained="ViT-B_16.npz"``: Google's original JAX/Flax ``.npz`` (timm's npz loader);
* ``pretrained="weights.pth"`` / ``".pt"`` / ``".bin"`` / ``".safetensors"``: a timm-style state
  dict (wrapped in ``state_dict``/``model`` keys or not; DeiT/original key layouts are remapped
  and position embeddings resampled by timm's checkpoint filter).

With ``num_classes`` given, the checkpoint's head is dropped and the new head keeps timm's
initialisation (``fresh_head=True``, the default of :func:`tokentune.create_model` when adapting
to a new task), even when the class counts agree; ``fresh_head=False`` keeps a head of the same
size (timm's behaviour), and a head of another size is always re-initialised.

Weight files are read by :mod:`tokentune.core.weights` (weights-only unpickling).
"""
from __future__ import annotations

import difflib
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from typing import List, Optional, Tuple, Union

import timm
import torch
from torch import nn

from ..errors import TokenTuneError
from ..utils import one_line
from .hub import HF_HUB, LOCAL_DIR, hub_snapshot, split_source
from .weights import load_weights_file

WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")

# Names whose weights are NOT what their name suggests (a classic VTAB-1k pitfall).
_LEGACY_NOTES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.orig_in21k",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224.orig_in21k",
}

# Google's original ImageNet-21k ViT-B/16, the backbone of the VTAB-1k papers (JAX .npz).
VIT_B16_NPZ_URL = "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"

HUB_PROBE_TIMEOUT_S = 3.0


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    base = name.split(".")[0]
    if timm.is_model(base):
        raise TokenTuneError(f"timm has no pretrained tag {name!r}; see timm.list_pretrained('{base}*')")
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
    raise TokenTuneError(f"unknown model {name!r}{hint}")


def create_backbone(name: str, pretrained: Union[bool, str, os.PathLike] = False,
                    num_classes: Optional[int] = None, *, trust_checkpoint: bool = False, fresh_head: bool = False,
                    **timm_kwargs) -> nn.Module:
    """Create the timm model ``name`` with weights from the hub (True) or a local file (path).

    ``fresh_head`` (with ``num_classes``) never loads the checkpoint's classifier: the head keeps the
    initialisation timm gives a head of another class count.

    ``trust_checkpoint`` unpickles a ``.pth``/``.pt``/``.bin`` file fully (see :func:`load_torch_file`);
    only for files you trust, it can run code.
    """
    fresh = {}
    if num_classes is not None:
        timm_kwargs["num_classes"] = int(num_classes)
        if fresh_head:      # timm drops a pretrained classifier whose class count differs from the model's
            fresh = {"num_classes": -1}
    source, ident = split_source(name)
    if source is not None:
        return _sourced_backbone(name, source, ident, pretrained, fresh, **timm_kwargs)
    check_model_name(name)
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if isinstance(pretrained, str):
        if split_source(pretrained)[0] is not None:
            raise TokenTuneError(f"pretrained={pretrained!r} names a model with its own weights, not a weights file; "
                                 f"pass it as the model: create_model({pretrained!r}, pretrained=True) "
                                 f"(--model {pretrained} --pretrained hub)")
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
            if not zipfile.is_zipfile(path):   # numpy's .npz is a zip archive; timm's error would blame the model
                raise TokenTuneError(f"cannot read {pretrained!r}: it is not a complete .npz archive (truncated or "
                                     f"not numpy's format); download it again, e.g. {VIT_B16_NPZ_URL}")
            overlay["custom_load"] = True      # timm's loader for Google's JAX checkpoints
            if fresh:                          # it loads a head of the same size: keep the one timm initialised
                fresh = {"npz_head": True}
        else:
            # hand timm the state dict itself so it keeps a head of the right size
            state_dict = load_weights_file(path, trust_checkpoint=trust_checkpoint)
            head = state_dict.get("head.weight")
            overlay.update(state_dict=state_dict, file=None,
                           num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else -1)
            overlay.update(fresh)
        try:
            shapes = _embedding_shapes(overlay.get("state_dict") or {})
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
            if fresh.get("npz_head"):
                _timm_head_init(model)
            _say_resampled(pretrained, shapes, _embedding_shapes(model.state_dict()))
            if isinstance(getattr(model, "pretrained_cfg", None), dict):
                model.pretrained_cfg.pop("state_dict", None)    # do not keep a second copy alive
                model.pretrained_cfg["file"] = path
            return model
        except TokenTuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
            raise TokenTuneError(f"weights in {pretrained!r} do not fit {name!r}: {one_line(exc)}; "
                                 "check that the file is a checkpoint of this architecture") from exc
    if pretrained:
        if name in _LEGACY_NOTES:
            warnings.warn(f"timm maps {name!r} to AugReg weights; the VTAB-1k papers used Google's original "
                          f"ImageNet-21k weights, timm name {_LEGACY_NOTES[name]!r}", stacklevel=3)
        unavailable = _hub_unavailable(name)
        if unavailable:
            reason, where = unavailable
            raise TokenTuneError(
                f"cannot download the pretrained weights of {name!r}: {reason}, and they are not in the local "
                f"cache; download them on a machine with internet access ({where}; the VTAB-1k papers' ViT-B/16 is "
                f"Google's {VIT_B16_NPZ_URL}) and pass the file (pretrained='ViT-B_16.npz', --pretrained PATH), "
                "or use pretrained=False (--pretrained none) for a random backbone")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=fresh or None, **timm_kwargs)
        except Exception as exc:  # noqa: BLE001
            raise TokenTuneError(
                f"could not fetch pretrained weights for {name!r} ({one_line(exc)}); download them once and pass "
                f"the local file, e.g. pretrained='ViT-B_16.npz' (or --pretrained PATH)") from exc
    return timm.create_model(name, pretrained=False, **timm_kwargs)


_EMBEDDINGS = {"patch_embed.proj.weight": "patch embedding", "pos_embed": "position embedding"}


def _embedding_shapes(state: dict) -> dict:
    return {k: tuple(state[k].shape) for k in _EMBEDDINGS if k in state and hasattr(state[k], "shape")}


def _say_resampled(source: str, before: dict, after: dict) -> None:
    """Warn (one line) when timm resampled a checkpoint's patch or position embedding to this model."""
    changes = []
    for key, what in _EMBEDDINGS.items():
        if key in before and key in after and before[key] != after[key]:
            if key == "pos_embed":
                changes.append(f"the {what} from {before[key][1]} to {after[key][1]} positions")
            else:
                changes.append(f"the {what} from {before[key][2]}x{before[key][3]} to {after[key][2]}x{after[key][3]} "
                               "pixel patches")
    if changes:
        warnings.warn(f"{source}: timm resampled {' and '.join(changes)}; the weights were trained at another patch "
                      "or image size than this model's (pass the model name and img_size/patch_size they were "
                      "trained with to use them as they are)", UserWarning, stacklevel=4)


@torch.no_grad()
def _timm_head_init(model: nn.Module) -> None:
    """Give the classifier timm's ViT initialisation again (trunc_normal(0.02) weights, zero bias), as
    a model built for another class count has it; timm's ``.npz`` loader copies a head of the same size."""
    for attr in ("head", "head_dist"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)


# ----------------------------------------------------------------------------- hf-hub: and local-dir: models
#: what a hub repository of a timm model must provide: its config, and the weights when loading them
_HUB_CONFIG = ["config.json"]
_HUB_WEIGHTS = [["model.safetensors"], ["pytorch_model.bin", "*.pth"]]


def architecture_of(name: str, model: Optional[nn.Module] = None) -> str:
    """The timm name of ``name``: ``name`` itself, or for an ``hf-hub:``/``local-dir:`` model the
    ``architecture`` its ``config.json`` names (as recorded in the built ``model``'s pretrained_cfg)."""
    if split_source(name)[0] is not None and model is not None:
        return str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or name)
    return name


def _sourced_backbone(name: str, source: str, ident: str, pretrained, fresh: dict, **timm_kwargs) -> nn.Module:
    """A model from a folder or hub repository written by timm (``config.json`` + weights)."""
    if isinstance(pretrained, (str, os.PathLike)):
        raise TokenTuneError(f"{name!r} brings its own weights; pass pretrained=True to load them (--pretrained hub) or "
                             "False for a random backbone, not a weights file")
    if source == HF_HUB:
        folder = hub_snapshot(ident, f"the model {name}", _HUB_CONFIG)
        for patterns in (_HUB_WEIGHTS if pretrained else []):
            hub_snapshot(ident, f"the weights of {name}", patterns)
            if any(os.path.isfile(os.path.join(folder, p)) for p in patterns if "*" not in p):
                break
    else:
        folder = os.path.expanduser(ident)
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise TokenTuneError(f"{name!r} has no config.json; timm models saved with timm's save_for_hf / push_to_hf_hub "
                             "(or tokentune.export_deployed of a plain model) hold one")
    try:
        with open(config, encoding="utf-8") as fh:
            architecture = json.load(fh).get("architecture")
    except (OSError, ValueError, AttributeError) as exc:
        raise TokenTuneError(f"{config} is not a timm model config ({one_line(exc)})") from None
    if isinstance(architecture, str) and architecture.startswith("tokentune-"):
        raise TokenTuneError(f"{name!r} is a tokentune run or export, not a timm backbone; open it with "
                             "tokentune.load_trained / tokentune.load_deployed")
    if not architecture or not timm.is_model(architecture):
        raise TokenTuneError(f"{config} names architecture {architecture!r}, which timm {timm.__version__} does not know")
    try:
        return timm.create_model(f"{LOCAL_DIR}:{folder}", pretrained=bool(pretrained),
                                 pretrained_cfg_overlay=fresh or None, **timm_kwargs)
    except Exception as exc:  # noqa: BLE001 - one line for any loader failure
        raise TokenTuneError(f"cannot build {name!r}: {one_line(exc)}; check that the folder holds a timm model's "
                             "config.json and weights") from exc


# ----------------------------------------------------------------------------- hub
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_unavailable(name: str) -> Optional[Tuple[str, str]]:
    """``(why, from where)`` timm cannot download the weights of ``name`` now (None: cached, reachable or unknown).

    Asks timm where it would load them from; weights already in its local cache (Hugging Face or
    torch hub) need no network and are never probed. Otherwise ``HF_HUB_OFFLINE`` or a host that
    does not answer within :data:`HUB_PROBE_TIMEOUT_S` means offline: without this check the hub
    client retries for about a minute, logging a warning per attempt, before it gives up.
    """
    try:
        from timm.models import get_pretrained_cfg
        from timm.models._builder import _resolve_pretrained_source  # the source timm will use
        load_from, location = _resolve_pretrained_source(get_pretrained_cfg(name).to_dict())
    except Exception:  # noqa: BLE001 - no pretrained config, or another timm: let timm report it
        return None
    if load_from == "hf-hub":
        from huggingface_hub import constants, try_to_load_from_cache

        repo, files = (location[0], [location[1]]) if isinstance(location, tuple) else \
            (location, ["model.safetensors", "pytorch_model.bin"])     # timm prefers the safetensors file
        repo, _, revision = repo.partition("@")
        if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in files):
            return None
        # the variable, read now: huggingface_hub reads it only when it is imported
        url, where = constants.ENDPOINT, f"{constants.ENDPOINT}/{repo}"
        if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set", where
    elif load_from == "url":
        from timm.models._hub import check_cached_file
        if check_cached_file(location, check_hash=False):
            return None
        url = where = location
    else:
        return None
    if _answers(url, HUB_PROBE_TIMEOUT_S):
        return None
    host = urllib.parse.urlparse(url).netloc or url
    return f"{host} cannot be reached (no answer within {HUB_PROBE_TIMEOUT_S:g} s)", where


def _answers(url: str, timeout: float) -> bool:
    """Whether ``url``'s server answers a HEAD request within ``timeout`` seconds (any HTTP status).

    Runs in a daemon thread: the socket timeout does not bound a hanging DNS lookup, the join does.
    """
    answered: List[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass                       # an error status still comes from a reachable server
        except Exception:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean unreachable
            return
        answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)
