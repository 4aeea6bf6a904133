"""Accuracy of DyT's capacity execution (static shapes) against the threshold rule, on the offline demo.

Runs the demo's DyT row (``tokentune.tools.demo``: a tiny ViT pre-trained on digits 0-4, DyT adapted
to digits 5-9, the same seed and settings as ``tokentune demo``), keeps the trained model, and
evaluates it on the held-out digits deployed with the threshold rule and with the capacity
execution: capacity factors, and capacities calibrated on the *training* images
(``calibrate_capacity``, quantiles 1.0, 0.9 and 0.5). Reports top-1, the share of test images whose
prediction changes, the multiply-adds per image and the activation rate. Accuracy only (no
timing), so the machine's load does not matter. Writes ``benchmarks/results/dyt_capacity_accuracy.{md,json}``.

    python benchmarks/dyt_capacity_accuracy.py
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch

from tokentune import deploy, load_trained
from tokentune.core.dispatch import activation_rate
from tokentune.engine.data import load_datasets, set_transforms
from tokentune.methods import dyt
from tokentune.tools import measure
from tokentune.tools.demo import DemoConfig, DemoRow, count_macs, run_demo


@torch.no_grad()
def predictions(model, data, batch_size=256):
    preds, labels, rates = [], [], []
    for i in range(0, len(data), batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, len(data)))]
        images = torch.stack([x for x, _ in items])
        logits, state = model(images, return_state=True)
        preds.append(logits.argmax(-1))
        labels.append(torch.tensor([int(y) for _, y in items]))
        rates.append(float(activation_rate(state)) * len(items))
    return torch.cat(preds), torch.cat(labels), sum(rates) / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="tokentune-dyt-capacity-")
    run_demo(DemoConfig(workdir=workdir), rows=[DemoRow("DyT", "dyt")], out=print)
    model = load_trained(os.path.join(workdir, "runs", "dyt")).eval()
    train_ds, test_ds = load_datasets(image_folder=os.path.join(workdir, "digits", "new"), train_split="train",
                                      test_split="test")
    set_transforms([train_ds, test_ds], model)
    train_images = torch.stack([train_ds[i][0] for i in range(len(train_ds))])
    sample = torch.stack([test_ds[i][0] for i in range(8)])
    variants = {"threshold rule (deploy default)": deploy(model)}
    for factor in (1.0, 1.25, 1.5):
        variants[f"capacity factor {factor:g}"] = deploy(model, dyt_execution="capacity", dyt_capacity=factor)
    for q in (1.0, 0.9, 0.5):
        calibrated = copy.deepcopy(model)
        counts = dyt.calibrate_capacity(calibrated, train_images, quantile=q)
        variants[f"capacity calibrated on train, quantile {q:g} ({counts})"] = deploy(calibrated)
    reference, labels, _ = predictions(variants["threshold rule (deploy default)"], test_ds)
    rows = []
    for name, net in variants.items():
        preds, _, rate = predictions(net, test_ds)
        rows.append({"deployment": name, "top-1": f"{100 * float((preds == labels).float().mean()):.2f}%",
                     "predictions changed": f"{100 * float((preds != reference).float().mean()):.2f}%",
                     "MMACs/img": f"{count_macs(net, sample) / 1e6:.2f}", "activation": f"{100 * rate:.1f}%"})
    env = measure.environment("cpu", "fp32")
    title = f"DyT on the offline demo: capacity execution vs threshold rule ({len(test_ds)} held-out digits 5-9)"
    print(measure.write_results(os.path.join(args.out, "dyt_capacity_accuracy"), rows, env, list(rows[0]), title))


if __name__ == "__main__":
    main()
