"""MCTF beside ToMe and the dense model on ViT-B/16, 224 px, fp32: deployed models (LoRA merged, random
weights), interleaved throughput at batch 16 and batch 1 in one process, at ToMe's "low" and "high"
FLOPs and at ToMe's token counts.

    python benchmarks/mctf_speed.py --threads 2 --rounds 3 --out benchmarks/results/mctf_speed.md
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import tokentune
from tokentune.methods.mctf import config_of, mctf_flops, resolve_rate
from tokentune.methods.tome import ViTDims, schedule_of, vit_flops
from tokentune.timing import measure_throughput

ALL = "0,1,2,3,4,5,6,7,8,9,10,11"
ROWS = [  # label, method spec, options, FLOPs partner (ToMe row at the same FLOPs or token counts)
    ("LoRA (dense)", "lora", {}, None),
    ("ToMe low", "lora+tome", {"tome_r": "low"}, None),
    ("MCTF at ToMe low's FLOPs", "lora+mctf", {"mctf_r": "flops:2.002"}, "ToMe low"),
    ("MCTF, ToMe low's r per block", "lora+mctf", {"mctf_r": [16] * 11 + [10], "mctf_layers": list(range(12))},
     "ToMe low"),
    ("ToMe high", "lora+tome", {"tome_r": "high"}, None),
    ("MCTF at ToMe high's FLOPs", "lora+mctf", {"mctf_r": "flops:3.46"}, "ToMe high"),
    ("MCTF, ToMe high's r per block", "lora+mctf",
     {"mctf_r": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3], "mctf_layers": list(range(12))}, "ToMe high"),
]


def gmacs(model, dims) -> float:
    if "mctf" in model.tokentune.state:
        return mctf_flops(dims, resolve_rate(model, config_of(model))) / 2e9
    return vit_flops(dims, schedule_of(model)) / 2e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    models, macs = {}, {}
    for label, spec, options, _ in ROWS:
        torch.manual_seed(0)
        model = tokentune.create_model("vit_base_patch16_224", method=spec, num_classes=100, pretrained=False,
                                       seed=0, **options)
        macs[label] = gmacs(model, ViTDims.from_model(model))
        models[label] = tokentune.deploy(model.eval())
    tic = time.perf_counter()
    b16 = measure_throughput(models, batch_size=16, rounds=args.rounds, warmup=1)
    b1 = measure_throughput(models, batch_size=1, rounds=args.rounds, warmup=1, iters_per_round=3)
    load1 = os.getloadavg()[0]
    dense = "LoRA (dense)"
    lines = [f"ViT-B/16, 224 px, fp32, {args.threads} threads, {platform.processor() or platform.machine()}, "
             f"{args.rounds} interleaved rounds after 1 warm-up (batch 1: 3 forwards per round), "
             f"1-min load {load0:.1f} before, {load1:.1f} after, {time.perf_counter() - tic:.0f} s",
             "", "| model | GMACs | FLOPs ratio | speed-up b16 (÷ FLOPs ratio) | img/s b16 (min-max) | speed-up b1 | "
             "time vs its ToMe row, b16 / b1 |", "|---|---|---|---|---|---|---|"]
    for label, _, _, partner in ROWS:
        ratio = macs[dense] / macs[label]
        s16 = b16[label].median / b16[dense].median
        s1 = b1[label].median / b1[dense].median
        vs = ""
        if partner:
            vs = (f"{b16[partner].median / b16[label].median - 1:+.1%} / "
                  f"{b1[partner].median / b1[label].median - 1:+.1%}")
        lines.append(f"| {label} | {macs[label]:.2f} | {ratio:.2f}x | {s16:.2f}x ({s16 / ratio:.2f}) | "
                     f"{b16[label].median:.2f} ({b16[label].low:.2f}-{b16[label].high:.2f}) | {s1:.2f}x | {vs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
