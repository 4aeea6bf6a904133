"""How much of a measured speed-up is the C allocator: glibc's default versus the steady allocator.

glibc returns a freed block above its (dynamic, at most 32 MiB) mmap threshold to the operating
system, so each forward that allocates such an activation faults its pages in again; the dense
model allocates the largest activations and pays the most. Each case is timed in several NEW
processes per allocator (``system``: glibc as it comes; ``steady``:
:func:`tokentune.timing.steady_allocator`), the dense model and its ToMe candidates side by side
in interleaved rounds in every process; the table gives each process's speed-ups, the spread of
the dense model's speed across processes and the page faults per forward.

    python benchmarks/allocator_effect.py --processes 3        # ViT-B/16 batch 16 (2 threads), demo tiny ViT batch 256 (1 thread)

Writes benchmarks/results/allocator_effect.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

import tokentune
from tokentune.timing import measure_throughput, random_images
from tokentune.tools.measure import environment

CASES = {
    # name: (model, kwargs, ToMe candidates, batch, threads, image size)
    "vit_b16_b16": ("vit_base_patch16_224", {}, {"tome low": "low", "tome high": "high"}, 16, 2, 224),
    "demo_tiny_b256": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                                 global_pool="avg"),
                       {"tome r=13": 13}, 256, 1, 32),
}


def child(case: str, allocator: str, rounds: int) -> dict:
    name, kwargs, candidates, batch, threads, size = CASES[case]
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    models = {"dense": tokentune.deploy(tokentune.create_model(name, method="lora", num_classes=10, **kwargs))}
    for label, r in candidates.items():
        models[label] = tokentune.deploy(tokentune.create_model(name, method="lora+tome", tome_r=r, num_classes=10,
                                                                **kwargs))
    images = random_images(batch, size, 0)
    stats = measure_throughput(models, images=images, rounds=rounds, warmup=2, min_block_s=1.0, allocator=allocator)
    faults = {}
    with torch.inference_mode():
        for label, model in models.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(2):
                model(images)
            faults[label] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2
    env = environment()
    return {"img_s": {k: v.median for k, v in stats.items()}, "low": {k: v.low for k, v in stats.items()},
            "high": {k: v.high for k, v in stats.items()}, "faults_per_forward": faults,
            "allocator": env["allocator"], "device": env["device"], "threads": threads, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], args.rounds)))
        return
    runs = []
    for case in args.cases.split(","):
        for i in range(args.processes):
            for allocator in ("system", "steady") if i % 2 == 0 else ("steady", "system"):
                out = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--child", case, allocator],
                                     capture_output=True, text=True, check=True).stdout
                run = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
                run.update(case=case, process=i + 1, requested=allocator)
                runs.append(run)
                speed = {k: v / run["img_s"]["dense"] for k, v in run["img_s"].items() if k != "dense"}
                print(f"{case} process {i + 1} {allocator}: dense {run['img_s']['dense']:.1f} img/s, "
                      + ", ".join(f"{k} {v:.3f}x" for k, v in speed.items())
                      + f"; faults/forward {run['faults_per_forward']}", flush=True)
    lines = ["| case | allocator | dense img/s per process | speed-ups per process | dense spread across "
             "processes | page faults per forward (dense / candidates) |", "|---|---|---|---|---|---|"]
    for case in args.cases.split(","):
        for allocator in ("system", "steady"):
            rs = [r for r in runs if r["case"] == case and r["requested"] == allocator]
            dense = [r["img_s"]["dense"] for r in rs]
            labels = [k for k in rs[0]["img_s"] if k != "dense"]
            speed = "; ".join(f"{k}: " + ", ".join(f"{r['img_s'][k] / r['img_s']['dense']:.3f}" for r in rs)
                              for k in labels)
            faults = " / ".join(f"{statistics.median(r['faults_per_forward'][k] for r in rs):,.0f}"
                                for k in ["dense"] + labels)
            lines.append(f"| {case} | {allocator} | {', '.join(f'{d:.1f}' for d in dense)} | {speed} | "
                         f"{(max(dense) / min(dense) - 1) * 100:.1f}% | {faults} |")
    table = "\n".join(lines)
    print(table)
    prefix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "allocator_effect")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".json", "w") as fh:
        json.dump({"runs": runs, "rounds": args.rounds, "load_average": os.getloadavg()}, fh, indent=1)
    with open(prefix + ".md", "w") as fh:
        fh.write(f"{runs[0]['device']}, fp32, {args.rounds} interleaved rounds per process\n\n{table}\n")


if __name__ == "__main__":
    main()
