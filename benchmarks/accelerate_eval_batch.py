"""Evaluation throughput of ViT-B/16 at 224 per evaluation batch size (``tokentune accelerate``'s
``eval_batch_size``): the same images through :func:`tokentune.evaluate` (the in-memory slices
accelerate evaluates with) at each batch size, in interleaved repetitions in one process, so the
ratios are comparable. Random weights and images; ``--depth`` blocks of ViT-B/16 (2 by default,
to keep it short: every block is the same computation, so the per-image cost of a block at a batch
size does not depend on how many there are; ``--depth 12`` for the whole model).

    python benchmarks/accelerate_eval_batch.py --threads 2              # batch 16, 32, 64, 256; 3 repetitions
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import tokentune
from tokentune.tools.measure import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batches", default="16,32,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tokentune.deploy(tokentune.create_model("vit_base_patch16_224", method="linear", num_classes=10,
                                                    pretrained=False, depth=args.depth)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(args.images, 3, 224, 224), torch.randint(0, 10, (args.images,)))
    sizes = [int(b) for b in args.batches.split(",")]
    tokentune.evaluate(model, torch.utils.data.Subset(data, range(min(sizes))), batch_size=min(sizes), progress=False)
    seconds = {b: [] for b in sizes}
    load = [os.getloadavg()]
    for r in range(args.repeats):
        for b in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:          # the order rotates
            t0 = time.perf_counter()
            tokentune.evaluate(model, data, batch_size=b, progress=False)
            seconds[b].append(time.perf_counter() - t0)
    load.append(os.getloadavg())
    ref = statistics.median(seconds[max(sizes)])
    rows = {b: {"img_s": args.images / statistics.median(s), "seconds": s,
                "vs_largest": ref / statistics.median(s)} for b, s in seconds.items()}
    for b, row in rows.items():
        print(f"batch {b:4d}: {row['img_s']:.2f} img/s (median of {args.repeats}; "
              f"{min(s := seconds[b]):.1f}-{max(s):.1f} s per {args.images} images), "
              f"{row['vs_largest']:.3f}x batch {max(sizes)}")
    out = {"environment": dict(environment("cpu"), load_average=load), "depth": args.depth, "images": args.images,
           "repeats": args.repeats, "rows": rows}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "accelerate_eval_batch.json"), "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
