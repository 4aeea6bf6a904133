"""MCTF against ToMe on the offline demo's digits at the same FLOPs, over seeds: trained with the
method (the demo's rows) and off the shelf (the trained LoRA row with the merge added, no training).

Each seed trains three demo rows (LoRA r=8, LoRA r=8 + ToMe, LoRA r=8 + MCTF, as ``tokentune demo
--rows all`` trains them), then evaluates the LoRA row's weights with ToMe's and MCTF's merging
added (no training: ``training_free``). Prints per-row mean ± sample std of the deployed models'
test top-1 and writes a Markdown table.

    python benchmarks/mctf_demo_seeds.py --seeds 0,1,2 --out benchmarks/results/mctf_demo_seeds.md
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from tokentune import create_model, deploy
from tokentune.engine.evaluate import evaluate
from tokentune.tools.demo import BACKBONE, ROWS, DemoConfig, adapt, count_macs, prepare_demo


def _row(label):
    return next(r for r in ROWS if r.label == label)


def off_the_shelf(trained, setup, method, options):
    """The trained model's weights under ``method`` (a merge added, nothing trained)."""
    model = create_model(BACKBONE, method=method, num_classes=5, pretrained=setup.backbone,
                         head_init_std=0.01, **{**setup.arch, **options})
    model.load_state_dict(trained.state_dict())
    fast = deploy(model.eval())
    test = torch.stack([setup.test[i][0] for i in range(len(setup.test))])
    return evaluate(fast, setup.test, batch_size=256, amp="off", progress=False)["top1"], count_macs(fast, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = DemoConfig(threads=1)
    torch.set_num_threads(1)
    tic = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        setup = prepare_demo(cfg, work)
        mctf_options = _row("LoRA r=8 + MCTF").options
        for seed in seeds:
            lora = adapt(setup, _row("LoRA r=8"), cfg, None, seed=seed)
            print(f"seed {seed}: LoRA r=8 (dense): {lora.top1:.1f}%", flush=True)
            for label, method, opts in (("ToMe off the shelf", "lora+tome", {**_row("LoRA r=8").options,
                                                                              "tome_r": list(cfg.tome_r)}),
                                        ("MCTF off the shelf", "lora+mctf", mctf_options)):
                top1, macs = off_the_shelf(lora.model, setup, method, opts)
                results.setdefault(label, []).append((top1, macs))
                print(f"seed {seed}: {label}: {top1:.1f}% at {macs / 1e6:.2f} MMACs", flush=True)
            test = torch.stack([setup.test[i][0] for i in range(len(setup.test))])
            for label in ("LoRA r=8 + ToMe", "LoRA r=8 + MCTF"):
                done = adapt(setup, _row(label), cfg, None, seed=seed)
                results.setdefault(label + " (trained)", []).append((done.top1, count_macs(done.deployed, test)))
                print(f"seed {seed}: {label} (trained): {done.top1:.1f}%", flush=True)
            results.setdefault("LoRA r=8 (dense)", []).append((lora.top1, count_macs(lora.deployed, test)))
            print(f"seed {seed} done ({time.perf_counter() - tic:.0f} s)", flush=True)
    lines = ["| row | top-1 % (mean ± std) | per seed | MMACs/img |", "|---|---|---|---|"]
    for label, values in results.items():
        tops = [v[0] for v in values]
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        lines.append(f"| {label} | {statistics.mean(tops):.1f} ± {std:.1f} | {' '.join(f'{t:.1f}' for t in tops)} "
                     f"| {values[0][1] / 1e6:.2f} |")
    text = "\n".join(lines) + f"\n\nseeds {seeds}, {time.perf_counter() - tic:.0f} s\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
