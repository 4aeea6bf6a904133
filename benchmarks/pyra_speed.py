"""PYRA speed: deployed PYRA vs deployed LoRA+ToMe (same schedule) vs deployed LoRA (timm SDPA).

Everything is deployed (LoRA merged into qkv; the plain LoRA model becomes the plain timm ViT with
fused SDPA) and timed side by side in one process: interleaved rounds with rotating order, the
same random batch, ``torch.inference_mode``. PYRA's modulator stays in the deployed model (it is
part of PYRA's inference cost), with non-zero weights so it does its real work. Prints a
markdown table and writes ``benchmarks/results/pyra_speed_b<batch>.{md,json}``.

Goals: PYRA within 1% of ToMe at the same schedule; vs LoRA at least 1.95x ("low") and 3.35x
("high") on ViT-B/16, 224, fp32, CPU batch 16.

    python benchmarks/pyra_speed.py                  # ViT-B/16, 224, fp32, batch 16
    python benchmarks/pyra_speed.py --quick          # tiny width, seconds (checks the script runs)
"""
from __future__ import annotations

import argparse
import os

import torch

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.methods.tome import named_schedule, token_counts
from tokentune.timing import measure_throughput
from tokentune.tools import measure

GOALS = {"low": 1.95, "high": 3.35}   # speed-up over deployed LoRA; PYRA/ToMe overhead goal: <= 1%


def _randomize(model, names, std):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in names):
                p.normal_(0, std)


def build(model_name: str, image_size: int, quick: bool):
    """Deployed models sharing one backbone and one LoRA: LoRA, then ToMe and PYRA per schedule."""
    kw = dict(img_size=image_size)
    if quick:
        kw.update(embed_dim=64, depth=12, num_heads=2)
    torch.manual_seed(0)
    lora = create_model(model_name, method="lora", num_classes=100, **kw)
    _randomize(lora, ("lora_B",), 0.02)
    models = {"lora (merged, timm SDPA)": deploy(lora)}
    info = {"lora (merged, timm SDPA)": dict(schedule=None, kind="lora")}
    for name in ("low", "high"):
        schedule = named_schedule(model_name, name, len(lora.blocks))
        for method in ("lora+tome", "pyra"):
            torch.manual_seed(0)
            m = create_model(model_name, method=method, num_classes=100, tome_r=schedule, **kw)
            m.load_state_dict(lora.state_dict(), strict=False)
            if method == "pyra":
                _randomize(m, (".merge.modulator.W_D",), 0.05)
            label = f"{method} {name} (merged)"
            models[label] = deploy(m)
            info[label] = dict(schedule=schedule, kind=method, name=name)
    return models, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="16", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny width, few rounds: checks the script runs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    models, info = build(args.model, args.image_size, args.quick)
    base = next(iter(models))
    images = torch.randn(1, 3, args.image_size, args.image_size)
    flops = {n: count_flops(m, images) for n, m in models.items()}
    n_tokens = int(models[base].patch_embed.num_patches) + int(models[base].num_prefix_tokens)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        stats = measure_throughput(models, batch_size=bs, image_size=args.image_size, rounds=rounds,
                                         warmup=1 if args.quick else 2)
        rows = []
        for n, s in stats.items():
            meta = info[n]
            speed = s.median / stats[base].median
            row = {
                "model": n,
                "tokens (last block)": token_counts(meta["schedule"], n_tokens)[-1] if meta["schedule"] else n_tokens,
                "GMACs": flops[n] / 2e9, "FLOPs ratio": flops[base] / flops[n],
                "img/s (median)": s.median, "img/s (min-max)": f"{s.low:.2f}-{s.high:.2f}",
                "speed-up vs LoRA": speed, "goal": "",
                "PYRA overhead vs ToMe": "",
            }
            if meta["kind"] == "pyra":
                tome = stats[f"lora+tome {meta['name']} (merged)"]
                overhead = 100.0 * (tome.median / s.median - 1.0)     # extra time per image, percent
                row["PYRA overhead vs ToMe"] = f"{overhead:+.2f}% (goal <= 1%)"
                row["goal"] = f">= {GOALS[meta['name']]:.2f}x"
            elif meta["kind"] == "lora+tome":
                row["goal"] = f">= {GOALS[meta['name']]:.2f}x"
            rows.append(row)
        env = measure.environment("cpu", "fp32")
        title = (f"PYRA speed: {args.model} {args.image_size}px, batch {bs}, fp32, CPU, {rounds} interleaved "
                 "rounds, all models deployed (LoRA merged)")
        prefix = os.path.join(args.out, f"pyra_speed_b{bs}{'_quick' if args.quick else ''}")
        print(measure.write_results(prefix, rows, env, list(rows[0]), title))


if __name__ == "__main__":
    main()
