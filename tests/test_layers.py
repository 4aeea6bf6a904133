"""The package's shape: layers import in one direction, no import cycles; the code passes ruff.

Layers (an arrow: "may import")::

    cli -> tools -> engine -> core <- methods

    tasks (when they exist) sit beside tools: they may import engine and core, tools and cli them.
    Leaves (errors, fileio, parsing, precision, timing, typecheck, utils, version) are imported by
    every layer and import only other leaves.

Every import counts, including those inside functions; ``tokentune/__init__.py`` (the public
surface, which also imports the built-in methods so that they register) and ``__main__`` may import
anything. Optional third-party imports are not our concern here.
"""
import ast
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "src", "tokentune")

LEAVES = ("errors", "fileio", "parsing", "precision", "timing", "typecheck", "utils", "version")
ALLOWED: Dict[str, Set[str]] = {
    "leaf": {"leaf"},
    "core": {"core", "leaf"},
    "methods": {"methods", "core", "leaf"},
    "engine": {"engine", "core", "leaf"},
    "tasks": {"tasks", "engine", "core", "leaf"},
    "tools": {"tools", "tasks", "engine", "core", "leaf"},
    "cli": {"cli", "tools", "tasks", "engine", "core", "leaf"},
    "top": {"top", "cli", "tools", "tasks", "engine", "methods", "core", "leaf"},
}

# Imports that break the rule today. This list may only shrink (it is empty: keep it so).
ALLOWED_VIOLATIONS: Set[Tuple[str, str]] = set()
# Function-local imports of our own modules today (they hide cycles). This list may only shrink.
ALLOWED_LOCAL_IMPORTS: Set[Tuple[str, str]] = set()
# Import cycles today (module groups). This list may only shrink.
ALLOWED_CYCLES: List[Set[str]] = []


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts == ["tokentune"] or parts[1] in ("__main__", "_compat"):
        return "top"
    if parts[1] in LEAVES:
        return "leaf"
    if parts[1] in ALLOWED:
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer: put it in one of {sorted(ALLOWED)} or make it a leaf")


def package_modules() -> Dict[str, str]:
    """{module name: file path} of every module of the package."""
    found = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: str, known: Set[str]) -> List[Tuple[str, bool]]:
    """(imported tokentune module, inside a function?) for every import of ``module``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "tokentune")
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_package, child)
                if target.split(".")[0] != "tokentune":
                    continue
                for alias in child.names:       # "from . import x" may name a submodule
                    sub = f"{target}.{alias.name}"
                    out.append((sub if sub in known else target, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def import_graph() -> Dict[str, List[Tuple[str, bool]]]:
    modules = package_modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        targets = []
        for target, local in imports_of(module, path, known):
            while target not in known and "." in target:      # an attribute of a module
                target = target.rsplit(".", 1)[0]
            if target != module:
                targets.append((target, local))
        graph[module] = targets
    return graph


def test_layers_import_in_one_direction():
    bad = set()
    for module, targets in import_graph().items():
        for target, _ in targets:
            if target == "tokentune" and layer_of(module) != "top":
                bad.add((module, target))               # the package's own __init__ imports everything
            elif layer_of(target) not in ALLOWED[layer_of(module)]:
                bad.add((module, target))
    new = sorted(bad - ALLOWED_VIOLATIONS)
    assert not new, "imports against the layer rule:\n" + "\n".join(f"  {a} -> {b}" for a, b in new)
    gone = sorted(ALLOWED_VIOLATIONS - bad)
    assert not gone, "fixed, remove from ALLOWED_VIOLATIONS:\n" + "\n".join(f"  {a} -> {b}" for a, b in gone)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in ts if t != "tokentune"}) for m, ts in import_graph().items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            strongconnect(v)
    new = [c for c in cycles if set(c) not in ALLOWED_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [c for c in ALLOWED_CYCLES if sorted(c) not in cycles]
    assert not gone, f"cycles fixed, remove from ALLOWED_CYCLES: {gone}"


def test_no_function_local_imports_of_our_own_modules():
    """Imports inside functions hide the dependency structure; the layers make them unnecessary."""
    local = {(m, t) for m, ts in import_graph().items() for t, is_local in ts if is_local and layer_of(m) != "top"}
    new = sorted(local - ALLOWED_LOCAL_IMPORTS)
    assert not new, "function-local imports:\n" + "\n".join(f"  {a} -> {b}" for a, b in new)
    gone = sorted(ALLOWED_LOCAL_IMPORTS - local)
    assert not gone, "fixed, remove from ALLOWED_LOCAL_IMPORTS:\n" + "\n".join(f"  {a} -> {b}" for a, b in gone)


def test_ruff_passes():
    """The linter configuration in pyproject.toml holds for the package, the tests and the benchmarks."""
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.isfile(ruff):
        pytest.skip("ruff is not installed (pip install '.[test]' brings it)")
    proc = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
