"""The small costs inside ``tokentune accelerate``'s phases, measured without a whole search.

1. **Evaluation data path**: ``--images`` in-memory validation images at 224 (a ``TensorDataset``,
   as accelerate holds them) at batch ``--eval-batch``, evaluated with a near-free model (average
   pool + linear) so that only the data path counts: through a DataLoader (the path of any other
   dataset; here a ``Subset`` of the same tensors) vs the slices :func:`tokentune.evaluate` now
   reads a ``TensorDataset`` in. Interleaved rounds.
2. **Build and FLOPs count** of one ViT-B/16 candidate per training-free method at ``flops:1.5``
   (what a trial builds; before, its evaluation built it a second time), and the one-image FLOPs
   count of each.

    python benchmarks/accelerate_overheads.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from tokentune import create_model
from tokentune.engine.evaluate import evaluate
from tokentune.tools import accelerate as acc
from tokentune.tools.measure import environment


def data_path(images: int, batch: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tensors = torch.utils.data.TensorDataset(torch.randn(images, 3, 224, 224, generator=g),
                                             torch.randint(0, 10, (images,), generator=g))
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    seconds = {"dataloader": [], "slices": []}
    for _ in range(rounds):
        for name, data in (("dataloader", torch.utils.data.Subset(tensors, range(images))), ("slices", tensors)):
            t0 = time.perf_counter()
            evaluate(model, data, batch_size=batch, progress=False, device="cpu", amp="off")
            seconds[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "rounds_s": v} for k, v in seconds.items()}


def builds() -> dict:
    source = acc.open_source(create_model("vit_base_patch16_224", method="linear", num_classes=10, pretrained=False,
                                          seed=0))
    base = acc.deployed_base(source)
    image = torch.randn(1, 3, 224, 224)
    out = {}
    for method in acc.candidate_methods(source.spec):
        t0 = time.perf_counter()
        model = acc.build_candidate(source, base, method, "flops:1.5")
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        gmacs = acc.gmacs_of(model, image)
        out[method] = {"build_s": built, "flops_count_s": time.perf_counter() - t0, "gmacs": gmacs}
        del model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {"environment": dict(environment("cpu"), load_average_start=list(os.getloadavg())),
              "images": args.images, "eval_batch": args.eval_batch, "threads": args.threads,
              "evaluation_data_path": data_path(args.images, args.eval_batch, args.rounds), "vit_b_candidates": builds()}
    record["environment"]["load_average_end"] = list(os.getloadavg())
    print(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
