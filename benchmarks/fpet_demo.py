"""FPET on the offline demo's digits: top-1 over seeds beside LoRA + ToMe, and the training-time
(straight-through) form against the deployed (hard 0/1, static-shape) form.

Runs the demo's own rows (``tokentune.tools.demo.ROWS``: "LoRA r=8 + ToMe", "LoRA r=8 + FPET
(block 1)", "AdaptFormer (adapter 16) + FPET (block 1)") through the demo's ``create_model -> train
-> deploy -> evaluate`` path for each seed (the seed of the new layers, the training order and
dropout; data and backbone stay those of seed 0, as ``tokentune demo``), and for the FPET rows also
evaluates the training-time model in eval mode and counts the tokens its merge drops (top-1/top-2
ties). Prints a markdown table and writes benchmarks/results/fpet_demo.json.

    python benchmarks/fpet_demo.py                  # seeds 0 1 2
    python benchmarks/fpet_demo.py --seeds 0        # one seed
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from tokentune.engine.evaluate import evaluate
from tokentune.fileio import atomic_write_json
from tokentune.tools.demo import ROWS, DemoConfig, adapt, count_macs, prepare_demo

LABELS = ["LoRA r=8 + ToMe", "LoRA r=8 + FPET (block 1)", "AdaptFormer (adapter 16) + FPET (block 1)"]


def dropped_tokens(model, dataset) -> int:
    """Patches no token stands for after the merge (top-1/top-2 ties), over the whole test set."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        _, state = model.eval()(images, return_state=True)
    if state.size is None:
        return 0
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return int(round(images.shape[0] * tokens - state.size.sum().item()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=LABELS, help="demo row labels (default: the three above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig()
    rows = [next(r for r in ROWS if r.label == label) for label in args.rows]
    results = {label: [] for label in args.rows}
    with tempfile.TemporaryDirectory() as workdir:
        setup = prepare_demo(cfg, workdir, print, len(rows) + 1)
        for seed in args.seeds:
            for row in rows:
                done = adapt(setup, row, cfg, None, seed=seed)
                rec = {"seed": seed, "top1": done.top1, "trainable": done.trainable}
                if "fpet" in row.method:
                    rec["top1_training_form"] = evaluate(done.model.eval(), setup.test, batch_size=256, amp="off",
                                                         progress=False)["top1"]
                    rec["dropped_patches"] = dropped_tokens(done.model, setup.test)
                sample = torch.stack([setup.test[i][0] for i in range(8)])
                rec["mmacs"] = count_macs(done.deployed, sample) / 1e6
                results[row.label].append(rec)
                print(f"seed {seed} {row.label}: {rec}", flush=True)
    print("\n| row | top-1 mean ± std (seeds) | MMACs/img | training-time form top-1 | dropped patches |")
    print("|---|---|---|---|---|")
    for label, recs in results.items():
        tops = [r["top1"] for r in recs]
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        train_form = ", ".join(f"{r['top1_training_form']:.1f}" for r in recs) if "top1_training_form" in recs[0] else "-"
        dropped = ", ".join(str(r["dropped_patches"]) for r in recs) if "dropped_patches" in recs[0] else "-"
        print(f"| {label} | {statistics.mean(tops):.1f} ± {std:.1f} ({', '.join(f'{t:.1f}' for t in tops)}) | "
              f"{recs[0]['mmacs']:.2f} | {train_form} | {dropped} |")
    out = os.path.join(os.path.dirname(__file__), "results", "fpet_demo.json")
    atomic_write_json(out, {"seeds": args.seeds, "rows": results})


if __name__ == "__main__":
    main()
