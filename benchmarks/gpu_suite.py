"""The GPU suite: every method at the papers' settings on ViT-B/16 and ViT-L/16, in one command.

For each backbone and each of fp16 and bf16 (autocast), batch 256, every row is deployed and timed
side by side with the plain timm model in one process (interleaved rounds, the same batch,
``torch.inference_mode``, CUDA synchronised around each timed block), with the peak memory of one
forward. Rows: LoRA (merged: the plain model), ToMe and PYRA at the reference "low"/"high"
schedules, DyT r=0.5 in its static-shape capacity execution, EViT, DynamicViT, DiffRate (preset
8.7 GMACs on ViT-B), and every registered training-free method with a rate at ToMe low's FLOPs
(asked through the registry). Then, in fp16, the static-shape rows again under ``torch.compile``
with CUDA graphs (``mode="reduce-overhead"``) against the plain model compiled the same way,
until the time budget runs out.

Writes ``benchmarks/results/gpu_suite_<device>.json`` and ``.md`` (the BENCHMARKS.md table).

    python benchmarks/gpu_suite.py                 # on a GPU machine, <= 8 minutes on one H100
    python benchmarks/gpu_suite.py --smoke         # CPU, tiny model, seconds: the script still runs
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

import tokentune
from tokentune.core.method import available_methods, get_method
from tokentune.timing import measure_throughput
from tokentune.tools.bench import BenchSettings, markdown, measure, parse_config

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3)
PAPER = {"vit_base_patch16_224": {"pyra_low": 1.77, "pyra_high": 3.25}}    # PYRA's speed-ups over LoRA (its table)


def rows(smoke: bool, model: str) -> List[Tuple[str, str]]:
    """(label, bench config) of every row; the reference schedules need 197 tokens, the smoke model takes targets."""
    low, high = ("flops:1.5", "flops:2.0") if smoke else ("low", "high")
    out = [("LoRA (merged)", "lora"),
           ("ToMe low", f"lora+tome:tome_r={low}"), ("ToMe high", f"lora+tome:tome_r={high}"),
           ("PYRA low", f"pyra:tome_r={low}"), ("PYRA high", f"pyra:tome_r={high}"),
           ("DyT r=0.5 (capacity)", "dyt:rate=0.5,dyt_inference=capacity,dyt_capacity=1.0"),
           ("EViT 0.7", "lora+evit"), ("DynamicViT 0.7", "lora+dynamicvit")]
    if not smoke and model.startswith("vit_base_patch16_224"):
        out.append(("DiffRate 8.7G", "lora+diffrate:diffrate_preset=deit_base:8.7"))
    for name in available_methods():               # the training-free methods with a rate, at ToMe low's FLOPs
        m = get_method(name)
        if m.training_free and m.rate_option and name not in ("tome", "evit"):
            target = "flops:1.5" if smoke else "flops:2.0"
            out.append((f"{name} (ToMe low's FLOPs)", f"lora+{name}:{name}_{m.rate_option}={target}"))
    return out


def eager_tables(models: List[str], dtypes: List[str], args, smoke: bool) -> List[Dict[str, Any]]:
    results = []
    for model in models:
        for dtype in dtypes:
            settings = BenchSettings(model=model, batch_size=args.batch_size, dtype=dtype, device=args.device,
                                     rounds=args.rounds, warmup=args.warmup, latency=False, train=False,
                                     memory=True, pretrained=False, timm_kwargs=dict(TINY) if smoke else {})
            cands = [parse_config(f"{cfg}{',' if ':' in cfg else ':'}label={label}") for label, cfg in rows(smoke, model)]
            result = measure(cands, settings, progress=None if args.quiet else (lambda t: print(t, flush=True)))
            results.append({"model": model, "dtype": dtype, "rows": result.rows, "environment": result.environment,
                            "markdown": markdown(result)})
            print(results[-1]["markdown"], flush=True)
    return results


def compiled_table(model: str, args, smoke: bool, deadline: float) -> Optional[Dict[str, Any]]:
    """Static-shape rows under torch.compile with CUDA graphs, against the plain model compiled alike."""
    if args.no_compile:
        return None
    kw = dict(TINY) if smoke else {}
    low, high = ("flops:1.5", "flops:2.0") if smoke else ("low", "high")
    specs = {"LoRA (merged)": ("lora", {}), "ToMe low": ("lora+tome", {"tome_r": low}),
             "ToMe high": ("lora+tome", {"tome_r": high}), "PYRA high": ("pyra", {"tome_r": high})}
    device = torch.device(args.device)
    mode = "default" if device.type == "cpu" else "reduce-overhead"
    compiled = {}
    for label, (spec, opts) in specs.items():
        if time.monotonic() > deadline:
            print(f"compile budget spent: {label} and later rows skipped", flush=True)
            break
        net = tokentune.deploy(tokentune.create_model(model, method=spec, num_classes=100, pretrained=False,
                                                      **opts, **kw)).to(device)
        compiled[label] = torch.compile(net, mode=mode)
    if len(compiled) < 2:
        return None
    size = kw.get("img_size", 224)
    stats = measure_throughput(compiled, batch_size=args.batch_size, image_size=size, rounds=args.rounds,
                               warmup=max(args.warmup, 3), dtype="fp16" if device.type == "cuda" else "fp32",
                               device=device)
    base = stats["LoRA (merged)"].median
    table = {label: {"img_per_s": s.median, "low": s.low, "high": s.high, "speedup": s.median / base}
             for label, s in stats.items()}
    return {"model": model, "mode": mode, "rows": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, batch 2, one round: checks the script")
    parser.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-min", type=float, default=8.0, help="stop starting compiled rows after this")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    start = time.monotonic()
    if args.smoke:
        args.device, args.batch_size, args.rounds, args.warmup = "cpu", 2, 1, 1
        models, dtypes = ["vit_tiny_patch16_224"], ["bf16"]
    else:
        models, dtypes = args.models.split(","), args.dtypes.split(",")
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or --smoke to check the script on the CPU")
    record: Dict[str, Any] = {"eager": eager_tables(models, dtypes, args, args.smoke), "compiled": [],
                              "paper": PAPER, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                              and args.device != "cpu" else "cpu"}
    deadline = start + args.budget_min * 60
    for model in models:
        table = compiled_table(model, args, args.smoke, deadline)
        if table:
            record["compiled"].append(table)
            print(json.dumps(table, indent=1), flush=True)
    record["seconds"] = time.monotonic() - start
    os.makedirs(args.out, exist_ok=True)
    name = "gpu_suite_smoke" if args.smoke else f"gpu_suite_{record['device'].replace(' ', '_')}"
    with open(os.path.join(args.out, name + ".json"), "w") as fh:
        json.dump(record, fh, indent=1, default=str)
    with open(os.path.join(args.out, name + ".md"), "w") as fh:
        fh.write("\n\n".join(f"### {t['model']}, {t['dtype']}, batch {args.batch_size}\n\n{t['markdown']}"
                             for t in record["eager"]))
    print(f"suite done in {record['seconds']:.0f} s: {os.path.join(args.out, name)}.json/.md")


if __name__ == "__main__":
    main()
