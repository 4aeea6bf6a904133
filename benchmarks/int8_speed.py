"""int8 with token reduction on the CPU: does the saving of int8 weights compound with ToMe's?

ViT-B/16 at 224 (random weights: speed does not depend on them), deployed dense (LoRA merged = the
plain timm model) and with ToMe "high", each in fp32 and int8:

* onnxruntime (CPU provider): the fp32 graph of ``export_onnx`` and its ``quantize_onnx(..., "int8")``
  (dynamic) version, batch 1 (and ``--batch``), every session timed in interleaved rounds in one process.
  The graphs are exported for the timed batch (``dynamic_batch=False``, ``tokentune export --onnx
  --static-batch``): every shape is a constant, so onnxruntime folds the shape arithmetic of ToMe's
  merge steps and of the attention with a size bias instead of running it per block. ``--dynamic-batch``
  times the any-batch graphs instead; ``--both-forms`` times both, side by side (rows "(any batch)");
* PyTorch eager: ``deploy(model)`` against ``deploy(model, quantize="int8-dynamic")``.

Prints a table (median img/s, min-max, speed-up over the fp32 dense model of the same runtime) and
writes ``benchmarks/results/int8_speed_t<threads>.json``.

Goals (issue): ToMe high + int8 in onnxruntime at batch 1 >= 4x the fp32 dense graph and >= 1.6x the
int8 dense graph.

    python benchmarks/int8_speed.py --threads 2 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

import tokentune
from tokentune.timing import allocator_state, apply_allocator
from tokentune.tools.onnx import export_onnx, quantize_onnx


def _ort_sessions(models: Dict[str, torch.nn.Module], tmp: str, threads: int, batch: int, forms: List[bool]):
    """Sessions of the fp32 and int8 graphs of every model, per graph form (``forms``: dynamic batch or not;
    the any-batch graphs get the suffix " (any batch)" when both forms are timed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = {}
    for dynamic in forms:
        suffix = " (any batch)" if dynamic and len(forms) > 1 else ""
        for name, model in models.items():
            stem = os.path.join(tmp, f"{name}-{'any' if dynamic else batch}")
            path = export_onnx(model, stem + ".onnx", batch_size=batch, dynamic_batch=dynamic, verify=False)
            sessions[f"ort fp32 {name}{suffix}"] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            q = quantize_onnx(path, "int8", out=stem + ".int8.onnx")
            sessions[f"ort int8 {name}{suffix}"] = ort.InferenceSession(q, opts, providers=["CPUExecutionProvider"])
    return sessions


def _time(fns: Dict[str, callable], rounds: int, iters: int) -> Dict[str, List[float]]:
    for fn in fns.values():
        fn()
        fn()
    times: Dict[str, List[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[n]()
            times[n].append((time.perf_counter() - t0) / iters)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--dynamic-batch", action="store_true", help="time the any-batch graphs (export_onnx's default)")
    form.add_argument("--both-forms", action="store_true",
                      help="time the graphs for the timed batch and the any-batch graphs side by side")
    parser.add_argument("--no-eager", action="store_true", help="time onnxruntime only")
    args = parser.parse_args()
    forms = [False, True] if args.both_forms else [bool(args.dynamic_batch)]
    torch.set_num_threads(args.threads)
    print("allocator:", apply_allocator())          # the C allocator these timings run under
    torch.manual_seed(0)
    dense = tokentune.deploy(tokentune.create_model(args.model, method="lora", num_classes=100, pretrained=False))
    tome = tokentune.deploy(tokentune.create_model(args.model, method="lora+tome", tome_r="high", num_classes=100,
                                                   pretrained=False))
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = _ort_sessions({"dense": dense, "tome-high": tome}, tmp, args.threads, args.batch, forms)
        xn = x.numpy()
        for name, s in sessions.items():
            fns[name] = (lambda s=s: s.run(None, {s.get_inputs()[0].name: xn}))
        eager = {} if args.no_eager else {
            "eager fp32 dense": dense, "eager fp32 tome-high": tome,
            "eager int8 dense": tokentune.deploy(dense, quantize="int8-dynamic"),
            "eager int8 tome-high": tokentune.deploy(tome, quantize="int8-dynamic")}
        for name, m in eager.items():
            fns[name] = (lambda m=m: m(x))
        with torch.inference_mode():
            times = _time(fns, args.rounds, args.iters)
            with torch.no_grad():
                ref = {k: dense(x).numpy() for k in ("dense",)}
            diffs = {n: float(np.abs(np.asarray(sessions[n].run(None, {"images": xn})[0]) - ref["dense"]).max())
                     for n in sessions if "dense" in n}
    rows = []
    for name, ts in times.items():
        ips = [args.batch / t for t in ts]
        runtime, suffix = name.split()[0], " (any batch)" if name.endswith(" (any batch)") else ""
        base = statistics.median([args.batch / t for t in times[f"{runtime} fp32 dense{suffix}"]])
        rows.append({"row": name, "img_per_s": statistics.median(ips), "min": min(ips), "max": max(ips),
                     "speedup_vs_fp32_dense": statistics.median(ips) / base})
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds x {args.iters}")
    print("| row | img/s | min-max | vs fp32 dense (same runtime) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['img_per_s']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {r['speedup_vs_fp32_dense']:.2f}x |")
    med = {r["row"]: r["img_per_s"] for r in rows}
    print(f"ToMe high int8 / int8 dense (onnxruntime): {med['ort int8 tome-high'] / med['ort int8 dense']:.2f}x; "
          f"largest logit difference int8 vs fp32 dense graph: {diffs}")
    if args.both_forms:        # the same model's two graphs, round by round
        for name in ("ort fp32 dense", "ort int8 tome-high"):
            paired = [a / b for a, b in zip(times[f"{name} (any batch)"], times[name])]
            print(f"{name}: graph for batch {args.batch} / any-batch graph, speed per round: "
                  f"median {statistics.median(paired):.3f}x ({', '.join(f'{v:.3f}' for v in paired)})")
    record = {"rows": rows, "logit_diff": diffs, "model": args.model, "batch": args.batch, "threads": args.threads,
              "graphs": "both" if args.both_forms else "any batch" if args.dynamic_batch else f"batch {args.batch}",
              "cpu": platform.processor() or platform.machine(), "load": os.getloadavg(),
              "allocator": allocator_state()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"int8_speed_b{args.batch}_t{args.threads}.json"), "w") as fh:
        json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main()
