"""``tokentune demo``: the whole pipeline offline, on real images, in about a minute on a laptop CPU.

1. scikit-learn's handwritten digits (1,797 real 8x8 scans) are written as an image folder
   (``digits/pretrain`` with classes 0-4, ``digits/new`` with classes 5-9);
2. a tiny ViT (timm's ViT at 32x32 input, 4x4 patches: 64 patches + CLS) is pre-trained from
   scratch on digits 0-4 with ``tokentune.train`` (method ``full``): our stand-in for a
   pretrained backbone, obtained without any download;
3. the backbone is adapted to the held-back digits 5-9 with each method of :data:`ROWS` (linear
   probe, LoRA, LoRA + ToMe, PYRA, AdaptFormer-style adapters, DyT with the same adapters, and with
   ``rows="all"`` LoRA + EViT, LoRA + DynamicViT, LoRA + MCTF, LoRA + DiffRate with rates searched on the
   digits, VPT-deep, VPT-deep + PYRA, LoRA + DTEM, LoRA + PiToMe, LoRA + ToFu), through the same
   ``create_model -> train -> deploy -> evaluate`` path as real runs;
4. one table: test top-1 of the deployed model, trainable parameters, tokens per block, multiply-
   adds per image and throughput, measured side by side in one process on the same batch.

Everything is seeded; a second run reuses the pre-trained backbone from the cache if enabled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.deploy import deploy
from ..core.factory import create_model
from ..core.flops import count_flops
from ..core.method import get_method, parse_method
from ..core.params import count_parameters
from ..core.vit import num_input_tokens
from ..engine.config import TrainConfig
from ..engine.data import load_datasets, set_transforms
from ..engine.evaluate import evaluate
from ..engine.rundir import RunDir
from ..engine.training import train
from ..errors import TokenTuneError
from ..fileio import atomic_write
from ..timing import measure_throughput
from ..version import __version__

BACKBONE = "vit_tiny_patch16_224"   # timm's ViT-Ti architecture family, built at demo size below


@dataclass
class DemoRow:
    """One row of the demo table.

    Attributes:
        label: row label.
        method: method spec (e.g. ``lora+tome``).
        options: ``create_model`` options for this row.
        merge: add the demo's ToMe schedule (``tome_r``) to the options.
        deploy: options of :func:`tokentune.deploy` for this row (e.g. DyT's static-shape execution).
        reuse: label of an earlier row whose trained model this row deploys (no training of its own):
            the same weights deployed another way.
        extra: a row of ``rows="all"`` only (the papers' other baselines and prompt tuning), to keep
            the default demo short.
        search: options of the search of the row's method (its ``Method.search_config``, e.g.
            DiffRate's FLOPs target): before training, the method's ``search`` hook finds the
            method's options on the demo's training data and the row trains with them.
        search_from: label of an earlier row whose trained model the search starts from (a model
            whose head knows digits 5-9).
        rate_of: a method of the spec whose rate option (``Method.rate_option``) gets the demo's merge
            schedule (``tome_r``): the row removes as many tokens per block as the ToMe rows.
    """

    label: str
    method: str
    options: Dict[str, Any] = field(default_factory=dict)
    merge: bool = False
    deploy: Dict[str, Any] = field(default_factory=dict)
    reuse: Optional[str] = None
    extra: bool = False
    search: Dict[str, Any] = field(default_factory=dict)
    search_from: Optional[str] = None
    rate_of: Optional[str] = None


# LoRA on every linear layer of the blocks: at this width (64) qkv alone is too little capacity
_LORA = {"lora_rank": 8, "lora_targets": ["qkv", "proj", "fc1", "fc2"]}

#: The rows of the table; add a method by appending a DemoRow.
ROWS: List[DemoRow] = [
    DemoRow("linear probe", "linear"),
    DemoRow("LoRA r=8", "lora", dict(_LORA)),
    DemoRow("LoRA r=8 + ToMe", "lora+tome", dict(_LORA), merge=True),
    DemoRow("PYRA (LoRA r=8 + ToMe)", "pyra", dict(_LORA), merge=True),
    DemoRow("AdaptFormer (adapter 16)", "adapter", {"adapter_bottleneck": 16}),
    DemoRow("DyT (adapter 16, r=0.5)", "dyt", {"dyt_bottleneck": 16, "dyt_target_rate": 0.5}),
    DemoRow("DyT, static shapes (capacity 1.0)", "dyt", deploy={"dyt_execution": "capacity", "dyt_capacity": 1.0},
            reuse="DyT (adapter 16, r=0.5)"),
    DemoRow("DyT, static shapes (capacity 1.25)", "dyt", deploy={"dyt_execution": "capacity", "dyt_capacity": 1.25},
            reuse="DyT (adapter 16, r=0.5)"),
    DemoRow("LoRA r=8 + EViT", "lora+evit", dict(_LORA), extra=True),
    # the predictors' input detached: with LoRA at the predictors' learning rate the keep decisions' gradient
    # through it threw training to chance (the reference trains the backbone at 1/100 of the predictors' rate)
    DemoRow("LoRA r=8 + DynamicViT", "lora+dynamicvit", {**_LORA, "dynamicvit_detach_input": True}, extra=True),
    # DiffRate's rates, searched on the demo's 448 training digits from the trained LoRA row at the ToMe rows'
    # FLOPs (58% of the unreduced model's), then fixed for training and deployment. 64 patches: the search's
    # candidate counts step by 2 (granularity). The FLOPs term (GMACs - target)^2 is ~1e-6 smaller than on ViT-B,
    # hence the weight 1e7 and a learning rate of 0.1 for the rate logits: the search's 7 steps per epoch
    # against the reference's ~600.
    DemoRow("LoRA r=8 + DiffRate (searched)", "lora+diffrate", dict(_LORA), extra=True, search_from="LoRA r=8",
            search=dict(target_share=0.58, epochs=4, batch_size=64, lr=0.1, min_lr=0.01, flops_weight=1e7,
                        granularity=2)),
    # MCTF at the ToMe rows' FLOPs: mctf_r="flops:1.714" on the demo's 65 tokens gives this schedule (8.81 MMACs
    # against ToMe's 8.83), written out so that other token counts still build; trained with MCTF's loss
    DemoRow("LoRA r=8 + MCTF", "lora+mctf", {**_LORA, "mctf_r": [0, 25, 19, 10]}, extra=True),
    DemoRow("VPT-deep (10 prompts)", "vpt", {"vpt_deep": True, "vpt_tokens": 10}, extra=True),
    DemoRow("VPT-deep + PYRA", "vpt+pyra", {"vpt_deep": True, "vpt_tokens": 10}, merge=True, extra=True),
    # DTEM: the ToMe rows' schedule on a learned embedding, trained with LoRA by soft grouping
    DemoRow("LoRA r=8 + DTEM", "lora+dtem", dict(_LORA), merge=True, extra=True),
    # the training-free mergers trained with LoRA at the ToMe rows' tokens per block (equal FLOPs up to the matching)
    DemoRow("LoRA r=8 + PiToMe", "lora+pitome", dict(_LORA), extra=True, rate_of="pitome"),
    DemoRow("LoRA r=8 + ToFu", "lora+tofu", dict(_LORA), extra=True, rate_of="tofu"),
    # FPET merges once, 65 -> 33 tokens; block 1 is the earliest it can (fpet_r_layer=0 is "off"): ~68% of the MACs
    DemoRow("LoRA r=8 + FPET (block 1)", "lora+fpet", {**_LORA, "fpet_r_layer": 1}, extra=True),
    DemoRow("AdaptFormer (adapter 16) + FPET (block 1)", "adapter+fpet", {"adapter_bottleneck": 16, "fpet_r_layer": 1},
            extra=True),
]


@dataclass
class DemoConfig:
    """Options of the offline demo.

    Attributes:
        pretrain_epochs: epochs of pre-training the tiny ViT on digits 0-4.
        epochs: epochs of adapting it to digits 5-9, for every method.
        lr: peak learning rate of the adaptation (pre-training uses 3e-3).
        batch_size: training batch size.
        patch_size: ViT patch size on the 32x32 input (4: 64 patches + CLS = 65 tokens).
        embed_dim: ViT width.
        depth: ViT blocks.
        tome_r: ToMe merge schedule (tokens merged in each block) of the merging rows.
        bench_batch: images per forward pass in the throughput measurement.
        bench_rounds: timed forward passes per model (interleaved across models; median reported).
        threads: torch CPU threads (default 1: the demo's tiny matrices gain little from more threads,
            and one thread keeps the run fast and its timings stable on a busy machine; 0: torch's
            default).
        seed: seed of the data split, initialisation and training order.
        cache: reuse the pre-trained tiny ViT from the cache (``$XDG_CACHE_HOME/tokentune`` or
            ``~/.cache/tokentune``) and store it there after pre-training (a few hundred KB).
        workdir: where the digit images and run directories go (default: a temporary folder,
            removed at the end).
        progress: print training progress lines.
        rows: ``"default"``: the seed papers' methods and their deployment forms (linear probe, LoRA,
            LoRA + ToMe, PYRA, AdaptFormer, DyT, DyT with static shapes); ``"all"``: also the papers'
            other baselines and prompt tuning (EViT, DynamicViT, DiffRate with rates searched on the
            digits at the ToMe rows' FLOPs, VPT-deep, VPT-deep + PYRA, MCTF, DTEM, LoRA + PiToMe and LoRA + ToFu at
            the ToMe rows' tokens per block; about three minutes more).
    """

    pretrain_epochs: int = 8
    epochs: int = 20
    lr: float = 1e-2
    batch_size: int = 32
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    tome_r: Sequence[int] = (16, 12, 8, 6)
    bench_batch: int = 256
    bench_rounds: int = 10
    threads: int = 1
    seed: int = 0
    cache: bool = True
    workdir: Optional[str] = None
    progress: bool = False
    rows: str = "default"

    def __post_init__(self) -> None:
        if self.rows not in ROW_SETS:
            raise TokenTuneError(f"demo rows must be one of {', '.join(ROW_SETS)}, got {self.rows!r}")


ROW_SETS = ("default", "all")


# ----------------------------------------------------------------------------- data
def write_digits(root: str, seed: int = 0) -> Dict[str, str]:
    """Write scikit-learn's digits as two image folders; returns their paths.

    ``pretrain``: digits 0-4, 80 % train / 20 % test. ``new``: digits 5-9, 50 % / 50 %.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TokenTuneError("the demo needs scikit-learn for its bundled digits; pip install 'tokentune[demo]'") from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    paths = {}
    for task, classes, train_share in (("pretrain", range(0, 5), 0.8), ("new", range(5, 10), 0.5)):
        base = os.path.join(root, task)
        for c in classes:
            idx = np.flatnonzero(digits.target == c)
            idx = idx[rng.permutation(len(idx))]
            cut = int(round(train_share * len(idx)))
            for split, part in (("train", idx[:cut]), ("test", idx[cut:])):
                folder = os.path.join(base, split, str(c))
                os.makedirs(folder, exist_ok=True)
                for i in part:
                    Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"{i:04d}.png"))
        paths[task] = base
    return paths


class _Memo(torch.utils.data.Dataset):
    """Decode and transform every image once (the transform is deterministic: no augmentation)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.items = [None] * len(dataset)
        for attr in ("name", "group", "describe", "num_classes", "classes"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if self.items[i] is None:
            self.items[i] = self.dataset[i]
        return self.items[i]


def _load_folder(path: str, model):

    train_ds, test_ds = load_datasets(image_folder=path, train_split="train", test_split="test")
    set_transforms([train_ds, test_ds], model)
    return _Memo(train_ds), _Memo(test_ds)


# ----------------------------------------------------------------------------- measurement
def count_macs(model: nn.Module, images: torch.Tensor) -> float:
    """Multiply-adds per image, attention included."""
    return count_flops(model, images) / 2 / images.shape[0]


def _token_path(model: nn.Module, images: torch.Tensor) -> str:

    with torch.inference_mode():
        _, tokens = model.eval()(images[:2], return_tokens=True)
    first = num_input_tokens(model)
    last = tokens.shape[1]
    return f"{first} -> {last}" if last != first else f"{first}"


# ----------------------------------------------------------------------------- pipeline
@dataclass
class DemoSetup:
    """What every adaptation of the demo starts from (:func:`prepare_demo`).

    Attributes:
        folders: ``{"pretrain": ..., "new": ...}`` image folders (digits 0-4 and 5-9).
        backbone: the pre-trained tiny ViT's weights file.
        arch: the ``create_model`` keywords of the tiny ViT.
        num_patches: patch tokens per image.
        train, test: the digits 5-9 splits (decoded once, loaded on first use).
    """

    folders: Dict[str, str]
    backbone: str
    arch: Dict[str, Any]
    num_patches: int
    train: Any = None
    test: Any = None


@dataclass
class Adapted:
    """One method adapted to digits 5-9 (:func:`adapt`).

    Attributes:
        model: the trained model (training-time form).
        deployed: ``tokentune.deploy(model)`` (LoRA merged, DyT skipping).
        top1: test top-1 (%) of the deployed model on the held-out digits 5-9.
        trainable: trainable parameters, head included.
        train_s: training time in seconds.
        history: one record per epoch (training loss and the method's logged terms).
    """

    model: nn.Module
    deployed: nn.Module
    top1: float
    trainable: int
    train_s: float
    history: List[Dict[str, Any]] = field(default_factory=list)


def _cache_path(cfg: DemoConfig, arch: Dict[str, Any]) -> str:

    key = json.dumps({"arch": arch, "epochs": cfg.pretrain_epochs, "seed": cfg.seed, "bs": cfg.batch_size,
                      "v": __version__, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokentune", "demo", f"vit-digits-{digest}.safetensors")


def pretrained_backbone(cfg: DemoConfig, arch: Dict[str, Any], folder: str, workdir: str, out, log,
                        steps: int) -> str:
    """The demo's "pretrained" tiny ViT: pre-trained from scratch on digits 0-4 (``folder``), or taken from the
    cache; returns its weights file (in ``workdir``)."""
    tokens = (32 // cfg.patch_size) ** 2
    cache = _cache_path(cfg, arch) if cfg.cache else None
    backbone_file = os.path.join(workdir, "pretrained-digits-0-4.safetensors")
    what = (f"a timm ViT (32x32 input upscaled bicubic, {cfg.patch_size}x{cfg.patch_size} patches = {tokens} "
            f"patch tokens + CLS, width {cfg.embed_dim}, depth {cfg.depth}, average pooling)")
    if cache and os.path.isfile(cache):
        shutil.copyfile(cache, backbone_file)
        out(f"[1/{steps}] {what} pre-trained on digits 0-4: taken from the cache {cache}")
        return backbone_file
    torch.manual_seed(cfg.seed)
    base = create_model(BACKBONE, method="full", num_classes=5, pretrained=False, **arch)
    pre_train, pre_test = _load_folder(folder, base)
    pre_cfg = TrainConfig(epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size, lr=3e-3, min_lr=1e-5,
                          warmup_epochs=1, warmup_lr=1e-6, weight_decay=0.05, eval_every=0, num_workers=0,
                          seed=cfg.seed)
    tic = time.perf_counter()
    result = train(base, pre_train, pre_test, pre_cfg, out_dir=os.path.join(workdir, "runs", "pretrain"),
                   progress=False, log=log)
    shutil.copyfile(RunDir(os.path.join(workdir, "runs", "pretrain")).weights, backbone_file)
    out(f"[1/{steps}] pre-trained {what} from scratch on {len(pre_train)} digits 0-4 in "
        f"{time.perf_counter() - tic:.0f} s: top-1 {result.top1:.1f}% on {len(pre_test)} held-out ones")
    if cache:
        atomic_write(cache, lambda tmp: shutil.copyfile(backbone_file, tmp))
    return backbone_file


def prepare_demo(cfg: DemoConfig, workdir: str, out: Callable[[str], None] = print, steps: int = 1) -> DemoSetup:
    """Write the digits under ``workdir`` and pre-train the tiny ViT on digits 0-4 (or take it from the
    cache): step 1 of the demo, shared by everything that adapts the demo's backbone.

    ``out`` receives one line per step (``steps``: the total shown as ``[1/steps]``).
    """
    arch = dict(img_size=32, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=max(1, cfg.embed_dim // 16), global_pool="avg")
    os.makedirs(workdir, exist_ok=True)
    folders = write_digits(os.path.join(workdir, "digits"), cfg.seed)
    where = "" if cfg.workdir else " (temporary; keep them with --workdir DIR)"
    out(f"tokentune demo: scikit-learn's 1,797 handwritten digits (8x8 scans) written as image folders "
        f"{folders['pretrain']} (digits 0-4) and {folders['new']} (digits 5-9){where}")
    backbone = pretrained_backbone(cfg, arch, folders["pretrain"], workdir, out, out if cfg.progress else None, steps)
    return DemoSetup(folders, backbone, arch, (32 // cfg.patch_size) ** 2)


def searched_options(row: DemoRow, model: nn.Module, data, log: Optional[Callable[[str], None]] = None
                     ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Run the search of ``row``'s method (its ``Method.search`` hook with ``row.search``'s options) on
    ``data`` from ``model`` (trained on ``data``'s labels); returns the ``create_model`` options it
    found (``<method>_<field>``) and the search's record."""
    methods = [m for m in parse_method(row.method) if m.search is not None]
    if len(methods) != 1:
        raise TokenTuneError(f"demo row {row.label!r} has search options, but {len(methods)} of the methods of "
                             f"{row.method!r} have a search; a search row needs exactly one")
    method = methods[0]
    record = method.search(model, data, method.search_config(**row.search), checkpoint=None, log=log)
    return {f"{method.name}_{k}": v for k, v in record["options"].items()}, record


def _rate_option(spec: str) -> str:
    """The option that takes a merging row's schedule: the rate option of the spec's method that has
    one (:attr:`Method.rate_option`, e.g. ``dtem_r``), else ToMe's ``tome_r``."""
    named = [f"{m.name}_{m.rate_option}" for m in parse_method(spec) if m.rate_option]
    return named[0] if named else "tome_r"


def adapt(setup: DemoSetup, row: DemoRow, cfg: DemoConfig, out_dir: Optional[str], seed: Optional[int] = None,
          log: Optional[Callable[[str], None]] = None, options: Optional[Dict[str, Any]] = None) -> Adapted:
    """Adapt the demo's backbone to digits 5-9 with ``row``'s method: ``create_model -> train ->
    deploy -> evaluate``, the run written to ``out_dir`` (None: no run directory).

    ``seed`` (default ``cfg.seed``) seeds the new layers' initialisation, the training order and
    the method's randomness (dropout, DyT's Gumbel noise); the data and the backbone stay those of
    ``cfg.seed``. ``options`` are added to the row's (e.g. what a search found).
    """
    seed = cfg.seed if seed is None else seed
    options = {**row.options, **(options or {})}
    if row.merge:
        options[_rate_option(row.method)] = list(cfg.tome_r)
    if row.rate_of:
        options[f"{row.rate_of}_{get_method(row.rate_of).rate_option}"] = list(cfg.tome_r)
    torch.manual_seed(seed)
    model = create_model(BACKBONE, method=row.method, num_classes=5, pretrained=setup.backbone,
                         head_init_std=0.01, **{**setup.arch, **options})   # a row may override the head's pooling
    if setup.train is None:
        setup.train, setup.test = _load_folder(setup.folders["new"], model)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=1e-5, warmup_epochs=1,
                       warmup_lr=1e-6, weight_decay=1e-4, eval_every=0, num_workers=0, seed=seed)
    tic = time.perf_counter()
    result = train(model, setup.train, setup.test, tcfg, out_dir=out_dir, progress=False, log=log)
    train_s = time.perf_counter() - tic
    return _deployed(model, row, setup, train_s, result.history)


def _deployed(model: nn.Module, row: DemoRow, setup: DemoSetup, train_s: float, history) -> Adapted:
    trainable = count_parameters(model)["trainable"]
    fast = deploy(model, **row.deploy)
    top1 = evaluate(fast, setup.test, batch_size=256, amp="off", progress=False)["top1"]
    return Adapted(model, fast, top1, trainable, train_s, history)


def side_by_side_throughput(models: Dict[str, nn.Module], dataset, batch_size: int, rounds: int) -> Dict[str, float]:
    """Median samples per second of each model on one batch of ``dataset``'s first samples (repeated
    to ``batch_size``), timed in interleaved rounds in this process."""
    n = len(dataset)
    batch = torch.stack([dataset[i % n][0] for i in range(batch_size)])
    return {k: v.median for k, v in measure_throughput(models, images=batch, rounds=rounds).items()}


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")


def run_demo(cfg: Optional[DemoConfig] = None, rows: Optional[Sequence[DemoRow]] = None,
             out=print) -> List[Dict[str, Any]]:
    """Run the demo and print its table; returns one dict per row."""

    cfg = cfg or DemoConfig()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workdir = cfg.workdir or tempfile.mkdtemp(prefix="tokentune-demo-")
    log = out if cfg.progress else None
    todo = list(rows) if rows is not None else [r for r in ROWS if cfg.rows == "all" or not r.extra]
    steps = len(todo) + 2
    try:
        # -- 1. a "pretrained" backbone: pre-train on digits 0-4 (or take it from the cache)
        setup = prepare_demo(cfg, workdir, out, steps)

        # -- 2. adapt to digits 5-9 with every available method
        table = []
        deployed: Dict[str, nn.Module] = {}
        trained: Dict[str, Adapted] = {}
        for step, row in enumerate(todo, 2):
            if row.reuse is not None:
                if row.reuse not in trained:
                    raise TokenTuneError(f"demo row {row.label!r} reuses {row.reuse!r}, which is not an earlier row")
                done = _deployed(trained[row.reuse].model, row, setup, 0.0, trained[row.reuse].history)
                how = f"the {row.reuse} model deployed with {row.deploy}"
            else:
                found, searched = {}, ""
                if row.search:
                    if row.search_from not in trained:
                        raise TokenTuneError(f"demo row {row.label!r} searches from {row.search_from!r}, which is not an "
                                             "earlier row")
                    tic = time.perf_counter()
                    found, record = searched_options(row, trained[row.search_from].model, setup.train, log=log)
                    searched = (f"options searched in {time.perf_counter() - tic:.0f} s from the {row.search_from} model "
                                f"({', '.join(f'{k} {v}' for k, v in record['options'].items())}), then ")
                done = adapt(setup, row, cfg, os.path.join(workdir, "runs", _slug(row.label)), log=log, options=found)
                trained[row.label] = done
                how = (f"{searched}adapted to digits 5-9 in {done.train_s:.0f} s ({cfg.epochs} epochs on "
                       f"{len(setup.train)} images)")
            new_test = setup.test
            sample = torch.stack([new_test[i][0] for i in range(min(8, len(new_test)))])
            deployed[row.label] = done.deployed
            table.append({"label": row.label, "method": done.model.tokentune_spec["method"], "top1": done.top1,
                          "trainable": done.trainable, "tokens": _token_path(done.model, sample),
                          "macs": count_macs(done.deployed, sample), "train_s": done.train_s})
            out(f"[{step}/{steps}] {row.label}: {how}, top-1 {done.top1:.1f}% on {len(new_test)} held-out ones")

        # -- 3. throughput of the deployed models, side by side on one batch
        n = len(setup.test)
        speed = side_by_side_throughput(deployed, setup.test, cfg.bench_batch, cfg.bench_rounds)
        for rec in table:
            rec["img_per_s"] = speed[rec["label"]]
        out(f"[{steps}/{steps}] throughput of the deployed models measured side by side")
    finally:
        if cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        if cfg.threads:
            torch.set_num_threads(threads)

    out("")
    out(format_table(table, table[0]))
    out("")
    out(f"top-1: deployed model on the {n} held-out digits 5-9 (chance 20%). trainable params: including the "
        "5-class head. tokens: entering the first block -> leaving the last. MMACs: multiply-adds per image "
        "counted by torch's FLOP counter, attention included.")
    out(f"img/s: deployed models (LoRA merged into the weights), fp32, batch {cfg.bench_batch}, "
        f"{cfg.threads or threads} CPU thread(s), median of {cfg.bench_rounds} interleaved rounds in one process"
        + ("; rows with the same MMACs run the same network (the linear probe and merged LoRA), so their img/s "
           "differ by measurement noise." if len({r["macs"] for r in table}) < len(table) else "."))
    if rows is None and cfg.rows == "default":
        out("--rows all adds " + ", ".join(r.label for r in ROWS if r.extra) + ".")
    out(f"total time {time.perf_counter() - start:.0f} s")
    return table


def format_table(table: List[Dict[str, Any]], ref: Dict[str, Any]) -> str:
    header = ["method", "top-1 (5-9)", "trainable params", "tokens (in -> out)", "MMACs/img", "img/s"]
    rows = [[r["label"], f"{r['top1']:.1f}%", f"{r['trainable']:,}", r["tokens"],
             f"{r['macs'] / 1e6:.1f} ({100 * r['macs'] / ref['macs']:.0f}%)",
             f"{r['img_per_s']:,.0f} ({r['img_per_s'] / ref['img_per_s']:.2f}x)"] for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main() -> None:   # python -m tokentune.demo
    run_demo(DemoConfig())


if __name__ == "__main__":
    main()
