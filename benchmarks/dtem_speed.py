"""Deployed LoRA + DTEM beside LoRA + ToMe and the dense model, ViT-B/16, 224 px, fp32, one process.

Rows: the dense model (LoRA merged: timm's ViT with fused SDPA), ToMe "low" (8.77 GMACs), DTEM on
the same schedule (ToMe's token counts, plus the embedding's cost), DTEM at ToMe low's GMACs
(``dtem_r="flops:2.002"``), ToMe "high" (5.07 GMACs) and DTEM at ToMe high's GMACs
(``"flops:3.463"``). Random weights (speed does not depend on them). Every model is timed in
interleaved rounds on the same random batch (:func:`tokentune.timing.measure_throughput`), at
batch 16 and at batch 1; GMACs from the analytic model (:mod:`tokentune.methods.tome.flops`, the
embedding included; ``tokentune bench`` counts the same with torch's FLOP counter).

    python benchmarks/dtem_speed.py --threads 2 --rounds 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

import tokentune
from tokentune.methods.tome import ViTDims, vit_flops
from tokentune.timing import measure_throughput

ROWS = {   # label -> (method, options)
    "LoRA (merged)": ("lora", {}),
    "LoRA + ToMe low": ("lora+tome", {"tome_r": "low"}),
    "LoRA + DTEM low (ToMe's tokens)": ("lora+dtem", {"dtem_r": "low"}),
    "LoRA + DTEM flops:2.002 (ToMe low's GMACs)": ("lora+dtem", {"dtem_r": "flops:2.002"}),
    "LoRA + ToMe high": ("lora+tome", {"tome_r": "high"}),
    "LoRA + DTEM flops:3.463 (ToMe high's GMACs)": ("lora+dtem", {"dtem_r": "flops:3.463"}),
}


def gmacs(model, method: str) -> float:
    dims = ViTDims.from_model(model)
    if "dtem" in method:
        feat = next(b.merge.embed.out_features for b in model.blocks if b.merge is not None)
        dims = dataclasses.replace(dims, metric_dim=feat, metric_macs=dims.dim * feat)
        return vit_flops(dims, model.tokentune.state["dtem"]) / 2e9
    return vit_flops(dims, model.tokentune.state.get("tome") or []) / 2e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, macs = {}, {}
    for label, (method, options) in ROWS.items():
        torch.manual_seed(0)
        model = tokentune.create_model("vit_base_patch16_224", method=method, num_classes=100, pretrained=False,
                                       **options)
        macs[label] = gmacs(model, method)
        models[label] = tokentune.deploy(model)
    warm = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():                                            # weights paged in, cheaply
        for model in models.values():
            model(warm)
    results = {}
    for batch, rounds in ((16, args.rounds), (1, args.latency_rounds)):
        stats = measure_throughput(models, batch_size=batch, rounds=rounds, warmup=0,
                                   progress=lambda d, n, b=batch: print(f"batch {b}: round {d}/{n}", flush=True))
        base = stats["LoRA (merged)"].median
        results[batch] = {label: (s.median, s.median / base) for label, s in stats.items()}
    dense = macs["LoRA (merged)"]
    print("| model | GMACs | FLOPs ratio | batch 16: img/s, speed-up (÷ FLOPs ratio) | batch 1: img/s, speed-up |")
    print("|---|---|---|---|---|")
    for label in ROWS:
        ratio = dense / macs[label]
        (b16, s16), (b1, s1) = results[16][label], results[1][label]
        print(f"| {label} | {macs[label]:.2f} | {ratio:.2f}x | {b16:.2f}, {s16:.2f}x ({s16 / ratio:.2f}) | "
              f"{b1:.2f}, {s1:.2f}x |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"gmacs": macs, "img_per_s": {str(b): {k: v[0] for k, v in r.items()} for b, r in results.items()},
                       "threads": args.threads, "rounds": args.rounds}, f, indent=1)


if __name__ == "__main__":
    main()
