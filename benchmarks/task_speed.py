"""Speed per clip and per segmentation image: DyT and ToMe against the dense model, in one process.

Two ``tokentune bench`` measurements (:func:`tokentune.tools.bench.measure`: FLOPs of the deployed
models on the timed inputs, attention counted; interleaved throughput rounds with rotating order):

* video: ViT-B/16 at 224, clips of 8 frames, attentive pooling: LoRA (dense: every frame token
  through every block), DyT (MLP Dispatch, bottleneck 64, dispatchers calibrated to 50% of the
  tokens of the timed clips), LoRA + ToMe (r = 16 per block but the last, 10: ToMe's "low"), DyT +
  ToMe (r = 8);
* segmentation: ViT-B/16 at 512 (1025 tokens), UperNet with 768 channels, one forward per
  512 x 512 image: LoRA (dense), DyT at 50%, LoRA + ToMe with a schedule for half the backbone's
  FLOPs (``flops:2.0``; merged tokens are unmerged for the head), DyT + ToMe (r = 32).

Random weights (speed does not depend on them). Writes ``benchmarks/results/task_speed_*``.

    python benchmarks/task_speed.py                # ViT-B/16 (minutes on a 2-core CPU)
    python benchmarks/task_speed.py --quick        # tiny width, seconds (checks the script runs)
"""
from __future__ import annotations

import argparse
import os

import torch

from tokentune.tools.bench import BenchSettings, markdown, measure, parse_config, write_outputs

VIDEO = ["lora:label=dense (LoRA merged)", "dyt:dyt_bottleneck=64,rate=0.5,label=DyT r=0.5",
         "lora+tome:tome_r=16x11,10,label=LoRA + ToMe low",
         "dyt+tome:dyt_bottleneck=64,tome_r=8,rate=0.5,label=DyT r=0.5 + ToMe r=8"]
SEGMENTATION = ["lora:label=dense (LoRA merged)", "dyt:dyt_bottleneck=64,rate=0.5,label=DyT r=0.5",
                "lora+tome:tome_r=flops:2.0,label=LoRA + ToMe flops:2.0",
                "dyt+tome:dyt_bottleneck=64,tome_r=32,rate=0.5,label=DyT r=0.5 + ToMe r=32"]
QUICK = dict(embed_dim=48, depth=12, num_heads=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny width (checks the script, numbers mean nothing)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=["video", "segmentation"], default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timm = dict(QUICK) if args.quick else {}
    runs = {"video": (VIDEO, 224, {"video_frames": 8}),
            "segmentation": (SEGMENTATION, 512, {"segmentation_channels": 64 if args.quick else 768})}
    for task, (configs, size, options) in runs.items():
        if args.only and task != args.only:
            continue
        settings = BenchSettings(model="vit_base_patch16_224", image_size=size, batch_size=args.batch_size,
                                 rounds=args.rounds, warmup=1, latency=False, memory=False, train=False,
                                 num_classes=400 if task == "video" else 150, timm_kwargs=timm, task=task,
                                 task_options=options)
        result = measure([parse_config(c) for c in configs], settings,
                         progress=lambda text: print(text, flush=True))
        print(markdown(result))
        write_outputs(result, args.out, f"task_speed_{task}" + ("_quick" if args.quick else ""))


if __name__ == "__main__":
    main()
