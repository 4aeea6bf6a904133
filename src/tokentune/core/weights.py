"""Reading weight files of every kind, safely, and putting tensors into a model by name.

Every PyTorch file (pretrained weights, the reference implementations' checkpoints, a run's
``resume.pt``) is read by :func:`load_torch_file`: weights-only unpickling, which builds tensors
and plain values but never calls code named in the file. Only ``trust_checkpoint=True`` (for
files you trust: unpickling them can run any code) unpickles fully. ``.safetensors`` files go
through :func:`load_safetensors`; every failure is one :class:`~tokentune.errors.TokenTuneError`
line naming the file. :func:`rename_keys` maps the names of other code bases to ours and
:func:`load_state_into` copies tensors into a model, checking names and shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Pattern, Sequence, Tuple

import torch
from torch import nn

from ..errors import TokenTuneError
from ..utils import one_line

# The reference training scripts (DyT, DeiT, MAE, timm) pickle their argparse arguments next to the
# weights. Allow-listed, weights-only unpickling rebuilds them from plain values without running code.
SAFE_GLOBALS = (argparse.Namespace,)
TRUST_HINT = "only if you trust the file, pass trust_checkpoint=True (unpickling it can run any code)"
WEIGHTS_FIX = "expected a state dict saved with torch.save (.pth/.pt/.bin) or a .safetensors file"


def numpy_array_globals() -> List[Any]:
    """What weights-only unpickling needs to rebuild numpy float arrays (VPT's prompt files pickle them):
    the array, its dtype and numpy's array constructor, under numpy 2's and numpy 1's module names."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64")]
    return [np.ndarray, np.dtype, rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), *dtypes]


def _safe_globals(extra=()):
    """Allow :data:`SAFE_GLOBALS` (and ``extra``) in weights-only unpickling (scoped; torch 2.4 only has a global list)."""
    allowed = list(SAFE_GLOBALS) + list(extra)
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(allowed)
    torch.serialization.add_safe_globals(allowed)
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
    return f"it is damaged ({one_line(exc)})"


def load_torch_file(path: str, fix: str = WEIGHTS_FIX, *, trust_checkpoint: bool = False,
                    opt_in: Optional[str] = TRUST_HINT, allow: Sequence[Any] = ()) -> Any:
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
        allow: more globals weights-only unpickling may build (e.g. :func:`numpy_array_globals`).
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
        with _safe_globals(allow):
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
        raise TokenTuneError(f"cannot read {path}: it is not a complete safetensors file ({one_line(exc)}); "
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
    return read_checkpoint(path, trust_checkpoint=trust_checkpoint)[0]


def read_checkpoint(path: str, *, trust_checkpoint: bool = False) -> Tuple[Dict[str, torch.Tensor], Any]:
    """:func:`load_weights_file` and the training arguments saved beside the weights (the ``args``
    entry of the DeiT-style reference scripts, an ``argparse.Namespace`` or dict; None if absent)."""
    if not os.path.isfile(path):
        raise TokenTuneError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_safetensors(path, "download or write it again"), None
    obj = load_torch_file(path, trust_checkpoint=trust_checkpoint)
    return state_dict_of(obj, path), (obj.get("args") if isinstance(obj, dict) else None)


def state_dict_of(obj: Any, path: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: under ``state_dict``, ``model`` or ``module``, ``module.`` dropped."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TokenTuneError(f"{path} holds a {type(obj).__name__}, not a state dict; {WEIGHTS_FIX}")
    tensors = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TokenTuneError(f"{path} holds a dict without tensors, not a state dict; {WEIGHTS_FIX}")
    return tensors


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


def load_reference_state(model: nn.Module, tensors: Dict[str, torch.Tensor], *, source: str, fix: str,
                         ours_only: Optional[Pattern] = None, required: Optional[Pattern] = None) -> List[str]:
    """Copy a reference checkpoint, already renamed to our names, into ``model``: every checkpoint
    tensor must be used and every model tensor present (one :class:`TokenTuneError` line listing
    the unused and the missing ones, then ``fix``); shapes must agree.

    Args:
        source: what the tensors are, for the message ("EViT reference checkpoint").
        fix: what to do when they do not fit.
        ours_only: names of model tensors the reference has no counterpart for (LoRA, adapters
            added to the reference's method); they keep their values and are returned.
        required: instead of ``ours_only``, the names of the model tensors the reference has (the
            others keep their values).
    """
    want = model.state_dict()
    unused = sorted(k for k in tensors if k not in want)
    missing = sorted(k for k in want if k not in tensors and not (ours_only is not None and ours_only.search(k))
                     and (required is None or required.search(k)))
    if unused or missing:
        def listed(names: List[str]) -> str:
            return ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "")
        parts = ([f"unused: {listed(unused)}"] if unused else []) + ([f"missing: {listed(missing)}"] if missing else [])
        raise TokenTuneError(f"{source} does not fit this model ({'; '.join(parts)}); {fix}")
    for k, v in tensors.items():
        if tuple(want[k].shape) != tuple(v.shape):
            raise TokenTuneError(f"{source} does not fit this model: {k!r} has shape {tuple(v.shape)} there but "
                                 f"{tuple(want[k].shape)} here; {fix}")
    load_state_into(model, tensors, source=source, require_all_trainable=False)
    return sorted(k for k in want if k not in tensors)
