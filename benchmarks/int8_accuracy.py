"""Top-1 of every method's int8 forms on the offline demo, against the same model deployed in fp32.

Trains (or reuses from ``--workdir``) the demo's rows (``tokentune.tools.demo``: the tiny ViT
pre-trained on digits 0-4, adapted to digits 5-9 with the demo's seed and settings) for plain LoRA,
ToMe, PYRA, DyT (deployed with the capacity execution), EViT, DynamicViT, DiffRate (rates searched
from the LoRA row, as the demo does) and VPT-deep, then evaluates on the demo's held-out digits 5-9:

* ``fp32``: ``tokentune.deploy(model, **row.deploy)`` (the demo's top-1);
* ``torch int8``: ``tokentune.deploy(model, quantize="int8-dynamic", **row.deploy)``;
* ``ort fp32``: its ``export_onnx`` graph in onnxruntime (the export alone, not verified on export:
  its logit difference shows what the export changes);
* ``ort int8``: ``quantize_onnx(graph, "int8")`` (dynamic);
* ``ort int8-static``: ``quantize_onnx(graph, "int8-static")`` calibrated on ``--calibration`` images
  of the demo's *training* split (the first N in dataset order), with onnxruntime's activation-range
  rule ``--calibration-method`` (several: one column each, ``ort int8-static (entropy)``, ...).

Per form: top-1, its drop against the fp32 row (goal: <= 1 point), the share of test images whose
prediction changes and the largest absolute logit difference from the fp32 model. Accuracy only (no
timing), so the machine's load does not matter. Writes ``benchmarks/results/int8_accuracy.{md,json}``.

    python benchmarks/int8_accuracy.py --workdir /tmp/int8-demo     # a second run reuses the trained rows
    python benchmarks/int8_accuracy.py --workdir /tmp/int8-demo --rows "LoRA r=8 + EViT" \
        --calibration-method minmax entropy percentile                # one row, three static columns
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch

import tokentune
from tokentune import deploy, load_trained
from tokentune.engine.rundir import RunDir
from tokentune.tools.demo import ROWS, DemoConfig, _load_folder, adapt, prepare_demo, searched_options
from tokentune.tools.onnx import CALIBRATION_METHODS, export_onnx, quantize_onnx

BY_LABEL = {r.label: r for r in ROWS}
#: the demo rows measured (the issue's methods); DyT is measured in its static-shape (capacity) form
LABELS = ["LoRA r=8", "LoRA r=8 + ToMe", "PYRA (LoRA r=8 + ToMe)", "DyT, static shapes (capacity 1.0)",
          "LoRA r=8 + EViT", "LoRA r=8 + DynamicViT", "LoRA r=8 + DiffRate (searched)", "VPT-deep (10 prompts)"]


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")


class Rows:
    """The demo's trained models by label: trained once, reused from the run directories of ``workdir``."""

    def __init__(self, setup, cfg: DemoConfig, workdir: str, say: Callable[[str], None]) -> None:
        self.setup, self.cfg, self.workdir, self.say = setup, cfg, workdir, say
        self.models: Dict[str, torch.nn.Module] = {}

    def model(self, label: str) -> torch.nn.Module:
        row = BY_LABEL[label]
        if row.reuse is not None:                       # the same weights deployed another way
            return self.model(row.reuse)
        if label in self.models:
            return self.models[label]
        run = os.path.join(self.workdir, "runs", _slug(label))
        if os.path.isfile(RunDir(run).results):         # a finished run of an earlier invocation
            model = load_trained(run).eval()
            self.say(f"{label}: reused {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)      # an unfinished one starts again
            found = {}
            if row.search:
                found, _ = searched_options(row, self.model(row.search_from), self.setup.train)
            tic = time.perf_counter()
            model = adapt(self.setup, row, self.cfg, run, options=found).model.eval()
            self.say(f"{label}: trained in {time.perf_counter() - tic:.0f} s")
        self.models[label] = model
        return model


@torch.no_grad()
def _logits(fn: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([fn(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def _torch(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda x: model(x).float().numpy()


def _ort(path: str) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def static_form(method: str, methods: List[str]) -> str:
    """The column of int8-static calibrated with ``method`` (plain ``ort int8-static`` when it is the only one)."""
    return "ort int8-static" if len(methods) == 1 else f"ort int8-static ({method})"


def forms(model: torch.nn.Module, row, tmp: str, calibration: torch.Tensor, methods: List[str]) -> Dict[str, Callable]:
    """Every form of one trained model, as functions images -> logits."""
    fp32 = deploy(model, **row.deploy)
    # not verified on export: the "ort fp32" form's top-1 and logit difference show what the export changes
    path = export_onnx(fp32, os.path.join(tmp, f"{_slug(row.label)}.onnx"), verify=False)
    out = {"fp32": _torch(fp32),
           "torch int8": _torch(deploy(model, quantize="int8-dynamic", **row.deploy)),
           "ort fp32": _ort(path),
           "ort int8": _ort(quantize_onnx(path, "int8", out=path[:-5] + ".int8.onnx"))}
    for method in methods:
        out[static_form(method, methods)] = _ort(quantize_onnx(path, "int8-static", calibration=calibration,
                                                               out=path[:-5] + f".int8-static-{method}.onnx",
                                                               calibration_method=method))
    return out


def evaluate_row(label: str, fns: Dict[str, Callable], images: torch.Tensor, labels: np.ndarray,
                 batch: int) -> List[Dict]:
    logits = {form: _logits(fn, images, batch) for form, fn in fns.items()}
    ref = logits["fp32"]
    top1_ref = 100.0 * float((ref.argmax(-1) == labels).mean())
    out = []
    for form, got in logits.items():
        top1 = 100.0 * float((got.argmax(-1) == labels).mean())
        out.append({"row": label, "form": form, "top1": top1, "drop": top1_ref - top1,
                    "changed": 100.0 * float((got.argmax(-1) != ref.argmax(-1)).mean()),
                    "max_logit_diff": float(np.abs(got - ref).max()), "logit_scale": float(np.abs(ref).max())})
    return out


def markdown(results: List[Dict], n: int) -> str:
    columns = list(dict.fromkeys(r["form"] for r in results))
    int8 = [f for f in columns if "int8" in f]
    lines = ["| row | " + " | ".join(columns) + " | worst int8 drop | max abs logit diff (" + " / ".join(int8) + ") |",
             "|---|" + "---|" * (len(columns) + 2)]
    for label in dict.fromkeys(r["row"] for r in results):
        by = {r["form"]: r for r in results if r["row"] == label}
        drop = max(by[f]["drop"] for f in int8)
        diffs = " / ".join(f"{by[f]['max_logit_diff']:.3f}" for f in int8)
        lines.append(f"| {label} | " + " | ".join(f"{by[f]['top1']:.1f}" for f in columns)
                     + f" | {drop:+.1f} | {diffs} (of {by['fp32']['logit_scale']:.1f}) |")
    return "\n".join(lines) + (f"\n\ntop-1 (%) on the demo's {n} held-out digits 5-9; worst int8 drop: fp32 top-1 minus "
                               "the lowest int8 top-1 (points; negative: int8 was better)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="keep the digits and trained runs here (reused on a rerun)")
    ap.add_argument("--rows", nargs="*", default=LABELS, choices=LABELS, metavar="LABEL",
                    help="demo row labels [default: the issue's methods: %(default)s]")
    ap.add_argument("--batch", type=int, default=256, help="evaluation batch (the demo's) [default: 256]")
    ap.add_argument("--calibration", type=int, default=64, help="training images for int8-static [default: 64]")
    ap.add_argument("--calibration-method", nargs="+", default=[CALIBRATION_METHODS[0]], choices=CALIBRATION_METHODS,
                    help=f"int8-static's activation-range rule(s), one column each [default: {CALIBRATION_METHODS[0]}]")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads [default: 1]")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    cfg = DemoConfig(workdir=args.workdir, threads=args.threads)
    torch.set_num_threads(cfg.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="tokentune-int8-accuracy-")
    start = time.perf_counter()
    try:
        setup = prepare_demo(cfg, workdir, print)
        probe = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=5, **setup.arch)
        setup.train, setup.test = _load_folder(setup.folders["new"], probe)
        images = torch.stack([setup.test[i][0] for i in range(len(setup.test))])
        labels = np.array([int(setup.test[i][1]) for i in range(len(setup.test))])
        calibration = torch.stack([setup.train[i][0] for i in range(min(args.calibration, len(setup.train)))])
        rows = Rows(setup, cfg, workdir, print)
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for label in args.rows:
                row = BY_LABEL[label]
                fns = forms(rows.model(label), row, tmp, calibration, args.calibration_method)
                results += evaluate_row(label, fns, images, labels, args.batch)
                print(" ".join(f"{r['form']} {r['top1']:.1f}" for r in results[-len(fns):]), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(results, len(labels))
    print(text)
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load": os.getloadavg(), "batch": args.batch,
           "calibration_images": calibration.shape[0], "calibration_methods": args.calibration_method,
           "seconds": time.perf_counter() - start}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "int8_accuracy.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "int8_accuracy.json"), "w") as fh:
        json.dump({"environment": env, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
