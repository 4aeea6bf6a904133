"""``--config FILE`` and ``--print-config``, for every subcommand.

A config file is YAML (``.yaml``/``.yml``, read with PyYAML, which timm installs) or JSON: one
mapping from option names to values, an option's name being its flag without the dashes, with
``_`` or ``-`` (``lr``, ``tome_r``, ``image-folder``)::

    # cifar-lora.yaml
    data: vtab-1k
    dataset: cifar
    method: lora+tome
    tome_r: [16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 10]
    lr: 1.0e-3
    timm: {drop_path_rate: 0.1}        # the repeatable KEY=VALUE options take a mapping

Values are checked exactly as the same option on the command line (YAML lists, booleans,
numbers and mappings are written in the option's syntax first). The file's values count as given
options (so they override a ``--recipe``), and flags on the command line override the file.
Positional arguments (``tokentune eval RUN``) stay on the command line. ``--config-file`` is the
same option under another name; in ``tokentune bench``, whose ``--config`` names a configuration
to measure, it is the only one.

``--print-config`` prints the options the command would run with (the file's and the command
line's, and the defaults of the other options), in a form ``--config`` reads back, and exits.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any, Dict, List, Optional

import yaml

from ..errors import TokenTuneError
from ..utils import jsonable
from .options import _show

CONFIG_FLAG = "--config"
#: the same, for every command; the only spelling in ``tokentune bench``, whose --config is a configuration spec
CONFIG_FILE_FLAG = "--config-file"
PRINT_FLAG = "--print-config"
_OWN_DESTS = ("config_file", "print_config", "help")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and ``--print-config`` to a (leaf) subcommand parser."""
    g = parser.add_argument_group("configuration file")
    flags = [f for f in (CONFIG_FLAG, CONFIG_FILE_FLAG) if f not in parser._option_string_actions]
    g.add_argument(*flags, dest="config_file", metavar="FILE", default=None,
                   help="YAML or JSON file of options (names as the flags without dashes: lr, tome_r, image_folder); "
                        "flags given on the command line override it")
    g.add_argument(PRINT_FLAG, action="store_true",
                   help="print the options this command would run with (as a --config file) and exit")


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping of options in a YAML or JSON file; every problem is one line."""
    if not os.path.isfile(path):
        raise TokenTuneError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    try:
        if path.lower().endswith(".json"):
            values = json.loads(text)
        else:
            values = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - YAML and JSON syntax errors alike
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else (f" at line {exc.lineno}" if hasattr(exc, "lineno")
                                                                        else "")
        raise TokenTuneError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}{line}: "
                             f"{' '.join(str(getattr(exc, 'problem', None) or getattr(exc, 'msg', exc)).split())}") \
            from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TokenTuneError(f"config file {path} holds a {type(values).__name__}; write a mapping of option names to "
                             "values (e.g. 'lr: 0.001')")
    return values


def _actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Optional arguments by their name without dashes (``--tome-r``: ``tome_r``), the positive flag first."""
    found: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in _OWN_DESTS:
            continue
        for flag in action.option_strings:
            if flag.startswith("--"):
                found.setdefault(flag[2:].replace("-", "_"), action)
    return found


def _value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from a file as ``action`` would parse it on the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        if not isinstance(value, bool):
            raise TokenTuneError(f"{where}: a switch takes true or false, got {value!r}")
        return action.const if value else (not action.const if isinstance(action.const, bool) else action.default)
    if isinstance(action, argparse._AppendAction):
        items = [f"{k}={_show(v)}" for k, v in value.items()] if isinstance(value, dict) else \
            (value if isinstance(value, list) else [value])
        return [_parse(action, str(item), where) for item in items]
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and not value:
        return ()                  # an empty sequence has no command-line spelling
    return _parse(action, value if isinstance(value, str) else _show(value), where)


def _parse(action: argparse.Action, text: str, where: str) -> Any:
    try:
        result = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise TokenTuneError(f"{where}: {' '.join(str(exc).split())}") from None
    if action.choices is not None and result not in action.choices:
        raise TokenTuneError(f"{where}: {result!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def config_values(parser: argparse.ArgumentParser, values: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``{dest: value}`` of a mapping of options as ``parser`` would parse them on the command line; every
    problem (unknown option, bad value, a positional argument) is one line starting with ``where``."""
    actions = _actions(parser)
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    parsed = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        here = f"{where}: {key}"
        if name in positionals:
            raise TokenTuneError(f"{here}: give the positional argument {name.upper()} on the command line")
        action = actions.get(name)
        if action is None:
            close = difflib.get_close_matches(name, list(actions), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for the options"
            raise TokenTuneError(f"{here}: this command has no option --{name.replace('_', '-')}{hint}")
        parsed[action.dest] = _value(action, value, here)
    return parsed


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the options of the file at ``path`` the defaults of ``parser`` (flags still override them)."""
    parser.set_defaults(**config_values(parser, read_config_file(path), path))


def leaf_parser(parser: argparse.ArgumentParser, argv: List[str]) -> Optional[argparse.ArgumentParser]:
    """The (sub)subcommand parser ``argv`` selects, following the subcommand names in it."""
    current, found = parser, None
    tokens = [t for t in argv if not t.startswith("-")]
    for token in tokens:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or token not in sub.choices:
            break
        current = found = sub.choices[token]
    return found


def config_path(parser: argparse.ArgumentParser, argv: List[str]) -> Optional[str]:
    """The config file ``argv`` names for the command ``parser`` (``--config FILE``, ``--config=FILE``,
    ``--config-file FILE``), if any."""
    flags = [f for f in (CONFIG_FLAG, CONFIG_FILE_FLAG)
             if getattr(parser._option_string_actions.get(f), "dest", None) == "config_file"]
    for i, token in enumerate(argv):
        for flag in flags:
            if token == flag and i + 1 < len(argv):
                return argv[i + 1]
            if token.startswith(flag + "="):
                return token.split("=", 1)[1]
    return None


def render_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options of ``args`` as a ``--config`` file: the given ones and the known defaults of the others
    (method options only when given: every registered method has its own, see --help)."""
    values: Dict[str, Any] = {}
    seen = set()
    for name, action in _actions(parser).items():
        if action.dest in seen:
            continue
        seen.add(action.dest)
        if hasattr(args, action.dest):
            value = getattr(args, action.dest)
        elif action.dest.startswith("m__") or not hasattr(action, "tokentune_default"):
            continue                   # a method's option not given, or a default the command resolves later
        else:
            value = action.tokentune_default
        if isinstance(action, argparse._AppendAction) and isinstance(value, list):
            value = dict(value)
        values[name] = jsonable(value)
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
