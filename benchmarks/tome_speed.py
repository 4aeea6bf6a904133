"""ToMe speed: deployed LoRA (= plain timm ViT with fused SDPA) vs deployed LoRA+ToMe schedules.

Side by side in one process, interleaved rounds, same random batch. Prints a markdown table and
writes benchmarks/results/tome_speed_b<batch>.{md,json}.

    python benchmarks/tome_speed.py                      # ViT-B/16, 224, fp32, batch 16 and batch 1
    python benchmarks/tome_speed.py --compile            # also torch.compile of each deployed model
    python benchmarks/tome_speed.py --quick              # tiny model, seconds (smoke test)
"""
from __future__ import annotations

import argparse
import os

import torch

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.methods.tome import token_counts
from tokentune.timing import measure_throughput
from tokentune.tools import measure

SCHEDULES = {"low": [16] * 11 + [10], "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]}


def build(model_name: str, image_size: int, quick: bool, compiled: bool):
    kw = dict(img_size=image_size)
    if quick:
        kw.update(embed_dim=64, depth=12, num_heads=2)
    torch.manual_seed(0)
    lora = create_model(model_name, method="lora", num_classes=100, **kw)
    models = {"lora (merged, timm SDPA)": deploy(lora)}
    schedules = {}
    for name, sched in SCHEDULES.items():
        torch.manual_seed(0)
        m = create_model(model_name, method="lora+tome", num_classes=100, tome_r=sched, **kw)
        m.load_state_dict(lora.state_dict())
        models[f"lora+tome {name} (merged)"] = deploy(m)
        schedules[f"lora+tome {name} (merged)"] = sched
    if compiled:    # torch.compile of the same deployed models, timed beside the eager ones
        for name in list(models):
            models[name + " compiled"] = torch.compile(models[name])
            if name in schedules:
                schedules[name + " compiled"] = schedules[name]
    return models, schedules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="16,1", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny width, few rounds: checks the script runs")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of every deployed model")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    models, schedules = build(args.model, args.image_size, args.quick, args.compile)
    base_name = next(iter(models))
    images = torch.randn(1, 3, args.image_size, args.image_size)
    flops = {n: count_flops(m, images) for n, m in models.items() if not n.endswith(" compiled")}
    flops.update({n: flops[n[: -len(" compiled")]] for n in models if n.endswith(" compiled")})
    n_tokens = (args.image_size // 16) ** 2 + 1
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        stats = measure_throughput(models, batch_size=bs, image_size=args.image_size, rounds=rounds,
                                         warmup=1 if args.quick else 2)
        rows = []
        for n, s in stats.items():
            limit = flops[base_name] / flops[n]
            speed = s.median / stats[base_name].median
            rows.append({
                "model": n,
                "tokens (last block)": token_counts(schedules[n], n_tokens)[-1] if n in schedules else n_tokens,
                "GMACs": flops[n] / 2e9, "FLOPs ratio": limit,
                "img/s (median)": s.median, "img/s (min-max)": f"{s.low:.2f}-{s.high:.2f}",
                "speed-up": speed, "speed-up / FLOPs ratio": speed / limit,
            })
        env = measure.environment("cpu", "fp32")
        title = f"{args.model} {args.image_size}px, batch {bs}, fp32, {rounds} interleaved rounds"
        md = measure.write_results(os.path.join(args.out, f"tome_speed_b{bs}{'_quick' if args.quick else ''}"), rows,
                                 env, list(rows[0]), title)
        print(md)


if __name__ == "__main__":
    main()
