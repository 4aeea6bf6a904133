"""The sweep file: which runs make an experiment (tasks x methods x seeds x option grid), as cells.

A sweep file is YAML (or JSON)::

    out: runs/vtab-sweep                 # every cell is a run directory below it
    data: vtab-1k                        # the VTAB-1k root for task names
    tasks: [natural, eurosat]            # VTAB-1k names, groups (natural/specialized/structured/all),
                                         # or {name: N, image_folder: DIR} / {name: N, data: R, dataset: D, ...}
    methods: [lora, lora+tome, recipe:pyra-vtab]   # method specs or recipes ({method: SPEC, label: L, options: {...}})
    seeds: [0, 1, 2]
    grid: {lora_rank: [4, 8]}            # every combination of these options (options a cell's method lacks: error)
    options: {pretrained: ViT-B_16.npz, epochs: 100}   # given to every cell, as in a train --config file
    backend: local                       # or slurm
    workers: 2                           # local: cells run at once (one GPU each, or the CPU threads split)
    slurm: {partition: gpu, time_min: 240, gpus_per_task: 1, cpus_per_task: 8, mem_gb: 32, array_parallelism: 16}

Options are ``tokentune train`` options named as in a ``--config`` file (``lr``, ``tome_r``, ``batch_size``).
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from ...core.method import get_recipe
from ...engine.data import VTAB_GROUPS, VTAB_TASKS, vtab_task
from ...errors import TokenTuneError

#: the group names a sweep file may list as tasks
TASK_GROUPS: Dict[str, List[str]] = {g.lower(): [t for t, task in VTAB_TASKS.items() if task.group == g]
                                     for g in VTAB_GROUPS}
TASK_GROUPS["all"] = list(VTAB_TASKS)
#: options that a cell's task or the sweep decides; a sweep file's options/grid may not set them
_CELL_OWNED = ("out", "resume", "restart_from_weights", "dataset", "image_folder", "seed", "label", "recipe", "method")


@dataclass
class SlurmOptions:
    """Slurm settings of a sweep (passed to submitit's executor).

    Attributes:
        partition: Slurm partition (``--partition``).
        time_min: time limit of one cell's job in minutes; a cell that reaches it is requeued and resumes.
        gpus_per_task: GPUs per cell.
        cpus_per_task: CPU cores per cell.
        mem_gb: memory per cell in GB.
        array_parallelism: at most this many cells run at once (the array's ``%N``).
        account: Slurm account, if the cluster needs one.
        qos: quality of service, if any.
        constraint: node feature constraint, if any.
        max_requeue: how often a cell is requeued after preemption or its time limit.
        additional: any other ``sbatch`` option as a mapping (``{exclusive: true}``), given to submitit as is.
    """

    partition: Optional[str] = None
    time_min: int = 240
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: Optional[float] = None
    array_parallelism: int = 32
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    max_requeue: int = 3
    additional: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    """A parsed sweep file (see the module docstring for each key)."""

    out: str
    tasks: List[Any]
    methods: List[Any]
    seeds: List[int] = field(default_factory=lambda: [0])
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)
    data: Optional[str] = None
    backend: str = "local"
    workers: int = 1
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    source: str = "sweep"


@dataclass
class Cell:
    """One run of the sweep: its name (also its run directory below ``out``) and its train options."""

    name: str
    task: str
    label: str
    seed: int
    options: Dict[str, Any]
    run_dir: str


def _fail(where: str, text: str) -> TokenTuneError:
    return TokenTuneError(f"{where}: {text}")


def _list(value: Any, where: str, key: str) -> List[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(where, f"'{key}' is empty; list at least one")
    return items


def _slurm(value: Any, where: str) -> SlurmOptions:
    if value is None:
        return SlurmOptions()
    if not isinstance(value, dict):
        raise _fail(where, "'slurm' must be a mapping (partition, time_min, gpus_per_task, ...)")
    known = [f.name for f in fields(SlurmOptions)]
    bad = sorted(set(value) - set(known))
    if bad:
        raise _fail(where, f"unknown slurm option(s) {', '.join(bad)}; known: {', '.join(known)}")
    return SlurmOptions(**value)


def parse_sweep(values: Dict[str, Any], source: str = "sweep", base_dir: Optional[str] = None) -> SweepSpec:
    """A :class:`SweepSpec` from the mapping of a sweep file; every problem is one line naming ``source``."""
    if not isinstance(values, dict):
        raise TokenTuneError(f"{source}: a sweep file is a mapping (out, tasks, methods, seeds, grid, options, ...)")
    known = [f.name for f in fields(SweepSpec) if f.name != "source"]
    bad = sorted(set(values) - set(known))
    if bad:
        raise _fail(source, f"unknown key(s) {', '.join(map(str, bad))}; a sweep file has {', '.join(known)}")
    for key in ("out", "tasks", "methods"):
        if values.get(key) in (None, "", []):
            raise _fail(source, f"'{key}' is missing or empty")
    seeds = _list(values.get("seeds", [0]), source, "seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise _fail(source, f"'seeds' must be distinct integers, got {seeds!r}")
    grid = values.get("grid") or {}
    options = values.get("options") or {}
    for key, mapping in (("grid", grid), ("options", options)):
        if not isinstance(mapping, dict):
            raise _fail(source, f"'{key}' must be a mapping of option names to {'lists' if key == 'grid' else 'values'}")
        owned = sorted(k for k in mapping if str(k).replace("-", "_") in _CELL_OWNED)
        if owned:
            raise _fail(source, f"'{key}' sets {', '.join(owned)}, which the sweep decides per cell (use tasks, "
                                "methods and seeds)")
    grid = {k: _list(v, source, f"grid.{k}") for k, v in grid.items()}
    backend = values.get("backend", "local")
    if backend not in ("local", "slurm"):
        raise _fail(source, f"backend {backend!r} is not one of local, slurm")
    workers = values.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise _fail(source, f"'workers' must be a positive integer, got {workers!r}")
    out, data = values["out"], values.get("data")
    if base_dir is not None:          # paths in a file are relative to the file
        out = os.path.join(base_dir, os.path.expanduser(str(out)))
        data = os.path.join(base_dir, os.path.expanduser(str(data))) if data else None
    return SweepSpec(out=os.path.abspath(str(out)), tasks=_list(values["tasks"], source, "tasks"),
                     methods=_list(values["methods"], source, "methods"), seeds=seeds, grid=grid,
                     options=dict(options), data=os.path.abspath(data) if data else None, backend=backend,
                     workers=workers, slurm=_slurm(values.get("slurm"), source), source=source)


def read_sweep_file(path: str) -> SweepSpec:
    """Parse the sweep file at ``path`` (YAML or JSON)."""
    if not os.path.isfile(path):
        raise TokenTuneError(f"sweep file {path!r} does not exist")
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise TokenTuneError(f"sweep file {path} is not valid YAML{line}: "
                             f"{' '.join(str(getattr(exc, 'problem', exc)).split())}") from None
    return parse_sweep(values, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


# ----------------------------------------------------------------------------- cells
def _tasks(spec: SweepSpec) -> List[Dict[str, Any]]:
    """Each task entry as ``{"name": ..., **train options}``, groups expanded, in order, without repeats."""
    found: Dict[str, Dict[str, Any]] = {}
    for entry in spec.tasks:
        if isinstance(entry, dict):
            entry = {str(k).replace("-", "_"): v for k, v in entry.items()}
            if not entry.get("name"):
                raise _fail(spec.source, f"task entry {entry!r} needs a name")
            if not any(k in entry for k in ("image_folder", "data", "dataset", "task")):
                raise _fail(spec.source, f"task {entry['name']!r}: say where its data is (image_folder: DIR, or "
                                         "data: ROOT with dataset: NAME)")
            found[str(entry["name"])] = entry
            continue
        name = str(entry).strip()
        names = TASK_GROUPS.get(name.lower())
        if names is None:
            try:
                names = [vtab_task(name).name]
            except TokenTuneError:
                groups = ", ".join(TASK_GROUPS)
                raise _fail(spec.source, f"unknown task {name!r}; use a VTAB-1k task name, a group ({groups}) or a "
                                         "mapping {name: ..., image_folder: DIR}") from None
        for task in names:
            if spec.data is None and "data" not in spec.options:
                raise _fail(spec.source, f"task {task!r} is a VTAB-1k name: set 'data' to the VTAB-1k root")
            found.setdefault(task, {"name": task, "dataset": task})
    return list(found.values())


def _methods(spec: SweepSpec) -> List[Dict[str, Any]]:
    """Each method entry as ``{"label": ..., "options": {...}}`` (a recipe's name or the method spec)."""
    out = []
    for entry in spec.methods:
        if isinstance(entry, str) and entry.startswith("recipe:"):
            entry = {"recipe": entry.split(":", 1)[1]}
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or not (("method" in entry) ^ ("recipe" in entry)):
            raise _fail(spec.source, f"method entry {entry!r}: give a method spec ('lora+tome'), 'recipe:NAME', or "
                                     "a mapping with exactly one of method/recipe (and optional label, options)")
        bad = sorted(set(entry) - {"method", "recipe", "label", "options"})
        if bad:
            raise _fail(spec.source, f"method entry {entry!r}: unknown key(s) {', '.join(bad)}")
        if "recipe" in entry:
            try:
                get_recipe(str(entry["recipe"]))
            except TokenTuneError as exc:
                raise _fail(spec.source, str(exc)) from None
        key = "recipe" if "recipe" in entry else "method"
        options = {key: str(entry[key]), **(entry.get("options") or {})}
        out.append({"label": str(entry.get("label") or entry[key]), "options": options})
    labels = [m["label"] for m in out]
    if len(set(labels)) != len(labels):
        raise _fail(spec.source, f"two method entries have the same label ({labels}); give each a distinct 'label'")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+=.,_-]+", "_", text).strip("_") or "x"


def expand_cells(spec: SweepSpec) -> List[Cell]:
    """Every cell of the sweep (tasks x methods x grid x seeds), in a stable order."""
    tasks, methods = _tasks(spec), _methods(spec)
    keys = list(spec.grid)
    combos = list(itertools.product(*(spec.grid[k] for k in keys))) or [()]
    cells = []
    for task in tasks:
        for method in methods:
            for combo in combos:
                grid = dict(zip(keys, combo))
                label = method["label"] + "".join(f" {k}={v}" for k, v in grid.items())
                for seed in spec.seeds:
                    options = dict(spec.options)
                    if spec.data is not None and "dataset" in task and "data" not in task:
                        options["data"] = spec.data
                    options.update({k: v for k, v in task.items() if k != "name"})
                    options.update(method["options"])
                    options.update(grid)
                    options.update(seed=seed, label=label)
                    name = os.path.join(_slug(task["name"]), _slug(label), f"seed{seed}")
                    cells.append(Cell(name=name, task=task["name"], label=label, seed=seed, options=options,
                                      run_dir=os.path.join(spec.out, name)))
    return cells


def check_cells(cells: Sequence[Cell], check: Callable[[Dict[str, Any], str], None], source: str) -> None:
    """Check every distinct option set with ``check(options, where)`` (the train command's own checks)."""
    seen = set()
    for cell in cells:
        key = yaml.safe_dump({k: v for k, v in cell.options.items() if k not in ("seed", "label")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            check(cell.options, f"{source}: cell {cell.name}")
