"""Cost of seeding every sample's augmentation (tokentune.engine.seeding) against the transform itself.

Times timm's training transform (``--augment timm``: random-resized crop, flip, RandAugment
``rand-m9-mstd0.5``, random erasing 0.25, normalise) on one RGB image, plain and under
``seeded_generators(sample_seed(seed, epoch, index))`` as the training loader runs it with
``num_workers=0`` (the generators' states saved and restored around it; workers skip that), in
interleaved rounds in one process; prints per-sample medians of the process's CPU time
(``time.process_time``: a busy shared machine stretches wall time, not this) and their ratio.

    python benchmarks/seeded_augment.py --size 224 --rounds 7 --samples 200
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from tokentune.engine.seeding import sample_seed, seeded_generators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)                  # as in a loader worker
    transform = create_transform(args.size, is_training=True, auto_augment="rand-m9-mstd0.5", re_prob=0.25,
                                 interpolation="bicubic")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size + 32, args.size + 48, 3), dtype=np.uint8))

    def plain(i):
        return transform(image)

    def seeded(i):
        with seeded_generators(sample_seed(0, 1, i)):
            return transform(image)

    def seeding_only(i):
        with seeded_generators(sample_seed(0, 1, i)):
            return None

    times = {"plain": [], "seeded": [], "seeding only": []}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain), ("seeded", seeded), ("seeding only", seeding_only)):
            tic = time.process_time()
            for i in range(args.samples):
                fn(i)
            times[name].append((time.process_time() - tic) / args.samples * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{platform.processor() or platform.machine()}, 1 thread, {os.cpu_count()} cpus, image {args.size}, "
          f"{args.rounds} interleaved rounds of {args.samples} samples; load {os.getloadavg()[0]:.1f}")
    for k, v in med.items():
        print(f"{k:>13}: {v:8.1f} us CPU/sample")
    print(f"seeded / plain: {med['seeded'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
