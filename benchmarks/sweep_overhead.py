"""What `tokentune sweep` adds per cell over running `tokentune train` for that cell directly.

Both sides run the same cells (tiny VTAB-layout folders, a tiny ViT, 1 epoch) one at a time, in
alternation (direct, sweep, direct, sweep ...) so that machine load hits both alike; the sweep's
time per cell includes its controller (parsing and checking the file, locks, markers, the table).

    python benchmarks/sweep_overhead.py --cells 6 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml
from PIL import Image

TINY = {"model": "vit_tiny_patch16_224", "pretrained": "none",
        "timm": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}, "image_size": 32,
        "num_workers": 0, "batch_size": 4, "warmup_epochs": 0, "epochs": 1, "eval_batch_size": 8}
TASKS = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "eurosat"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=6, help="cells per side and round (tasks; at most 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "sweep_overhead.json"))
    args = parser.parse_args()
    tasks = TASKS[:args.cells]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    direct, swept = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "vtab")
        for task in tasks:
            make_vtab(data, task)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for task in tasks:
                cfg = os.path.join(tmp, f"direct-{r}-{task}.yaml")
                with open(cfg, "w") as fh:
                    yaml.safe_dump(dict(TINY, data=data, dataset=task, method="lora", seed=0), fh)
                subprocess.run([sys.executable, "-m", "tokentune", "train", "--config", cfg, "--out",
                                os.path.join(tmp, f"direct-{r}", task), "--no-progress"], env=env, check=True,
                               capture_output=True)
            direct.append((time.perf_counter() - t0) / len(tasks))
            sweep_file = os.path.join(tmp, f"sweep-{r}.yaml")
            with open(sweep_file, "w") as fh:
                yaml.safe_dump({"out": os.path.join(tmp, f"sweep-{r}"), "data": data, "tasks": tasks,
                                "methods": ["lora"], "seeds": [0], "options": TINY}, fh)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tokentune", "sweep", sweep_file, "--no-progress"], env=env,
                           check=True, capture_output=True)
            swept.append((time.perf_counter() - t0) / len(tasks))
            print(f"round {r + 1}: direct {direct[-1]:.2f} s/cell, sweep {swept[-1]:.2f} s/cell, "
                  f"overhead {swept[-1] - direct[-1]:+.2f} s/cell", flush=True)
    result = {"cells": len(tasks), "rounds": args.rounds, "direct_s_per_cell": direct, "sweep_s_per_cell": swept,
              "overhead_s_per_cell_median": statistics.median(s - d for s, d in zip(swept, direct)),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load": os.getloadavg()}
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
