"""What `tokentune sweep` adds per cell over running `tokentune train` for that cell directly.

Both sides run the same cells (tiny VTAB-layout folders, a tiny ViT, 1 epoch) one at a time, in
alternation (direct, sweep, direct, sweep ...) so that machine load hits both alike; the sweep's
time per cell includes its controller (parsing and checking the file, locks, markers, the table).

Each round also splits the time into phases from the files' modification times (no
instrumentation): for the direct runs, process start to ``results.json`` and ``results.json`` to
the process's exit; for the sweep, its start-up and checks (start to the first cell's config file),
each cell's process (its config file to its ``results.json``), from there to the cell's ``done``
marker (the cell's exit and the controller noticing it), from a marker to the next cell's config
file (starting the next cell), and the table at the end.

``--compare-src DIR`` times, in the same rounds, the sweep of another checkout's ``src`` folder as
well (e.g. ``git archive COMMIT src | tar -x -C DIR``), so that two controllers are compared side by side.

    python benchmarks/sweep_overhead.py --cells 4 --rounds 2
    python benchmarks/sweep_overhead.py --cells 8 --rounds 2 --compare-src /tmp/old/src
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import yaml
from PIL import Image

TINY = {"model": "vit_tiny_patch16_224", "pretrained": "none",
        "timm": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}, "image_size": 32,
        "num_workers": 0, "batch_size": 4, "warmup_epochs": 0, "epochs": 1, "eval_batch_size": 8}
TASKS = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "eurosat"]
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def make_vtab(root: str, task: str, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split in ("train800val200", "test"):
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            os.makedirs(os.path.join(root, task, "images", split), exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(os.path.join(root, task, rel))
            lines.append(f"{rel} {i % 2}")
        with open(os.path.join(root, task, f"{split}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


def _mtime(path: str) -> float:
    return os.stat(path).st_mtime


def _cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: less sensitive to machine load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_direct(tmp: str, data: str, tasks: List[str], tag: str, env: Dict[str, str]) -> Dict[str, float]:
    """Each cell by ``tokentune train``; seconds per cell, split into start-to-results and results-to-exit."""
    to_results, to_exit = [], []
    t0, cpu0 = time.time(), _cpu()
    for task in tasks:
        cfg = os.path.join(tmp, f"{tag}-{task}.yaml")
        with open(cfg, "w") as fh:
            yaml.safe_dump(dict(TINY, data=data, dataset=task, method="lora", seed=0), fh)
        out = os.path.join(tmp, tag, task)
        start = time.time()
        subprocess.run([sys.executable, "-m", "tokentune", "train", "--config", cfg, "--out", out, "--no-progress"],
                       env=env, check=True, capture_output=True)
        end = time.time()
        results = _mtime(os.path.join(out, "results.json"))
        to_results.append(results - start)
        to_exit.append(end - results)
    n = len(tasks)
    return {"s_per_cell": (time.time() - t0) / n, "cpu_s_per_cell": (_cpu() - cpu0) / n,
            "cell_start_to_results": sum(to_results) / n, "cell_results_to_exit": sum(to_exit) / n}


def run_sweep(tmp: str, data: str, tasks: List[str], tag: str, env: Dict[str, str]) -> Dict[str, float]:
    """The same cells by ``tokentune sweep``; seconds per cell and the phases (see the module docstring)."""
    out = os.path.join(tmp, tag)
    sweep_file = os.path.join(tmp, f"{tag}.yaml")
    with open(sweep_file, "w") as fh:
        yaml.safe_dump({"out": out, "data": data, "tasks": tasks, "methods": ["lora"], "seeds": [0], "options": TINY}, fh)
    start, cpu0 = time.time(), _cpu()
    subprocess.run([sys.executable, "-m", "tokentune", "sweep", sweep_file, "--no-progress"], env=env, check=True,
                   capture_output=True)
    end = time.time()
    flat = [os.path.join(task, "lora", "seed0") for task in tasks]
    configs = [_mtime(os.path.join(out, ".sweep", "cells", f.replace(os.sep, "__") + ".yaml")) for f in flat]
    results = [_mtime(os.path.join(out, f, "results.json")) for f in flat]
    done = [_mtime(os.path.join(out, ".sweep", "done", f.replace(os.sep, "__"))) for f in flat]
    table = max(_mtime(p) for p in glob.glob(os.path.join(out, "sweep.*")))
    n = len(tasks)
    return {"s_per_cell": (end - start) / n, "cpu_s_per_cell": (_cpu() - cpu0) / n, "startup_and_checks_s": configs[0] - start,
            "cell_start_to_results": sum(r - c for r, c in zip(results, configs)) / n,
            "cell_results_to_done_marker": sum(d - r for d, r in zip(done, results)) / n,
            "done_marker_to_next_start": sum(c - d for c, d in zip(configs[1:], done[:-1])) / max(1, n - 1),
            "table_and_exit_s": end - done[-1], "table_written_s": table - done[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=6, help="cells per side and round (tasks; at most 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare-src", default=None, metavar="DIR",
                        help="also time the sweep of this checkout's src folder in every round")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "sweep_overhead.json"))
    args = parser.parse_args()
    tasks = TASKS[:args.cells]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC)
    other: Optional[Dict[str, str]] = None
    if args.compare_src:
        other = dict(env, PYTHONPATH=os.path.abspath(args.compare_src))
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "vtab")
        for task in tasks:
            make_vtab(data, task)
        for r in range(args.rounds):
            row = {"load_before": os.getloadavg()[0], "direct": run_direct(tmp, data, tasks, f"direct-{r}", env),
                   "sweep": run_sweep(tmp, data, tasks, f"sweep-{r}", env)}
            if other is not None:
                row["sweep_compared"] = run_sweep(tmp, data, tasks, f"compared-{r}", other)
            rounds.append(row)
            text = ", ".join(f"{k} {v['s_per_cell']:.2f} s/cell ({v['s_per_cell'] - row['direct']['s_per_cell']:+.2f})"
                             for k, v in row.items() if isinstance(v, dict) and k != "direct")
            print(f"round {r + 1}: direct {row['direct']['s_per_cell']:.2f} s/cell, {text}", flush=True)
            for k, v in row.items():
                if isinstance(v, dict):
                    print(f"  {k}: " + ", ".join(f"{p} {x:.2f}" for p, x in v.items() if p != "s_per_cell"), flush=True)
    overhead = [row["sweep"]["s_per_cell"] - row["direct"]["s_per_cell"] for row in rounds]
    cpu = [row["sweep"]["cpu_s_per_cell"] - row["direct"]["cpu_s_per_cell"] for row in rounds]
    result = {"cells": len(tasks), "rounds": rounds, "overhead_s_per_cell": overhead, "overhead_cpu_s_per_cell": cpu,
              "overhead_s_per_cell_median": statistics.median(overhead),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load": os.getloadavg()}
    if other is not None:
        result["compared_src"] = os.path.abspath(args.compare_src)
        result["compared_overhead_s_per_cell"] = [row["sweep_compared"]["s_per_cell"] - row["direct"]["s_per_cell"]
                                                  for row in rounds]
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
