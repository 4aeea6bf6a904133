"""The module paths of tokentune 0.1's flat layout, kept importable for one release.

``import tokentune.tome`` (and the others below) still works and warns with a
``DeprecationWarning`` naming the new place. A path that moved as a whole is the new module itself
(so patching it patches the real one); a path whose contents were split is a module holding the
public names of its new modules. ``tokentune.train`` and ``tokentune.deploy`` are the functions of
the public API, as ``from tokentune import train`` always gave; their modules are
:mod:`tokentune.engine.training` and :mod:`tokentune.core.deploy`.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Dict, Tuple

#: old module -> the module(s) its contents live in now
MOVED: Dict[str, Tuple[str, ...]] = {
    "tokentune.model": ("tokentune.core.state", "tokentune.core.attention", "tokentune.core.block",
                        "tokentune.core.skip", "tokentune.core.vit"),
    "tokentune.backbone": ("tokentune.core.backbone", "tokentune.core.weights"),
    "tokentune.params": ("tokentune.core.params",),
    "tokentune.lora": ("tokentune.methods.lora",),
    "tokentune.adapter": ("tokentune.methods.adapter",),
    "tokentune.tome": ("tokentune.methods.tome",),
    "tokentune.schedules": ("tokentune.methods.tome",),
    "tokentune.pyra": ("tokentune.methods.pyra",),
    "tokentune.dyt": ("tokentune.methods.dyt",),
    "tokentune.config": ("tokentune.engine.config",),
    "tokentune.data": ("tokentune.engine.data",),
    "tokentune.evaluate": ("tokentune.engine.evaluate",),
    "tokentune.checkpoint": ("tokentune.engine.checkpoint",),
    "tokentune.distributed": ("tokentune.engine.distributed",),
    "tokentune.rundir": ("tokentune.engine.rundir",),
    "tokentune.bench": ("tokentune.tools.measure", "tokentune.core.flops", "tokentune.timing"),
    "tokentune.bench_cli": ("tokentune.tools.bench", "tokentune.cli.bench"),
    "tokentune.export": ("tokentune.tools.export", "tokentune.tools.onnx", "tokentune.cli.export"),
    "tokentune.viz": ("tokentune.tools.viz", "tokentune.cli.viz"),
    "tokentune.demo": ("tokentune.tools.demo",),
}


#: old modules whose name is now a function of the public API
FUNCTIONS = {"tokentune.train": "tokentune.engine.training", "tokentune.deploy": "tokentune.core.deploy"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths and builds them from their new modules."""

    def __init__(self) -> None:
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in FUNCTIONS:
            raise ModuleNotFoundError(f"{fullname} is a function (from tokentune import {fullname.split('.')[1]}); "
                                      f"its module is {FUNCTIONS[fullname]}", name=fullname)
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' and '.join(targets)}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=3)
        if len(targets) == 1:
            module = importlib.import_module(targets[0])  # the module itself: patches reach it
            self._specs[spec.name] = module.__spec__       # the import system overwrites it next
            return module
        module = types.ModuleType(spec.name, f"moved to {', '.join(targets)}")
        for target in targets:
            new = importlib.import_module(target)
            for name, value in vars(new).items():
                if not name.startswith("__"):
                    module.__dict__.setdefault(name, value)
        return module

    def exec_module(self, module):
        real = self._specs.pop(module.__spec__.name, None)
        if real is not None:
            module.__spec__ = real


_FINDER = _MovedModules()


def install() -> None:
    """Put the finder of the old module paths on ``sys.meta_path`` (once)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
