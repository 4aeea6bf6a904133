"""Which settings give the GFLOPs of DyT's Table 5 token-reduction rows (ViT-B/16, 224)?

DyT's Table 5 quotes DynamicViT at 14.05 GFLOPs, DynamicViT + AdaptFormer at 14.23, EViT at 11.62,
EViT + AdaptFormer at 11.77 and AdaptFormer + ToMe (r=8) at 13.29; DynamicViT's reference default
(rho = 0.7, stages before blocks 3/6/9) gives 11.48 GMACs with our counter. This script counts the
deployed models (``tokentune.core.flops.count_flops``: torch's FLOP counter, attention included,
divided by 2: GMACs, the papers' GFLOPs) under candidate settings: DynamicViT's keep schedules
(rho^k for several rho; the list 0.9/0.7/0.5, which is what the reference's ``--base_rate 0.9``
default gives through its ``SPARSE_RATIO = [base_rate, base_rate - 0.2, base_rate - 0.4]``, the
schedule its ConvNeXt and Swin models prune with), and AdaptFormer adapters of bottleneck 8 (the
table's 0.16M trainable parameters) and 64 (the DyT code's default ``ffn_num=64``).

Prints a markdown table and writes benchmarks/results/dyt_table5_flops.md (about a minute on a CPU).

    python benchmarks/dyt_table5_flops.py
    python benchmarks/dyt_table5_flops.py --quick     # tiny width, seconds (checks the script)
"""
from __future__ import annotations

import argparse
import os

import torch

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.fileio import atomic_write_text

# DyT's Table 5 (GFLOPs): the rows this script looks for
PAPER = {"DynamicViT": 14.05, "DynamicViT + AdaptFormer": 14.23, "EViT": 11.62, "EViT + AdaptFormer": 11.77,
         "AdaptFormer + ToMe": 13.29}

# (paper row, setting, method, options)
ROWS = [
    ("DynamicViT", "rho 0.7 (reference default for DeiT: 0.7, 0.49, 0.343)", "dynamicvit", dict(dynamicvit_keep_rate=0.7)),
    ("DynamicViT", "rho 0.8", "dynamicvit", dict(dynamicvit_keep_rate=0.8)),
    ("DynamicViT", "rho 0.9 (0.9, 0.81, 0.729)", "dynamicvit", dict(dynamicvit_keep_rate=0.9)),
    ("DynamicViT", "keep 0.9, 0.7, 0.5", "dynamicvit", dict(dynamicvit_keep_rates=[0.9, 0.7, 0.5])),
    ("DynamicViT + AdaptFormer", "rho 0.7, bottleneck 8", "adapter+dynamicvit",
     dict(dynamicvit_keep_rate=0.7, adapter_bottleneck=8)),
    ("DynamicViT + AdaptFormer", "keep 0.9, 0.7, 0.5, bottleneck 8", "adapter+dynamicvit",
     dict(dynamicvit_keep_rates=[0.9, 0.7, 0.5], adapter_bottleneck=8)),
    ("DynamicViT + AdaptFormer", "keep 0.9, 0.7, 0.5, bottleneck 64", "adapter+dynamicvit",
     dict(dynamicvit_keep_rates=[0.9, 0.7, 0.5], adapter_bottleneck=64)),
    ("EViT", "keep 0.7", "evit", dict(evit_keep_rate=0.7)),
    ("EViT + AdaptFormer", "keep 0.7, bottleneck 8", "adapter+evit", dict(evit_keep_rate=0.7, adapter_bottleneck=8)),
    ("EViT + AdaptFormer", "keep 0.7, bottleneck 64", "adapter+evit", dict(evit_keep_rate=0.7, adapter_bottleneck=64)),
    ("AdaptFormer + ToMe", "r=8, bottleneck 8", "adapter+tome", dict(tome_r=8, adapter_bottleneck=8)),
    ("AdaptFormer + ToMe", "r=8, bottleneck 64", "adapter+tome", dict(tome_r=8, adapter_bottleneck=64)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny width (checks the script; numbers meaningless)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "dyt_table5_flops.md"))
    args = parser.parse_args()
    kw = dict(embed_dim=64, num_heads=2) if args.quick else {}
    images = torch.randn(1, 3, 224, 224)
    lines = ["| DyT Table 5 row | setting | tokens after the last block | GMACs (ours) | paper GFLOPs |",
             "|---|---|---|---|---|"]
    for row, setting, method, options in ROWS:
        torch.manual_seed(0)
        model = deploy(create_model("vit_base_patch16_224", method=method, num_classes=100, pretrained=False,
                                    **kw, **options))
        with torch.no_grad():
            tokens = model(images, return_tokens=True)[1].shape[1]
            gmacs = count_flops(model, images) / 2 / 1e9
        lines.append(f"| {row} | {setting} | {tokens} | {gmacs:.2f} | {PAPER[row]:.2f} |")
        print(lines[-1], flush=True)
    if not args.quick:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
