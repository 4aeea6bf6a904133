"""One place that turns config dataclasses into command-line options, and the options several
subcommands share (``--pretrained``, ``--timm``, data, method options).

Every option is documented in ``--help``: method options are generated from the method config
dataclasses (``--lora-rank``, ``--tome-r``, ...; those of every registered method) and training
options from :class:`tokentune.TrainConfig` (``--lr``, ``--epochs``, ...), with their documentation
taken from the dataclasses' ``Attributes:`` docstring sections.

Value syntax (shown in ``--help``): lists are comma-separated (``--tome-r 16,16,10``, with
``VALUExCOUNT`` repetition: ``--tome-r 16x11,10``), a ``(r, inflect)`` tuple is written with
the float as in Python (``--tome-r 16,-1.0``), booleans as ``true``/``false`` (a bare flag means
true), ``none`` clears an optional value, dictionaries are JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..core.method import available_methods, get_method
from ..core.task import available_tasks, get_task
from ..parsing import _is_sequence, _priority, convert, describe, parse_bool, parse_pretrained, timm_kwarg  # noqa: F401 - re-exported

DEFAULT_MODEL = "vit_base_patch16_224.orig_in21k"


# ----------------------------------------------------------------------------- docstrings
def field_docs(cls: type) -> Dict[str, str]:
    """Field documentation from a dataclass docstring's ``Attributes:`` section."""
    doc = inspect.getdoc(cls) or ""
    docs: Dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return docs
    base, current = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break                                  # the next section
        if base is None:
            base = indent
        m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line.strip())
        if indent == base and m:
            current = m.group(1)
            docs[current] = m.group(3).strip()
        elif indent > base and current is not None:
            docs[current] += " " + line.strip()
        elif indent < base:
            break
    # reST markup reads badly in a terminal: ``x`` and :func:`x` become x
    return {k: re.sub(r"(?::[\w:]+:)?`+~?([^`]*?)`+", r"\1", v) for k, v in docs.items()}


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()                    # type: ignore[misc]
    return None


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


@dataclass
class DataclassOption:
    """One generated option: ``--<prefix><field>`` parsed into ``dest``."""

    flag: str
    dest: str
    field: str
    hint: Any


def add_dataclass_options(group, cls: type, prefix: str, dest_prefix: str,
                          defaults: Optional[Dict[str, Any]] = None, skip: Tuple[str, ...] = ()) -> List[DataclassOption]:
    """Add one option per dataclass field, documented from the ``Attributes:`` docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        hint = hints.get(f.name, str)
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = dest_prefix + f.name
        default = (defaults or {}).get(f.name, _default_of(f))
        help_text = (docs.get(f.name) or "(undocumented)").rstrip(".")
        help_text = f"{help_text}. [{describe(hint)}; default: {_show(default)}]".replace("%", "%%")

        def parse(text, hint=hint, flag=flag):
            try:
                return convert(hint, text)
            except (ValueError, TypeError) as exc:
                raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None

        kwargs = dict(dest=dest, type=parse, default=argparse.SUPPRESS, help=help_text, metavar=_metavar(hint))
        if hint is bool:
            kwargs.update(nargs="?", const=True)
        action = group.add_argument(flag, **kwargs)
        action.tokentune_default = default       # what --print-config shows when the option is not given
        if hint is bool and not f.name.startswith("no_"):
            no_flag = "--no-" + prefix + f.name.replace("_", "-")
            group.add_argument(no_flag, dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
                               help=f"same as {flag} false")
        added.append(DataclassOption(flag, dest, f.name, hint))
    return added


def _metavar(hint) -> str:
    if hint is bool:
        return "BOOL"
    text = describe(hint)
    return text if len(text) <= 16 and "," not in text else "VALUE"


# ----------------------------------------------------------------------------- shared options
def add_data_options(parser, required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT", help="VTAB-1k root: the folder holding the prepared task folders "
                   "(<ROOT>/<name>/<split>.txt and <ROOT>/<name>/images/<split>/*.jpg)")
    g.add_argument("--dataset", metavar="NAME", help="VTAB-1k task name (cifar, caltech101, dtd, oxford_flowers102, "
                   "oxford_iiit_pet, svhn, sun397, patch_camelyon, eurosat, resisc45, diabetic_retinopathy, "
                   "clevr_count, clevr_dist, dmlab, kitti, dsprites_loc, dsprites_ori, smallnorb_azi, "
                   "smallnorb_ele; aliases cifar100, oxford_pet, ...)")
    g.add_argument("--image-folder", metavar="DIR", help="instead of VTAB-1k: a class-per-folder tree "
                   "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (or val/)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="every image is checked first (it exists, its header decodes, its mode is supported); leave "
                        "the bad ones out, reported and recorded, instead of stopping with an error")


def add_method_options(parser, defaults: Optional[Dict[str, Any]] = None) -> List[Tuple[str, DataclassOption]]:

    options = []
    for name in available_methods():
        method = get_method(name)
        if method.config is None:
            continue
        g = parser.add_argument_group(f"{name} options", f"{method.summary} (used when --method includes {name})"
                                      .replace("%", "%%"))
        for opt in add_dataclass_options(g, method.config, f"{name}-", f"m__{name}__"):
            options.append((name, opt))
    return options


def add_task_options(parser) -> List[Tuple[str, DataclassOption]]:
    """``--task`` and one option group per registered task (``--<task>-<field>``, dest ``k__<task>__<field>``)."""
    parser.add_argument("--task", metavar="NAME", default=argparse.SUPPRESS,
                        help="what the model learns: classification (images -> a class) or "
                             + ", ".join(f"{n} ({get_task(n).summary})" for n in available_tasks())
                             + " [default: classification]")
    options = []
    for name in available_tasks():
        task = get_task(name)
        g = parser.add_argument_group(f"{name} options", f"{task.summary} (used with --task {name})".replace("%", "%%"))
        for opt in add_dataclass_options(g, task.config, f"{name}-", f"k__{name}__"):
            options.append((name, opt))
    return options
