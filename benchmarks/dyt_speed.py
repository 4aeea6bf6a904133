"""DyT speed: every dispatch variant at activation ~0.5 vs the same model with every token active.

For each variant (MLP, Attn, Attn-MLP, Layer Dispatch, MLP Dispatch with the MoE-adapter, and
DyT + ToMe) one deployed model (``tokentune.deploy``: inactive tokens really skip) is timed
twice: as it is, and with every token active (``dyt_complete=True``: the same model and weights,
nothing skipped). A plain timm ViT of the same size is timed as well. All models run side by side
in one process, in interleaved rounds with rotating order, on the same random batch
(``tokentune.measure_throughput``). FLOPs are counted on the real forward
(``tokentune.count_flops``, attention included), so they follow the activation of the batch.

Activation ~0.5 without training: the models are untrained, so :func:`tokentune.dyt.calibrate_activation`
shifts every dispatcher's bias (block by block, in one forward) until it activates half of the
patch tokens of the very batch that is timed (the bench's seeded batch, regenerated here); the
table reports the activation actually measured on it. Adapters get non-zero weights so they do
their real work.

Goals (MLP Dispatch at 50%, ViT-B/16, 224, fp32, CPU): speed-up >= 0.95 x FLOPs ratio at batch 16
and >= 1.35x at batch 1. Prints markdown tables and writes ``benchmarks/results/dyt_speed_b<batch>``.

    python benchmarks/dyt_speed.py                      # ViT-B/16, 224, fp32, batch 16 and 1
    python benchmarks/dyt_speed.py --quick              # tiny width, seconds (checks the script runs)
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from tokentune import create_model, deploy
from tokentune.core.flops import count_flops
from tokentune.methods import dyt
from tokentune.timing import measure_throughput
from tokentune.tools import measure

# name -> (method, create_model options)
VARIANTS = {
    "MLP Dispatch": ("dyt", dict(dyt_variant="mlp")),
    "Attn Dispatch": ("dyt", dict(dyt_variant="attn")),
    "Attn-MLP Dispatch": ("dyt", dict(dyt_variant="attn_mlp")),
    "Layer Dispatch": ("dyt", dict(dyt_variant="layer")),
    "MLP Dispatch, MoE-adapter x4": ("dyt", dict(dyt_variant="mlp", dyt_experts=4)),
    "DyT + ToMe (r={r})": ("dyt+tome", dict(dyt_variant="mlp")),
}
GOALS = {("MLP Dispatch", 1): "speed-up >= 1.35x", ("MLP Dispatch", 16): "speed-up >= 0.95 x FLOPs ratio"}


class AllActive(nn.Module):
    """The same DyT model with every token active (the complete model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)     # a fresh wrapper must not flip the model into training mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, dyt_complete=True)


def bench_images(batch_size: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """The batch ``measure_throughput(..., seed=seed)`` times (same generator, same draw)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=g)


def build(model_name: str, image_size: int, tome_r: int, quick: bool):
    """Deployed DyT models sharing one backbone, plus the plain timm ViT."""
    kw = dict(img_size=image_size)
    if quick:
        kw.update(embed_dim=64, depth=12, num_heads=2)
    torch.manual_seed(0)
    plain = deploy(create_model(model_name, method="linear", num_classes=100, **kw))
    backbone = {k: v for k, v in plain.state_dict().items()}
    models = {}
    for name, (method, options) in VARIANTS.items():
        name = name.format(r=tome_r)
        extra = dict(tome_r=tome_r) if "tome" in method else {}
        torch.manual_seed(0)
        model = create_model(model_name, method=method, num_classes=100, **options, **extra, **kw)
        missing = model.load_state_dict(backbone, strict=False).missing_keys
        assert all("adapter" in k or "dispatcher" in k for k in missing), missing
        with torch.no_grad():   # adapters do real work (their cost does not depend on the values)
            for n, p in model.named_parameters():
                if "adapter" in n and p.dim() > 1:
                    p.normal_(0, 0.02)
        models[name] = deploy(model)
    return plain, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-sizes", default="16,1", help="comma-separated batch sizes")
    ap.add_argument("--rate", type=float, default=0.5, help="activation rate the dispatchers are calibrated to")
    ap.add_argument("--tome-r", type=int, default=8, help="ToMe tokens merged per block in DyT + ToMe")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny width, few rounds: checks the script runs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, warmup = (2, 1) if args.quick else (args.rounds, args.warmup)
    plain, models = build(args.model, args.image_size, args.tome_r, args.quick)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        images = bench_images(bs, args.image_size)
        rates = {n: dyt.calibrate_activation(m, images, args.rate) for n, m in models.items()}
        flops = {n: (count_flops(m, images) / bs, count_flops(AllActive(m), images) / bs)
                 for n, m in models.items()}
        plain_flops = count_flops(plain, images) / bs
        timed = {"timm ViT (dense)": plain}
        for n, m in models.items():
            timed[n] = m
            timed[f"{n} [all active]"] = AllActive(m)
        stats = measure_throughput(timed, batch_size=bs, image_size=args.image_size, rounds=rounds,
                                         warmup=warmup, seed=0)
        base = stats["timm ViT (dense)"]
        rows = [{"model": "timm ViT (dense)", "activation": 1.0, "GMACs": plain_flops / 2e9,
                 "GMACs all active": plain_flops / 2e9, "FLOPs ratio": 1.0, "img/s": base.median,
                 "img/s (min-max)": f"{base.low:.2f}-{base.high:.2f}", "img/s all active": base.median,
                 "speed-up": 1.0, "speed-up / FLOPs ratio": 1.0, "vs timm ViT": 1.0, "goal": ""}]
        for n in models:
            dyn, full = stats[n], stats[f"{n} [all active]"]
            ratio = flops[n][1] / flops[n][0]
            speed = dyn.median / full.median
            rows.append({
                "model": n, "activation": rates[n], "GMACs": flops[n][0] / 2e9, "GMACs all active": flops[n][1] / 2e9,
                "FLOPs ratio": ratio, "img/s": dyn.median, "img/s (min-max)": f"{dyn.low:.2f}-{dyn.high:.2f}",
                "img/s all active": full.median, "speed-up": speed, "speed-up / FLOPs ratio": speed / ratio,
                "vs timm ViT": dyn.median / base.median, "goal": GOALS.get((n, bs), ""),
            })
        env = measure.environment("cpu", "fp32")
        title = (f"DyT {args.model} {args.image_size}px, batch {bs}, fp32, activation {args.rate:g} "
                 f"(calibrated), {rounds} interleaved rounds")
        prefix = os.path.join(args.out, f"dyt_speed_b{bs}{'_quick' if args.quick else ''}")
        print(measure.write_results(prefix, rows, env, list(rows[0]), title))


if __name__ == "__main__":
    main()
