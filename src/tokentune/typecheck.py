"""Type checks of config dataclass fields, so ``TrainConfig(epochs=2.5)`` or ``batch_size="32"``
fail at once with one line instead of deep inside training.

Only the types config fields use are understood (int, float, bool, str, Optional, Union, Literal,
Sequence/List/Tuple, Dict, Any); anything else is accepted as is.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import typing
from typing import Any

from .errors import TokenTuneError


def _fits(hint, value) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin is typing.Union:
        return any(_fits(member, value) for member in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:   # an int is a fine float; NaN is not a setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(a, v) for a, v in zip(args, value))
        elem = args[0] if args else Any
        return all(_fits(elem, v) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict)
    return True


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return " or ".join(_describe(m) for m in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true/false"
    if hint is str:
        return "a string"
    if origin is tuple and typing.get_args(hint) and typing.get_args(hint)[-1] is not Ellipsis:
        return f"{len(typing.get_args(hint))} values"
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    if origin is dict:
        return "a dict"
    return getattr(hint, "__name__", str(hint))


def check_fields(obj: Any, prefix: str = "") -> None:
    """Raise one clear :class:`TokenTuneError` if a field of the dataclass ``obj`` has the wrong type.

    ``prefix`` names the options in the message the way users pass them (``lora_`` gives
    ``lora_rank``); by default the class name is used (``TrainConfig.epochs``).
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints.get(f.name, Any)
        value = getattr(obj, f.name)
        if not _fits(hint, value):
            name = f"{prefix}{f.name}" if prefix else f"{type(obj).__name__}.{f.name}"
            raise TokenTuneError(f"invalid {name}={value!r} ({type(value).__name__}): expected {_describe(hint)}")
