"""Token-reduction baselines: deployed speed-up against their own FLOPs ratio.

Deployed LoRA (merged = the plain timm ViT with fused SDPA) beside deployed LoRA + EViT (keep 0.7,
fused token, blocks 3/6/9), LoRA + DynamicViT (rho 0.7, stages before blocks 3/6/9), LoRA +
DiffRate (the reference's ImageNet rates at 8.7 and 11.5 GFLOPs) and, for scale, LoRA + ToMe low:
side by side in one process, interleaved rounds, the same random batch, the same LoRA weights.
The goal: each baseline's speed-up reaches >= 0.95x its FLOPs ratio (the speed-up FLOPs allow).

Prints a markdown table and writes benchmarks/results/baselines_speed_b<batch>.{md,json}.

    python benchmarks/baselines_speed.py                  # ViT-B/16, 224, fp32, batch 16
    python benchmarks/baselines_speed.py --compile        # also torch.compile of each deployed model
    python benchmarks/baselines_speed.py --quick          # tiny width, seconds (checks the script)
"""
from __future__ import annotations

import argparse
import os

import torch

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.fileio import atomic_write_json, atomic_write_text
from tokentune.timing import measure_throughput
from tokentune.tools import measure

BASELINE = "LoRA (merged, timm SDPA)"
ROWS = {
    "LoRA + EViT (keep 0.7)": ("lora+evit", dict(evit_keep_rate=0.7)),
    "LoRA + DynamicViT (rho 0.7)": ("lora+dynamicvit", dict(dynamicvit_keep_rate=0.7)),
    "LoRA + DiffRate (8.7 GFLOPs rates)": ("lora+diffrate", dict(diffrate_preset="deit_base:8.7")),
    "LoRA + DiffRate (11.5 GFLOPs rates)": ("lora+diffrate", dict(diffrate_preset="deit_base:11.5")),
    "LoRA + ToMe low": ("lora+tome", dict(tome_r="low")),
}
GOAL = 0.95


def loadavg() -> str:
    """The 1/5/15-minute load averages (other processes share the CPU: quoted beside every timing)."""
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else ""


def build(model_name: str, quick: bool, compiled: bool):
    kw = dict(img_size=224)
    if quick:
        kw.update(embed_dim=64, num_heads=2)
    torch.manual_seed(0)
    lora = create_model(model_name, method="lora", num_classes=100, **kw)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)           # a non-zero update, merged by deploy
    models = {BASELINE: deploy(lora)}
    for label, (method, options) in ROWS.items():
        torch.manual_seed(0)
        model = create_model(model_name, method=method, num_classes=100, **kw, **options)
        missing, unexpected = model.load_state_dict(lora.state_dict(), strict=False)
        assert not unexpected and all(".reduce.predictor." in k for k in missing), (missing, unexpected)
        models[label] = deploy(model)
    if compiled:
        for label in list(models):
            models[label + " compiled"] = torch.compile(models[label])
    return models


@torch.no_grad()
def tokens_out(model, images) -> int:
    if hasattr(model, "tokentune"):
        return int(model(images, return_tokens=True)[1].shape[1])
    return int(model.forward_features(images).shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of every deployed model")
    ap.add_argument("--quick", action="store_true", help="tiny width, 2 rounds: checks the script runs")
    ap.add_argument("--tag", default="", help="suffix of the result files' names (e.g. run2): runs do not overwrite each other")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    models = build(args.model, args.quick, args.compile)
    probe = torch.randn(1, 3, 224, 224)
    eager = [n for n in models if not n.endswith(" compiled")]
    flops = {n: count_flops(models[n], probe) for n in eager}
    tokens = {n: tokens_out(models[n], probe) for n in eager}
    for n in models:
        if n.endswith(" compiled"):
            flops[n], tokens[n] = flops[n[: -len(" compiled")]], tokens[n[: -len(" compiled")]]
    load_before = loadavg()
    stats = measure_throughput(models, batch_size=args.batch_size, image_size=224, rounds=rounds,
                               warmup=1 if args.quick else 2)
    rows = []
    for n, s in stats.items():
        limit = flops[BASELINE] / flops[n]
        speed = s.median / stats[BASELINE].median
        rows.append({"model": n, "tokens (after last block)": tokens[n], "GMACs": flops[n] / 2e9, "FLOPs ratio": limit,
                     "img/s (median)": s.median, "img/s (min-max)": f"{s.low:.2f}-{s.high:.2f}", "speed-up": speed,
                     "speed-up / FLOPs ratio": speed / limit,
                     f"meets >= {GOAL}x": "" if n == BASELINE else ("yes" if speed / limit >= GOAL else "no")})
    env = measure.environment(torch.device("cpu"), "fp32")
    env["load before"], env["load after"] = load_before, loadavg()
    title = (f"Token-reduction baselines vs merged LoRA: {args.model}, 224 px, batch {args.batch_size}, fp32, "
             f"{torch.get_num_threads()} threads, {rounds} interleaved rounds" + (" [QUICK]" if args.quick else ""))
    md = (f"## {title}\n\nEnvironment: {', '.join(f'{k}={v}' for k, v in env.items())}\n\n"
          f"{measure.markdown_table(rows, list(rows[0]))}\n")
    print(md)
    os.makedirs(args.out, exist_ok=True)
    name = f"baselines_speed_b{args.batch_size}" + (f"_{args.threads}thread" if args.threads else "")
    name += (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    prefix = os.path.join(args.out, name)
    atomic_write_text(prefix + ".md", md)
    atomic_write_json(prefix + ".json", {"title": title, "environment": env, "rows": rows, "goal": GOAL})


if __name__ == "__main__":
    main()
