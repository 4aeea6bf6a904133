"""Where ToMe's time goes at a high merge rate, beside the dense model: each operator class's share of
the forward and the multiply-adds per second it runs at.

The speed-up of a token reducer falls short of its FLOPs ratio for two reasons that look alike in a
timing: work the FLOPs count leaves out (the matching, the index copies of the merge, the
element-wise operators) and operators that run at a lower rate on fewer tokens (smaller matrix
products). This script separates them with ``torch.profiler`` (self CPU time per operator) and
``torch.utils.flop_counter`` (multiply-adds per operator on the same forward), for the dense ViT-B/16
and ToMe (or another reducer: ``--method``) at a target (default: ToMe high's FLOPs,
``flops:3.462:geometric``), both deployed, random weights, fp32, one process. Operator classes:
matrix products (``aten::addmm``, the Linear layers), attention (the SDPA kernel), the patch
embedding (the convolution), "merging" (every operator the dense model does not call: the
reducer's matching and merge), and everything else (GELU, LayerNorm, the
residual additions, copies). Profiling adds a little time to every operator call, which weighs
more on the model with more, smaller calls (ToMe), so read the shares, not the sum, as ToMe's cost.

Prints a markdown table and writes benchmarks/results/tome_high_profile[_TAG].{md,json}.

    python benchmarks/tome_high_profile.py                        # ViT-B/16, batch 16, 2 threads
    python benchmarks/tome_high_profile.py --target flops:2.001   # ToMe low's FLOPs
    python benchmarks/tome_high_profile.py --model deit_tiny_patch16_224 --method pitome --target flops:1.586
    python benchmarks/tome_high_profile.py --quick                # tiny width (checks the script)
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from tokentune import create_model, deploy
from tokentune.core.flops import _register_cpu_attention_flops
from tokentune.core.method import get_method
from tokentune.timing import apply_allocator, random_images
from tokentune.tools import measure as measure_env

CLASSES = ("matrix products", "attention", "patch embedding", "merging", "other")


def op_class(name: str, dense_ops: set) -> str:
    if name in ("aten::addmm", "aten::mm"):
        return "matrix products"
    if "scaled_dot_product" in name:
        return "attention"
    if "convolution" in name:
        return "patch embedding"
    if dense_ops and name not in dense_ops:
        return "merging"
    return "other"


def profile_model(model: torch.nn.Module, images: torch.Tensor, iters: int) -> Dict[str, float]:
    """Self CPU seconds per forward of every operator."""
    with torch.inference_mode():
        for _ in range(2):
            model(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(images)
    return {e.key: e.self_cpu_time_total / 1e6 / iters for e in prof.key_averages()}


def macs_by_class(model: torch.nn.Module, images: torch.Tensor, dense_ops: set) -> Dict[str, float]:
    """Multiply-adds per forward of each operator class (as :func:`tokentune.core.flops.count_flops`
    counts them, the CPU's SDPA kernel included)."""
    _register_cpu_attention_flops()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    out: Dict[str, float] = defaultdict(float)
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = "aten::" + str(op).split(".")[1]             # aten.addmm -> aten::addmm, the profiler's name
        out[op_class(name, dense_ops)] += flops / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--target", default="flops:3.462:geometric", help="the method's rate (e.g. tome_r)")
    ap.add_argument("--method", default="tome", help="a training-free token reducer with a rate option "
                    "(tome, pitome, tofu, ...)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="profiled forwards per model (after 2 warm-up ones)")
    ap.add_argument("--quick", action="store_true", help="tiny width, 1 forward: checks the script runs")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    apply_allocator()
    kw = dict(embed_dim=64, num_heads=2) if args.quick else {}
    iters = 1 if args.quick else args.iters
    images = random_images(args.batch_size, 224)
    models = {}
    option = f"{args.method}_{get_method(args.method).rate_option}"
    for label, method, opts in [("dense", "linear", {}), (f"{args.method} {args.target}", args.method, {option: args.target})]:
        torch.manual_seed(0)
        models[label] = deploy(create_model(args.model, method=method, num_classes=1000, **kw, **opts).eval())
    times = {label: profile_model(m, images, iters) for label, m in models.items()}
    dense_ops = {k for k, v in times["dense"].items() if v > 0}
    macs = {label: macs_by_class(m, images, dense_ops if label != "dense" else set()) for label, m in models.items()}
    rows, share = [], {}
    for label in models:
        by_class: Dict[str, float] = defaultdict(float)
        for name, seconds in times[label].items():
            by_class[op_class(name, dense_ops if label != "dense" else set())] += seconds
        total = sum(by_class.values())
        share[label] = by_class
        for cls in CLASSES:
            if cls == "merging" and label == "dense":
                continue
            rate = macs[label].get(cls, 0.0) / by_class[cls] / 1e9 if by_class[cls] and macs[label].get(cls) else None
            rows.append({"model": label, "operators": cls, "s per forward": round(by_class[cls], 4),
                         "share": f"{100 * by_class[cls] / total:.1f}%",
                         "GMACs per forward": round(macs[label].get(cls, 0.0) / 1e9, 2) if cls in macs[label] else "",
                         "GMAC/s": round(rate, 1) if rate else ""})
        rows.append({"model": label, "operators": "total", "s per forward": round(total, 4), "share": "100%",
                     "GMACs per forward": round(sum(macs[label].values()) / 1e9, 2), "GMAC/s": ""})
    labels = list(models)
    dense_total, tome_total = (sum(share[n].values()) for n in labels)
    flops_ratio = sum(macs[labels[0]].values()) / sum(macs[labels[1]].values())
    env = measure_env.environment(torch.device("cpu"), "fp32")
    title = (f"Operator classes of the dense model and {args.method} ({args.target}): {args.model}, batch {args.batch_size}, "
             f"{torch.get_num_threads()} threads, fp32, {iters} profiled forwards each" + (" [QUICK]" if args.quick else ""))
    name = "tome_high_profile" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    print(measure_env.write_results(os.path.join(args.out, name), rows, env, list(rows[0]), title,
                                    note=f"FLOPs ratio {flops_ratio:.3f}; profiled time ratio {dense_total / tome_total:.3f} "
                                         f"({dense_total / tome_total / flops_ratio:.3f} of the FLOPs ratio)."))


if __name__ == "__main__":
    main()
