"""``tokentune demo --task segmentation|video``: the task pipelines offline, on real digit scans, in minutes.

Both start from the image demo's tiny ViT pre-trained on digits 0-4 (:func:`tokentune.tools.demo.
pretrained_backbone`; cached after the first run) and adapt it with LoRA, LoRA + ToMe and DyT through
the real ``create_model(task=...) -> train -> deploy -> evaluate`` path:

* segmentation: 32 x 32 scenes with one of scikit-learn's digits 5-9 (an 8 x 8 scan upscaled to
  24 x 24) at a random place on a noisy ground; the mask labels every stroke pixel with its digit
  (classes 1-5) and the rest as background (0), written as an image + mask folder; UperNet head;
  mIoU and pixel accuracy of the deployed models, multiply-adds and images/s per 32 x 32 image;
* video: clips of 8 frames in which a digit 5-9 (20 x 20) drifts one pixel per frame in a random
  direction over a noisy ground (class: the digit), written as frame folders in class folders; 4
  frames sampled 2 apart, attentive pooling; top-1, multiply-adds and clips/s per clip. (The ViT
  sees every frame alone and the pooling has no notion of frame order, as in the DyT reference,
  so a class that only the order of frames tells, such as a direction of motion, is out of reach.)

docs/tasks.md says which real data to use instead (ADE20K, Kinetics-400 / Something-Something v2).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..core.deploy import deploy
from ..core.factory import create_model
from ..core.flops import count_flops
from ..core.params import count_parameters
from ..core.task import get_task
from ..engine.config import TrainConfig
from ..engine.training import evaluator_of, train
from ..errors import TokenTuneError
from .demo import BACKBONE, DemoConfig, pretrained_backbone, side_by_side_throughput, write_digits

TASKS = ("segmentation", "video")
NEW_DIGITS = (5, 6, 7, 8, 9)         # the digits the image demo's backbone has not seen


@dataclass
class TaskDemoConfig:
    """Options of the task demos.

    Attributes:
        task: ``segmentation`` or ``video``.
        epochs: epochs of adapting the backbone, for every method.
        lr: peak learning rate.
        batch_size: training batch size (scenes or clips).
        train_samples: scenes or clips to train on.
        test_samples: scenes or clips to score.
        tome_r: ToMe merge schedule of the merging row.
        pretrain_epochs: epochs of pre-training the backbone on digits 0-4 (when not cached).
        patch_size: ViT patch size on the 32 x 32 input (4: 64 patches + CLS).
        bench_batch: samples per forward in the throughput measurement.
        bench_rounds: interleaved timed rounds.
        threads: torch CPU threads (0: torch's default).
        seed: seed of the data, initialisation and training order.
        cache: reuse the pre-trained tiny ViT of the image demo from the cache.
        workdir: where data and runs go (default: a temporary folder, removed at the end).
        progress: print training progress lines.
    """

    task: str = "segmentation"
    epochs: int = 10
    lr: float = 5e-3
    batch_size: int = 16
    train_samples: int = 320
    test_samples: int = 80
    tome_r: tuple = (16, 12, 8, 6)
    pretrain_epochs: int = 8
    patch_size: int = 4
    bench_batch: int = 32
    bench_rounds: int = 5
    threads: int = 1
    seed: int = 0
    cache: bool = True
    workdir: Optional[str] = None
    progress: bool = False


def _digits(size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TokenTuneError("the demo needs scikit-learn for its bundled digits; pip install 'tokentune[demo]'") from None
    from PIL import Image

    digits = load_digits()
    scans = [np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR))
             for im in digits.images]
    return np.stack(scans), digits.target


def write_digit_scenes(root: str, n_train: int, n_test: int, seed: int = 0, size: int = 24,
                       digits: Sequence[int] = (5, 6, 7, 8, 9)) -> str:
    """Scenes of one digit scan of ``digits`` (upscaled to ``size``) at a random place on a noisy
    32 x 32 ground and their masks (stroke pixels: 1 + the digit's position in ``digits``, else 0) as
    ``<root>/{train,test}/{images,masks}``."""
    from PIL import Image

    scans, labels = _digits(size)
    keep = np.isin(labels, list(digits))
    scans, labels = scans[keep], np.searchsorted(np.asarray(sorted(digits)), labels[keep])
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for i in range(n):
            image = rng.integers(0, 30, size=(32, 32), dtype=np.int32)
            mask = np.zeros((32, 32), dtype=np.uint8)
            k = int(rng.integers(len(scans)))
            y, x = (int(v) for v in rng.integers(0, 32 - size + 1, size=2))
            image[y:y + size, x:x + size] = np.maximum(image[y:y + size, x:x + size], scans[k])
            mask[y:y + size, x:x + size][scans[k] > 80] = labels[k] + 1
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).convert("RGB").save(
                os.path.join(root, split, "images", f"{i:04d}.png"))
            Image.fromarray(mask, "L").save(os.path.join(root, split, "masks", f"{i:04d}.png"))
    return root


def write_moving_digits(root: str, n_train: int, n_test: int, frames: int = 8, seed: int = 0, size: int = 20,
                        digits: Sequence[int] = (5, 6, 7, 8, 9)) -> str:
    """Clips of one digit scan of ``digits`` drifting 1 pixel per frame in a random direction over a
    noisy 32 x 32 ground (class: the digit), as frame folders ``<root>/{train,val}/<digit>/<clip>/``."""
    from PIL import Image

    scans, labels = _digits(size)
    rng = np.random.default_rng(seed)
    span = 32 - size - (frames - 1)                      # room left for the start after the drift
    for split, n in (("train", n_train), ("val", n_test)):
        for i in range(n):
            digit = digits[i % len(digits)]
            k = int(rng.choice(np.flatnonzero(labels == digit)))
            dy, dx = ((0, -1), (0, 1), (-1, 0), (1, 0))[int(rng.integers(4))]
            y0 = int(rng.integers(0, span + 1)) + (frames - 1 if dy < 0 else 0)
            x0 = int(rng.integers(0, span + 1)) + (frames - 1 if dx < 0 else 0)
            folder = os.path.join(root, split, str(digit), f"clip{i:04d}")
            os.makedirs(folder, exist_ok=True)
            noise = rng.integers(0, 40, size=(frames, 32, 32), dtype=np.int32)
            for t in range(frames):
                frame = noise[t].copy()
                y, x = y0 + dy * t, x0 + dx * t
                frame[y:y + size, x:x + size] = np.maximum(frame[y:y + size, x:x + size], scans[k])
                Image.fromarray(frame.clip(0, 255).astype(np.uint8)).convert("RGB").save(
                    os.path.join(folder, f"{t:03d}.png"))
    return root


ROWS = [("LoRA r=8", "lora", {"lora_rank": 8}, False), ("LoRA r=8 + ToMe", "lora+tome", {"lora_rank": 8}, True),
        ("DyT", "dyt", {}, False)]


def run_task_demo(cfg: TaskDemoConfig, out=print) -> List[Dict[str, Any]]:
    """Run a task demo and print its table; returns one dict per row."""
    if cfg.task not in TASKS:
        raise TokenTuneError(f"the task demos are {', '.join(TASKS)}; got {cfg.task!r}")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = DemoConfig(seed=cfg.seed, cache=cfg.cache, threads=cfg.threads, progress=cfg.progress,
                      pretrain_epochs=cfg.pretrain_epochs, patch_size=cfg.patch_size)
    arch = dict(img_size=32, patch_size=base.patch_size, embed_dim=base.embed_dim, depth=base.depth,
                num_heads=max(1, base.embed_dim // 16), global_pool="avg")
    workdir = cfg.workdir or tempfile.mkdtemp(prefix=f"tokentune-{cfg.task}-demo-")
    os.makedirs(workdir, exist_ok=True)
    log = out if cfg.progress else None
    steps = len(ROWS) + 2
    task = get_task(cfg.task)
    seg = cfg.task == "segmentation"
    options = ({"segmentation_channels": 32, "segmentation_scale": (32, 32)} if seg else
               {"video_frames": 4, "video_sampling_rate": 2, "video_test_clips": 1, "video_flip": 0.0})
    classes = len(NEW_DIGITS) + 1 if seg else len(NEW_DIGITS)
    table: List[Dict[str, Any]] = []
    try:
        folders = write_digits(os.path.join(workdir, "digits"), cfg.seed)
        data = (write_digit_scenes(os.path.join(workdir, "scenes"), cfg.train_samples, cfg.test_samples, cfg.seed)
                if seg else write_moving_digits(os.path.join(workdir, "clips"), cfg.train_samples, cfg.test_samples,
                                                seed=cfg.seed))
        what = ("scenes of a digit 5-9 with per-pixel digit masks (6 classes with the background)" if seg else
                "8-frame clips of a drifting digit 5-9 (5 classes)")
        out(f"tokentune demo --task {cfg.task}: {cfg.train_samples} + {cfg.test_samples} {what} made from "
            f"scikit-learn's digits in {data}")
        backbone = pretrained_backbone(base, arch, folders["pretrain"], workdir, out, log, steps)
        deployed: Dict[str, nn.Module] = {}
        tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=1e-5, warmup_epochs=1,
                           warmup_lr=1e-6, weight_decay=1e-4, eval_every=0, num_workers=0, seed=cfg.seed)
        for step, (label, method, opts, merge) in enumerate(ROWS, 2):
            torch.manual_seed(cfg.seed)
            model = create_model(BACKBONE, method=method, num_classes=classes, pretrained=backbone, task=cfg.task,
                                 head_init_std=0.01, **arch, **options, **opts,
                                 **({"tome_r": list(cfg.tome_r)} if merge else {}))
            train_ds, test_ds = task.load_data(image_folder=data, train_split="train",
                                               test_split="test" if seg else "val", num_classes=classes,
                                               options=options)
            task.set_transforms(train_ds, test_ds, model, tcfg)
            tic = time.perf_counter()
            train(model, train_ds, None, tcfg, progress=False, log=log)
            train_s = time.perf_counter() - tic
            fast = deploy(model)
            evaluate_fn, metric = evaluator_of(fast)
            scores = evaluate_fn(fast, test_ds, batch_size=64, amp="off", progress=False)
            sample = torch.stack([test_ds[i][0] for i in range(min(8, len(test_ds)))])
            macs = count_flops(fast, sample) / 2 / sample.shape[0]
            deployed[label] = fast
            table.append({"label": label, "method": fast.tokentune.spec["method"], metric: scores[metric],
                          "pixel_acc": scores.get("pixel_acc"), "trainable": count_parameters(model)["trainable"],
                          "macs": macs, "train_s": train_s})
            out(f"[{step}/{steps}] {label}: trained {cfg.epochs} epochs on {len(train_ds)} {'scenes' if seg else 'clips'} "
                f"in {train_s:.0f} s; {metric} {scores[metric]:.1f}% on {len(test_ds)} held-out ones")
        speed = side_by_side_throughput(deployed, test_ds, cfg.bench_batch, cfg.bench_rounds)
        for rec in table:
            rec["per_s"] = speed[rec["label"]]
        out(f"[{steps}/{steps}] throughput of the deployed models measured side by side")
    finally:
        if cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        if cfg.threads:
            torch.set_num_threads(threads)
    out("")
    out(_format(table, seg))
    unit = "32x32 image" if seg else "clip of 4 frames"
    out("")
    out(f"{'mIoU / pixel accuracy' if seg else 'top-1'}: deployed models on the held-out {'scenes' if seg else 'clips'}. "
        f"trainable params: with the task head. MMACs: multiply-adds per {unit} (torch's FLOP counter, attention "
        f"included). per s: fp32, batch {cfg.bench_batch}, {cfg.threads or threads} thread(s), median of "
        f"{cfg.bench_rounds} interleaved rounds in one process.")
    out(f"total time {time.perf_counter() - start:.0f} s")
    return table


def _format(table: List[Dict[str, Any]], seg: bool) -> str:
    ref = table[0]
    header = ["method", "mIoU" if seg else "top-1"] + (["pixel acc"] if seg else []) + \
        ["trainable params", "MMACs", "images/s" if seg else "clips/s"]
    rows = []
    for r in table:
        cells = [r["label"], f"{r['miou' if seg else 'top1']:.1f}%"] + ([f"{r['pixel_acc']:.1f}%"] if seg else [])
        cells += [f"{r['trainable']:,}", f"{r['macs'] / 1e6:.1f} ({100 * r['macs'] / ref['macs']:.0f}%)",
                  f"{r['per_s']:,.0f} ({r['per_s'] / ref['per_s']:.2f}x)"]
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
