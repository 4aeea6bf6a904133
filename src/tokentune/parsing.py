"""Text -> typed values: the value syntax of the command line and of ``tokentune bench --config``.

Lists are comma-separated (``16,16,10``, with ``VALUExCOUNT`` repetition: ``16x11,10``), a tuple
such as ToMe's ``(r, inflect)`` is written with the float as in Python (``16,-1.0``), booleans as
``true``/``false``, ``none`` clears an optional value, dictionaries are JSON.
"""
from __future__ import annotations

import argparse
import collections.abc
import json
import re
import typing
from typing import Any, List, Tuple, Union

_NONE = ("none", "null")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _split_list(text: str) -> List[str]:
    items: List[str] = []
    for part in [p.strip() for p in str(text).split(",")]:
        if not part:
            raise ValueError(f"empty item in {text!r}")
        m = re.fullmatch(r"([+-]?[\d.eE+-]+)[x*](\d+)", part)
        items.extend([m.group(1)] * int(m.group(2)) if m else [part])
    return items


def _literal(text: str):
    for caster in (lambda v: convert(int, v), float):
        try:
            return caster(text)
        except ValueError:
            continue
    return text


def _is_sequence(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, collections.abc.Sequence, typing.Sequence):
        return True
    return origin is tuple and len(typing.get_args(hint)) == 2 and typing.get_args(hint)[1] is Ellipsis


def _priority(hint) -> int:
    if hint is bool:
        return 0
    if hint is int:
        return 1
    if hint is float:
        return 2
    if _is_sequence(hint):
        return 3
    if typing.get_origin(hint) is tuple:
        return 4
    if hint is str:
        return 9
    return 5


def convert(hint, text: str):
    """Parse ``text`` as a value of the type ``hint`` (raises ValueError)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if origin is typing.Union:
        members = typing.get_args(hint)
        if type(None) in members and str(text).strip().lower() in _NONE:
            return None
        listy = "," in str(text) and any(_is_sequence(m) or typing.get_origin(m) is tuple for m in members)
        for member in sorted((m for m in members if m is not type(None)), key=_priority):
            if member is str and listy:      # "16,abc" is a broken list, not a name
                continue
            try:
                return convert(member, text)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"{text!r} fits none of {describe(hint)}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        for c in choices:
            if str(c) == text:
                return c
        raise ValueError(f"choose from {', '.join(map(str, choices))}")
    if hint is bool:
        return parse_bool(text)
    if hint is int:
        if not re.fullmatch(r"[+-]?\d+", str(text).strip()):
            raise ValueError(f"expected an integer, got {text!r}")
        return int(text)
    if hint is float:
        return float(text)
    if hint is str:
        return str(text)
    if _is_sequence(hint):
        elem = typing.get_args(hint)[0] if typing.get_args(hint) else str
        values = [convert(elem, item) for item in _split_list(text)]
        return tuple(values) if origin is tuple else values
    if origin is tuple:
        types = typing.get_args(hint)
        items = [p.strip() for p in str(text).split(",")]
        if len(items) != len(types):
            raise ValueError(f"expected {len(types)} comma-separated values")
        values = []
        for t, item in zip(types, items):
            if t is float and re.fullmatch(r"[+-]?\d+", item):
                raise ValueError("write the float with a decimal point")
            values.append(convert(t, item))
        return tuple(values)
    if origin is dict or hint is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    if hint in (list, tuple):   # unparameterised: comma-separated numbers or words
        values = [_literal(item) for item in _split_list(text)]
        return tuple(values) if hint is tuple else values
    if isinstance(hint, type):
        return hint(text)
    raise ValueError(f"cannot parse {describe(hint)} from the command line")


def describe(hint) -> str:
    """The command-line syntax of a type, for ``--help``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        text = " | ".join(describe(m) for m in sorted(members, key=_priority))
        return text + (" | none" if type(None) in typing.get_args(hint) else "")
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    if hint is bool:
        return "true|false"
    if hint in (int, float, str):
        return hint.__name__.upper()
    if _is_sequence(hint):
        elem = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return f"{describe(elem)},{describe(elem)},..."
    if origin is tuple:
        return "(" + ",".join(describe(t) for t in typing.get_args(hint)) + ")"
    if origin is dict or hint is dict:
        return "JSON"
    return "VALUE"


def parse_pretrained(text: str) -> Union[bool, str]:
    """``--pretrained`` value: ``hub`` (timm hub), ``none`` (random init) or a weights file."""
    t = text.strip()
    if t.lower() in ("hub", "true", "yes", "1"):
        return True
    if t.lower() in ("none", "false", "no", "0", "random"):
        return False
    if t.startswith(("hf-hub:", "local-dir:")):
        raise argparse.ArgumentTypeError(
            f"{t!r} names a model with its own weights, not a weights file; pass it as the model: --model {t} "
            "--pretrained hub")
    return t


def timm_kwarg(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--timm expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    return key.strip(), (None if low in _NONE else _literal(value))
