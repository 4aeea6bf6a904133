"""Small helpers every layer uses: one-line messages, JSON-able values, unwrapping wrapped models."""
from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any

from .errors import TokenTuneError


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line (whitespace collapsed), cut at ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return (text[:limit] + "...") if len(text) > limit else text


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses and mappings become dicts, tuples lists; anything
    else JSON does not know becomes its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def unwrap_model(model: Any) -> Any:
    """The model inside ``torch.compile`` (``_orig_mod``) and DDP-style (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and not hasattr(model, "tokentune"):   # DDP-style wrappers hold ``module``
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def require_extra(module: str, extra: str, purpose: str) -> Any:
    """Import the optional package ``module``, or fail with one line naming the extra to install.

    Args:
        module: the import name (``peft``, ``huggingface_hub``, ...).
        extra: tokentune's optional extra that brings it (``pip install 'tokentune[extra]'``).
        purpose: what needs it, for the message (``"reading peft adapters"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokenTuneError(f"{purpose} needs the optional package {module!r}; "
                             f"pip install 'tokentune[{extra}]'") from None
