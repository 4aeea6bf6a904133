"""LoRA + DTEM against LoRA + ToMe on the offline demo's digits, over seeds (mean ± std).

Both rows of ``tokentune demo --rows all`` (the same backbone pre-trained on digits 0-4, the same
schedule ``tome_r`` = 16, 12, 8, 6: 58% of the unreduced model's multiply-adds, 20 epochs of LoRA on
digits 5-9); each seed changes the new layers' initialisation and the training order, the data and
the backbone stay those of the demo's seed 0. Reports the deployed models' test top-1.

    python benchmarks/dtem_demo_seeds.py --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from tokentune.tools.demo import ROWS, DemoConfig, adapt, prepare_demo

LABELS = ("LoRA r=8 + ToMe", "LoRA r=8 + DTEM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = DemoConfig(threads=args.threads)
    rows = [next(r for r in ROWS if r.label == label) for label in LABELS]
    setup = prepare_demo(cfg, tempfile.mkdtemp(prefix="dtem-demo-"))
    results = {label: [] for label in LABELS}
    for seed in seeds:
        for row in rows:
            tic = time.perf_counter()
            done = adapt(setup, row, cfg, None, seed=seed)
            results[row.label].append(done.top1)
            print(f"seed {seed} {row.label}: top-1 {done.top1:.1f}% ({time.perf_counter() - tic:.0f} s)", flush=True)
    for label, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{label}: {statistics.mean(values):.1f} ± {std:.1f} (seeds {seeds}: {values})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seeds": seeds, "top1": results}, f, indent=1)


if __name__ == "__main__":
    main()
