"""How long ``tokentune accelerate`` takes on ViT-B/16 at 224 with every training-free candidate.

Random weights (speed does not depend on them; the accuracies are those of a random model, so only
the timing part is meaningful), a folder of ``--images`` random 224x224 images in 10 classes as
the validation data, target ``--target`` at ``--batch`` images per timed forward. Prints the
search's seconds per phase (its record's ``time``), how many evaluations, timed trials and builds
they were spent on, the seconds per evaluation and per trial, and what no phase accounts for; writes
benchmarks/results/accelerate_vitb.json (another ``--model``: accelerate_<model>_quick.json, not kept in git)
with every trial's FLOPs ratio and measured speed-up (``trial_rows``).

    python benchmarks/accelerate_vitb.py --workdir /tmp/accel-vitb            # 512 images, 1.5x, batch 32
    python benchmarks/accelerate_vitb.py --workdir /tmp/accel-tiny --model vit_tiny_patch16_224 --images 64
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

from tokentune import accelerate, create_model, save_trained
from tokentune.engine.data import image_folder_dataset
from tokentune.tools.measure import environment


def write_images(root: str, count: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, "test", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm ViT at 224 (a quick check: vit_tiny_patch16_224)")
    parser.add_argument("--evaluate", default="gentlest", choices=["gentlest", "within"])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="at most (tokentune accelerate's default)")
    parser.add_argument("--min-rounds", type=int, default=3, help="at least (tokentune accelerate's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-batch", type=int, default=None,
                        help="evaluation batch size [default: accelerate's, 32 on the CPU]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = os.path.join(args.workdir, "images")
    if not os.path.isdir(folder):
        write_images(folder, args.images)
    run_dir = os.path.join(args.workdir, args.model)
    if not os.path.isdir(run_dir):
        save_trained(create_model(args.model, method="linear", num_classes=10, pretrained=False, seed=0), run_dir)
    out = os.path.join(args.workdir, "accelerated")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = accelerate(run_dir, image_folder_dataset(folder, "test"), args.target, out, batch_size=args.batch,
                        rounds=args.rounds, min_rounds=args.min_rounds, threads=args.threads, evaluate=args.evaluate,
                        eval_batch_size=args.eval_batch)
    total = time.perf_counter() - t0
    spent = result.record["time"]
    counts = spent.get("counts", {})
    phases = {k: v for k, v in spent.items() if k != "counts"}
    record = {"environment": dict(environment("cpu"), load_average=list(os.getloadavg())), "model": args.model,
              "images": args.images, "target": args.target, "batch": args.batch, "rounds": args.rounds,
              "min_rounds": args.min_rounds,
              "evaluate": args.evaluate, "eval_batch": result.record["config"]["eval_batch_size"],
              "seconds": total, "time": spent, "choice": result.choice,
              "trials": {m: len(r["trials"]) for m, r in result.record["search"].items()},
              "trial_rows": {m: [{k: t.get(k) for k in ("rate", "flops_ratio", "speedup", "speedup_low", "speedup_high",
                                                         "top1")} for t in r["trials"]]
                             for m, r in result.record["search"].items()},
              "per_evaluation_s": phases.get("evaluation", 0.0) / max(counts.get("evaluation", 0), 1),
              "per_trial_s": phases.get("timing", 0.0) / max(counts.get("timing", 0), 1),
              "outside_phases_s": total - sum(phases.values())}
    print(json.dumps({k: record[k] for k in ("seconds", "time", "trials", "per_evaluation_s", "per_trial_s",
                                             "outside_phases_s")}, indent=1))
    print(f"{total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" + (f" ({counts[k]}x)" if counts.get(k) else "")
                                          for k, v in sorted(phases.items(), key=lambda kv: -kv[1])))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = "accelerate_vitb.json" if args.model == "vit_base_patch16_224" else f"accelerate_{args.model}_quick.json"
    with open(os.path.join(os.path.dirname(__file__), "results", name), "w") as fh:
        json.dump(record, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
