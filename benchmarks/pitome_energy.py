"""PiToMe's energy score two ways, side by side in one process: ``F.elu`` over the token graph (the
earlier form) and the split form ``tokentune.methods.pitome.energy_order`` uses now, beside ToMe at
the same schedule and the dense model.

Both PiToMe rows are the same deployed model; the "F.elu" row swaps the module's ``energy_order`` for
the earlier one during its forwards only. Batch 16, fp32, random weights, interleaved rounds of at
least one second each (``measure_throughput(min_block_s=1)``). Prints a markdown table and writes
benchmarks/results/pitome_energy[_TAG].{md,json}.

    python benchmarks/pitome_energy.py                                  # DeiT-T at DeiT's 4.6/2.9 FLOPs ratio
    python benchmarks/pitome_energy.py --model vit_base_patch16_224 --target flops:2.001
    python benchmarks/pitome_energy.py --quick                          # tiny width (checks the script)
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import tokentune.methods.pitome as pitome
from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.timing import measure_throughput, paired_speedup
from tokentune.tools import measure as measure_env

SPLIT_ENERGY = pitome.energy_order


def elu_energy_order(metric: torch.Tensor, margin: float, alpha: float):
    """The earlier form: one ``F.elu`` over the [B, T, T] graph."""
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    return sim, F.elu(sim - margin, alpha=alpha).mean(dim=-1).argsort(dim=-1, descending=True)


class WithEnergy(nn.Module):
    """Runs ``model`` with ``energy`` as PiToMe's energy function."""

    def __init__(self, model: nn.Module, energy) -> None:
        super().__init__()
        self.model, self.energy = model, energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pitome.energy_order = self.energy
        try:
            return self.model(x)
        finally:
            pitome.energy_order = SPLIT_ENERGY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--target", default="flops:1.586", help="the rate of ToMe and PiToMe (default: 4.6/2.9)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny width, 1 round: checks the script runs")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(embed_dim=64, num_heads=2) if args.quick else {}
    built = {}
    for label, method, opts in [("dense", "linear", {}), ("ToMe", "tome", {"tome_r": args.target}),
                                ("PiToMe", "pitome", {"pitome_r": args.target})]:
        torch.manual_seed(0)
        built[label] = deploy(create_model(args.model, method=method, num_classes=1000, **kw, **opts).eval())
    models = {"dense": built["dense"], "ToMe": built["ToMe"],
              "PiToMe, F.elu energy": WithEnergy(built["PiToMe"], elu_energy_order),
              "PiToMe, split energy": WithEnergy(built["PiToMe"], SPLIT_ENERGY)}
    probe = torch.randn(args.batch_size, 3, 224, 224)
    with torch.no_grad():
        same = torch.equal(models["PiToMe, F.elu energy"](probe).argmax(-1), models["PiToMe, split energy"](probe).argmax(-1))
    gmacs = {label: count_flops(built[label], probe[:1]) / 2e9 for label in built}
    stats = measure_throughput(models, batch_size=args.batch_size, rounds=1 if args.quick else args.rounds,
                               warmup=1, min_block_s=0.0 if args.quick else 1.0)
    rows = []
    for label, st in stats.items():
        rows.append({"row": label, "GMACs": round(gmacs[label.split(",")[0]], 3), "img/s": round(st.median, 2),
                     "speed-up": round(st.median / stats["dense"].median, 3),
                     "paired time / ToMe": round(1 / paired_speedup(st, stats["ToMe"]), 3),
                     "paired time / PiToMe F.elu": round(1 / paired_speedup(st, stats["PiToMe, F.elu energy"]), 3)})
    env = measure_env.environment(torch.device("cpu"), "fp32")
    title = (f"PiToMe's energy score, F.elu vs split: {args.model} at {args.target}, batch {args.batch_size}, "
             f"{torch.get_num_threads()} threads, fp32, {stats['dense'].rounds} rounds" + (" [QUICK]" if args.quick else ""))
    name = "pitome_energy" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    print(measure_env.write_results(os.path.join(args.out, name), rows, env, list(rows[0]), title,
                                    note=f"Top-1 of the two energy forms equal on the timed batch: {same}."))


if __name__ == "__main__":
    main()
