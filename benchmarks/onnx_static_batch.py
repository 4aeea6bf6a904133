"""Where the int8 ToMe graph spends its time in onnxruntime at batch 1, and what exporting it for that batch saves.

ViT-B/16 at 224 (random weights), deployed dense (LoRA merged) or with ToMe "high", exported twice with
``export_onnx``: for any batch (the default) and for batch 1 (``dynamic_batch=False``, ``tokentune export --onnx
--static-batch``), both quantized with ``quantize_onnx(..., "int8")``. Prints, per graph, its node count (in the
file and after onnxruntime's own optimisations) and the shape-arithmetic nodes left (Shape, Range, ...); times
the two graphs side by side (same session options, interleaved rounds of one forward each: median, minimum and
the median of the per-round ratios); with ``--profile``, onnxruntime's profile of a few forwards of each graph
per operator type.

    python benchmarks/onnx_static_batch.py --threads 2 --rounds 40 --profile
    python benchmarks/onnx_static_batch.py --model-form dense --precision fp32 --rounds 16
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

import tokentune
from tokentune.tools.onnx import export_onnx, quantize_onnx

SHAPE_OPS = ("Shape", "Size", "Range", "ConstantOfShape")


def _session(path: str, threads: int, optimized: str = "", profile: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = profile
    if profile:
        opts.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    if optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED   # portable: no NCHWc layouts
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _profile(path: str, threads: int, x: np.ndarray, forwards: int = 5) -> None:
    session = _session(path, threads, profile=True)
    for _ in range(2 + forwards):
        session.run(None, {"images": x})
    events = json.load(open(session.end_profiling()))
    runs = [e["dur"] / 1e3 for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / len(runs)
            count[e["args"]["op_name"]] += 1 / len(runs)
    print(f"  profile: forward {statistics.median(runs[-forwards:]):.1f} ms (median of {forwards}), kernels "
          f"{sum(per_op.values()):.1f} ms")
    for op, ms in per_op.most_common(12):
        print(f"    {op:24s} {ms:7.2f} ms  {count[op]:4.0f} nodes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--model-form", choices=("tome-high", "dense"), default="tome-high")
    parser.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--profile", action="store_true", help="also print onnxruntime's profile per operator type")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = dict(method="lora+tome", tome_r="high") if args.model_form == "tome-high" else dict(method="lora")
    model = tokentune.deploy(tokentune.create_model(args.model, num_classes=100, pretrained=False, **spec))
    x = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    forms = {"any batch": True, "batch 1": False}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, outputs = {}, {}
        for name, dynamic in forms.items():
            path = export_onnx(model, os.path.join(tmp, f"{dynamic}.onnx"), batch_size=1, dynamic_batch=dynamic,
                               verify=False)
            if args.precision == "int8":
                path = quantize_onnx(path, "int8", out=os.path.join(tmp, f"{dynamic}.int8.onnx"))
            optimized = os.path.join(tmp, f"{dynamic}.opt.onnx")
            _session(path, args.threads, optimized)
            ops = [[n.op_type for n in onnx.load(p, load_external_data=False).graph.node] for p in (path, optimized)]
            print(f"{args.model_form} {args.precision}, graph for {name}: {len(ops[0])} nodes, {len(ops[1])} after "
                  f"onnxruntime's optimisations, {sum(o in SHAPE_OPS for o in ops[1])} of them shape arithmetic")
            if args.profile:
                _profile(path, args.threads, x)
            sessions[name] = _session(path, args.threads)
            outputs[name] = sessions[name].run(None, {"images": x})[0]
        diff = float(np.abs(outputs["any batch"] - outputs["batch 1"]).max())
        print(f"largest difference of the two graphs' logits: {diff:.3g}")
        times = {n: [] for n in sessions}
        for r in range(args.rounds):
            for n in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                t0 = time.perf_counter()
                sessions[n].run(None, {"images": x})
                times[n].append((time.perf_counter() - t0) * 1e3)
    paired = [a / b for a, b in zip(times["any batch"], times["batch 1"])]
    print(f"{args.threads} threads, batch 1, {args.rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    for n, ts in times.items():
        print(f"  graph for {n}: median {statistics.median(ts):.1f} ms, min {min(ts):.1f} ms")
    print(f"  speed-up of the batch-1 graph: {statistics.median(times['any batch']) / statistics.median(times['batch 1']):.3f}x "
          f"(medians), {min(times['any batch']) / min(times['batch 1']):.3f}x (minima), "
          f"{statistics.median(paired):.3f}x (median of the per-round ratios)")


if __name__ == "__main__":
    main()
