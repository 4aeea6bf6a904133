"""The project's bars, checked over the source: no function over 100 lines; no registered method's name
tested outside the method's own module (tools and the loop ask methods through hooks)."""
import ast
import os
import re
import sys

import tokentune  # noqa: F401 - registers the methods
from tokentune.core.method import available_methods, get_method

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "tokentune")
MAX_LINES = 100


def _sources():
    for folder, _, files in os.walk(SRC):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as fh:
                    yield os.path.relpath(path, SRC), ast.parse(fh.read(), path)


def test_no_function_is_longer_than_100_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _sources() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "functions over 100 lines: " + "; ".join(long)


def _home(name: str) -> str:
    """The source path prefix of the method's own module: its folder under methods/, or its file."""
    path = os.path.relpath(sys.modules[get_method(name).apply.__module__].__file__, SRC)
    folder = os.path.dirname(path)
    return folder + os.sep if folder != "methods" else path


#: what a method's name is compared with when code tests it: a spec, a method (name), a list of them
_ABOUT_METHODS = re.compile(r"method|spec|\bname\b|\.name\b|names")


def _tested_names(tree, names):
    """(line, name) of every comparison of a method name with a spec or method (name): ``"dyt" in spec``,
    ``m.name == "tome"``, ``method in ("tome", "pyra")``, ``spec.startswith("lora")``. The same words
    compared with something else (``cfg.tau_schedule == "linear"``) are other options' values."""
    for node in ast.walk(tree):
        constants, others = [], []
        if isinstance(node, ast.Compare):
            for op in [node.left, *node.comparators]:
                items = op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
                constants += [i.value for i in items if isinstance(i, ast.Constant)]
                others += [ast.unparse(i) for i in items if not isinstance(i, ast.Constant)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith", "count", "index")):
            constants = [a.value for a in node.args if isinstance(a, ast.Constant)]
            others = [ast.unparse(node.func.value)]
        if any(_ABOUT_METHODS.search(o) for o in others):
            for value in constants:
                if isinstance(value, str) and value in names:
                    yield node.lineno, value


def test_no_method_name_is_tested_outside_its_own_module():
    names = set(available_methods())
    homes = {n: _home(n) for n in names}
    found = [f"{path}:{line} tests {name!r}" for path, tree in _sources() for line, name in _tested_names(tree, names)
             if not path.startswith(homes[name])]
    assert not found, "method names tested outside their module (add a hook on core.method.Method): " + "; ".join(found)


def test_the_method_name_check_finds_what_it_looks_for():
    tree = ast.parse("a = 'tome' in spec\nb = m.name == 'dyt'\nc = method in ('lora', 'y')\n"
                     "d = spec.startswith('pyra')\ne = 'tome'\nf = 'dyt' not in [m.name for m in methods]\n"
                     "g = cfg.tau_schedule == 'linear'")
    assert sorted(_tested_names(tree, {"tome", "dyt", "lora", "pyra", "linear"})) == [
        (1, "tome"), (2, "dyt"), (3, "lora"), (4, "pyra"), (6, "dyt")]


def test_ci_runs_the_readme_test_command_and_the_onnx_tests():
    root = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(root, ".ci", "run"), encoding="utf-8").read()
    command = re.search(r'Run the tests.*?```bash\n(.*?)\n```', readme, re.S).group(1).strip()
    assert command in ci and ".[test,onnx]" in command          # the ONNX tests run, not skip
    assert "python -m pytest -q -m slow -k onnx" in ci and "python -m pytest -q -m slow -k onnx" in readme
