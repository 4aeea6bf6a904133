"""Backbones: any timm ViT by name, with weights from the hub or from a local file.

Every checkpoint format is absorbed here, through timm's own loaders:

* ``pretrained=True``: the timm hub weights of ``name`` (``vit_base_patch16_224.orig_in21k`` for
  the VTAB-1k papers' Google ImageNet-21k ViT-B/16); offline, and without the weights in the local
  cache, this fails at once with one line saying where to get them;
* ``pretrained="ViT-B_16.npz"``: Google's original JAX/Flax ``.npz`` (timm's npz loader);
* ``pretrained="weights.pth"`` / ``".pt"`` / ``".bin"`` / ``".safetensors"``: a timm-style state
  dict (wrapped in ``state_dict``/``model`` keys or not; DeiT/original key layouts are remapped
  and position embeddings resampled by timm's checkpoint filter).

A head whose class count differs from ``num_classes`` is dropped and re-initialised.

Every PyTorch file (pretrained weights, the reference implementations' checkpoints, a run's
``resume.pt``) is read by :func:`load_torch_file`: weights-only unpickling, which builds tensors
and plain values but never calls code named in the file. Only ``trust_checkpoint=True`` (for
files you trust: unpickling them can run any code) unpickles fully.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import TokenTuneError

WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")

# Names whose weights are NOT what their name suggests (a classic VTAB-1k pitfall).
_LEGACY_NOTES = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.orig_in21k",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224.orig_in21k",
}

# The reference training scripts (DyT, DeiT, MAE, timm) pickle their argparse arguments next to the
# weights. Allow-listed, weights-only unpickling rebuilds them from plain values without running code.
SAFE_GLOBALS = (argparse.Namespace,)

# Google's original ImageNet-21k ViT-B/16, the backbone of the VTAB-1k papers (JAX .npz).
VIT_B16_NPZ_URL = "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"

TRUST_HINT = "only if you trust the file, pass trust_checkpoint=True (unpickling it can run any code)"
WEIGHTS_FIX = "expected a state dict saved with torch.save (.pth/.pt/.bin) or a .safetensors file"
HUB_PROBE_TIMEOUT_S = 3.0


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
                    num_classes: Optional[int] = None, *, trust_checkpoint: bool = False, **timm_kwargs) -> nn.Module:
    """Create the timm model ``name`` with weights from the hub (True) or a local file (path).

    ``trust_checkpoint`` unpickles a ``.pth``/``.pt``/``.bin`` file fully (see :func:`load_torch_file`);
    only for files you trust, it can run code.
    """
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
            if not zipfile.is_zipfile(path):   # numpy's .npz is a zip archive; timm's error would blame the model
                raise TokenTuneError(f"cannot read {pretrained!r}: it is not a complete .npz archive (truncated or "
                                     f"not numpy's format); download it again, e.g. {VIT_B16_NPZ_URL}")
            overlay["custom_load"] = True      # timm's loader for Google's JAX checkpoints
        else:
            # hand timm the state dict itself so it keeps a head of the right size
            state_dict = load_weights_file(path, trust_checkpoint=trust_checkpoint)
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
        unavailable = _hub_unavailable(name)
        if unavailable:
            reason, where = unavailable
            raise TokenTuneError(
                f"cannot download the pretrained weights of {name!r}: {reason}, and they are not in the local "
                f"cache; download them on a machine with internet access ({where}; the VTAB-1k papers' ViT-B/16 is "
                f"Google's {VIT_B16_NPZ_URL}) and pass the file (pretrained='ViT-B_16.npz', --pretrained PATH), "
                "or use pretrained=False (--pretrained none) for a random backbone")
        try:
            return timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as exc:  # noqa: BLE001
            raise TokenTuneError(
                f"could not fetch pretrained weights for {name!r} ({_short(exc)}); download them once and pass "
                f"the local file, e.g. pretrained='ViT-B_16.npz' (or --pretrained PATH)") from exc
    return timm.create_model(name, pretrained=False, **timm_kwargs)


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


# ----------------------------------------------------------------------------- files
def _safe_globals():
    """Allow :data:`SAFE_GLOBALS` in weights-only unpickling (scoped; torch 2.4 only has a global list)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(list(SAFE_GLOBALS))
    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
    return contextlib.nullcontext()


def _refused_globals(path: str, exc: BaseException) -> List[str]:
    """The globals weights-only unpickling refused in ``path`` (empty: it failed for another reason)."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    listing = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if listing is not None and zipfile.is_zipfile(path):
        try:
            return [g for g in listing(path) if g not in allowed]   # all of them, read without unpickling
        except Exception:  # noqa: BLE001 - fall back to the one torch's message names
            pass
    named = [g for g in re.findall(r"GLOBAL ([\w.]+)", text) if g not in allowed][:1]
    # a torch function that does not exist was not written by torch.save: the name is cut off
    return [] if named and named[0].startswith("torch.") and not _torch_has(named[0]) else named


def _torch_has(name: str) -> bool:
    """Whether the dotted ``name`` exists inside torch (imports only torch's own modules)."""
    import importlib

    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
        return obj is not None
    return False


def _damage(path: str, head: bytes, exc: BaseException) -> str:
    """Why torch could not read ``path``, in a few words."""
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "it is truncated or damaged (its zip directory is missing)"
        with zipfile.ZipFile(path) as archive:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                return "it is a zip archive, but not one written by torch.save"
    text = str(exc)
    detail = re.search(r"Unsupported operand \d+", text)
    if detail:     # an opcode torch.save never writes: pickle.dump output, or damage
        return f"it is damaged or not written by torch.save ({detail.group(0)})"
    if "truncated" in text or "Weights only load failed" in text or isinstance(exc, EOFError):
        return "it is truncated or damaged"
    return f"it is damaged ({_short(exc)})"


def load_torch_file(path: str, fix: str = WEIGHTS_FIX, *, trust_checkpoint: bool = False,
                    opt_in: Optional[str] = TRUST_HINT) -> Any:
    """Read a file written by ``torch.save`` onto the CPU; every failure is one :class:`TokenTuneError` line.

    Unpickling is weights-only (tensors, containers, numbers, strings and :data:`SAFE_GLOBALS`):
    a file naming any other class or function is refused, listing them, since unpickling it could
    run arbitrary code.

    Args:
        path: the file.
        fix: what the file should be or what to do, appended to errors about its contents.
        trust_checkpoint: unpickle fully (``weights_only=False``). Like ``trust_remote_code``:
            only for files you trust, it can run any code.
        opt_in: how to opt in, appended when globals are refused (None: ``fix`` instead, for
            files that never need it, such as tokentune's own).
    """
    with open(path, "rb") as fh:
        head = fh.read(32)
    if not head:
        raise TokenTuneError(f"cannot read {path}: the file is empty; {fix}")
    if not head.startswith((b"PK", b"\x80")):     # zip archive (torch >= 1.6) or pickle (older torch.save)
        try:
            what = f"it is a text file (starting {head.decode('utf-8').splitlines()[0][:24]!r}), not one"
        except UnicodeDecodeError:
            what = "its format is unknown: it is not a file"
        raise TokenTuneError(f"cannot read {path}: {what} written by torch.save; {fix}")
    try:
        if trust_checkpoint:
            return torch.load(path, map_location="cpu", weights_only=False)
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one line
        refused = _refused_globals(path, exc)
        if refused:
            raise TokenTuneError(f"{path} pickles {', '.join(refused)}, which safe (weights-only) loading refuses "
                                 f"because unpickling could run code; {opt_in or fix}") from None
        raise TokenTuneError(f"cannot read {path}: {_damage(path, head, exc)}; {fix}") from None


def load_safetensors(path: str, fix: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a damaged file as one :class:`TokenTuneError` line ending in ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as exc:
        raise TokenTuneError(f"cannot read {path}: it is not a complete safetensors file ({_short(exc)}); "
                             f"{fix}") from None


def load_weights_file(path: str, *, trust_checkpoint: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict, with a clear error.

    Reads pretrained weights and the reference implementations' checkpoints alike: the state
    dict may sit under a ``state_dict``, ``model`` or ``module`` key next to other entries (training
    arguments, optimizer state, epoch), which are dropped, as are ``module.`` key prefixes.

    Args:
        path: the file.
        trust_checkpoint: unpickle a PyTorch file fully (see :func:`load_torch_file`); only for
            files you trust, it can run any code.
    """
    if not os.path.isfile(path):
        raise TokenTuneError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_safetensors(path, "download or write it again")
    obj = load_torch_file(path, trust_checkpoint=trust_checkpoint)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TokenTuneError(f"{path} holds a {type(obj).__name__}, not a state dict; {WEIGHTS_FIX}")
    tensors = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TokenTuneError(f"{path} holds a dict without tensors, not a state dict; {WEIGHTS_FIX}")
    return tensors
