"""``tokentune accelerate``: make a model you already have fast, on your data and your hardware.

Given a trained model (a run, an export, a peft adapter, a timm model) and a target (a measured
speed-up, GMACs, or a share of the model's FLOPs), every registered method that works without
training (``Method.training_free``, with a schedule option ``Method.rate_option`` that takes
``"flops:X"``) is a candidate; a model that already reduces tokens (DyT, PYRA, ...) keeps its own
reducer and only its schedule is searched, where it has one. The steps:

1. **Open** the source and deploy it: the *base*, the unmodified model every candidate is timed
   against (:func:`open_source`).
2. **Validation data**: transformed once and held in memory when it fits (:func:`load_validation`).
3. **Search** per method (:func:`search_method`): the analytic FLOPs target first (``flops:S`` for
   a speed-up ``S``), then each candidate is timed in interleaved rounds side by side with the
   base at the user's batch size and dtype on the validation images, and the next FLOPs target
   is corrected by the measured efficiency (speed-up / FLOPs ratio), as
   :func:`tokentune.methods.tome.speedup.schedule_for_speedup` does for ToMe alone, leaving out a
   timing the machine threw off (:func:`noisy`, :func:`estimate`). The base warms up in a session's
   first trial only. The gentlest candidate that reaches the target is kept (else the fastest one tried).
4. **Accuracy** on the validation data of each method's gentlest candidate that meets the target
   (of the closest one when none does; ``evaluate="within"``: of every one that meets it,
   :func:`to_evaluate`; at batch 32 on the CPU by default, :data:`CPU_EVAL_BATCH`), and the
   **choice**: the most accurate evaluated candidate within the target.
5. Optionally a short PEFT **recovery** (``finetune_epochs``) of the choice when its drop exceeds
   ``max_drop``, then the same measurement.
6. **Outputs** in ``out_dir``: the chosen deployed model as an export (:func:`tokentune.open_model`
   loads it; optional ONNX), ``accelerate.md`` (the table), ``accelerate.png`` (accuracy versus
   measured throughput), ``accelerate.json`` (everything measured, and where the time went:
   seconds and counts per phase).

The search state (every trial measured, every accuracy) is written to
``out_dir/accelerate-state.json`` after each step: a killed search run again with the same
settings continues where it stopped and takes the recorded measurements instead of timing again.
Accuracies and FLOPs are deterministic; timings are measurements of this machine (the choice of
a fresh search can differ where two candidates' speed-ups lie within the timing noise).

At most two models are in memory beside the original: the deployed base and one candidate (the
one built last, kept so that a trial's model is evaluated and exported without building it again).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..core.deploy import deploy
from ..core.factory import create_model, rebuild_options
from ..core.flops import count_flops
from ..core.hub import ADAPTER_CONFIG, resolve_location
from ..core.method import available_methods, get_method, parse_method
from ..core.vit import info_of
from ..engine.checkpoint import read_config
from ..engine.config import TrainConfig
from ..engine.data import build_transform
from ..engine.distributed import progress_enabled
from ..engine.evaluate import evaluate
from ..engine.rundir import CONFIG_NAME
from ..engine.training import train
from ..errors import TokenTuneError, error_line
from ..fileio import atomic_write_json, atomic_write_text
from ..timing import measure_throughput
from ..utils import jsonable
from .export import (
    OPEN_FILES,
    apply_preprocessing,
    export_deployed,
    is_export,
    load_deployed,
    open_model,
    preprocessing_of,
    read_deployed_config,
)
from .measure import environment, markdown_table
from .onnx import export_onnx
from .viz.tradeoff import TradeoffPoint, plot_tradeoff

STATE_NAME = "accelerate-state.json"
RECORD_NAME = "accelerate.json"
TABLE_NAME = "accelerate.md"
PICTURE_NAME = "accelerate.png"
ONNX_NAME = "model.onnx"
DTYPES = ("fp32", "bf16", "fp16")
#: which of a method's timed schedules are evaluated on the validation data (AccelerateConfig.evaluate)
EVALUATE = ("gentlest", "within")
#: validation sets up to this many bytes of transformed images are held in memory
CACHE_BYTES = 2 * 1024 ** 3
#: the table's top-1 and drop of a schedule that was timed but not evaluated
NOT_EVALUATED = "\u2013"
#: the gentlest FLOPs ratio a speed-up search tries (1.0 would be the unmodified model)
MIN_RATIO = 1.01
#: the default evaluation batch on the CPU: ViT-B/16 at 2 threads evaluated 3-17% faster per image
#: at batch 32 than at 256 (and 16 slower than both; BENCHMARKS.md, benchmarks/accelerate_eval_batch.py):
#: a batch of 256 images' activations is far beyond the caches
CPU_EVAL_BATCH = 32
#: the default evaluation batch on a GPU (larger batches fill it)
EVAL_BATCH = 256
#: a trial whose efficiency is this far off the others' and whose rounds disagree by as much is noisy
OUTLIER = 0.15


# ----------------------------------------------------------------------------- target and options
@dataclass(frozen=True)
class Target:
    """What the accelerated model must reach.

    Attributes:
        kind: ``"speedup"`` (measured throughput over the base's, e.g. 1.5), ``"gmacs"`` (at most
            this many multiply-adds per image, in billions) or ``"share"`` (at most this share of
            the base's FLOPs, e.g. 0.6).
        value: the number.
    """

    kind: str
    value: float

    def flops_ratio(self, base_gmacs: float) -> float:
        """The FLOPs ratio (base / candidate) the search starts from."""
        if self.kind == "speedup":
            return self.value
        return base_gmacs / self.value if self.kind == "gmacs" else 1.0 / self.value

    def met(self, row: Dict[str, Any], base_gmacs: float) -> bool:
        if self.kind == "speedup":
            return row["speedup"] >= self.value
        limit = self.value if self.kind == "gmacs" else self.value * base_gmacs
        return row["gmacs"] <= limit * (1 + 1e-6)

    def describe(self) -> str:
        return {"speedup": f"{self.value:g}x measured speed-up", "gmacs": f"at most {self.value:g} GMACs per image",
                "share": f"at most {self.value:g} of the model's FLOPs"}[self.kind]


def parse_target(target: Union[float, str, Target]) -> Target:
    """``1.5`` / ``"1.5x"`` / ``"speedup:1.5"`` (measured speed-up), ``"gmacs:8.7"``, ``"share:0.6"``."""
    if isinstance(target, Target):
        kind, value = target.kind, target.value
    elif isinstance(target, (int, float)) and not isinstance(target, bool):
        kind, value = "speedup", float(target)
    elif isinstance(target, str):
        text = target.strip().lower()
        kind, _, number = text.partition(":") if ":" in text else ("speedup", "", text.rstrip("x"))
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
    else:
        kind, value = "", float("nan")
    if kind not in ("speedup", "gmacs", "share") or not math.isfinite(value):
        raise TokenTuneError(f"invalid target {target!r}: give a speed-up (1.5 or '1.5x'), 'gmacs:G' or 'share:F' "
                             "(a share of the model's FLOPs)")
    if kind == "speedup" and not value > 1.0:
        raise TokenTuneError(f"a speed-up target must be above 1 (the model as it is runs at 1x), got {value:g}")
    if kind == "gmacs" and not value > 0:
        raise TokenTuneError(f"a GMACs target must be positive, got {value:g}")
    if kind == "share" and not 0.0 < value < 1.0:
        raise TokenTuneError(f"a FLOPs share target must be in (0, 1) (0.6 = 60% of the model's FLOPs), got {value:g}")
    return Target(kind, value)


@dataclass
class AccelerateConfig:
    """Options of :func:`accelerate` (the command line's ``--<field>``).

    Attributes:
        batch_size: images per timed forward (time at the batch size you serve).
        dtype: ``fp32``, ``bf16`` or ``fp16`` (autocast) for timing and evaluation.
        methods: candidate methods (default: every training-free method with a schedule option).
        max_drop: top-1 points the choice may lose; beyond it ``finetune_epochs`` recover it, or
            the search fails naming the best drop found.
        rounds: interleaved timing rounds per candidate at most (each times the base and the candidate).
        min_rounds: rounds per candidate at least: after these, the rounds stop once the candidate's
            speed-up in every round lies within ``1 + tolerance`` (largest over smallest), so quiet
            timings end early and noisy ones get all ``rounds``.
        warmup: untimed forwards of each model before its rounds (of the base in the first trial of
            a session only: later trials find it warm).
        min_block_s: each round times enough forwards of a model to last at least this long (a
            small model's single forward is short enough for scheduling noise to move it by tens
            of percent).
        max_trials: candidates timed per method at most.
        evaluate: which of a method's timed schedules get a validation pass: ``"gentlest"`` (the
            default) evaluates one, the gentlest that meets the target (fewest FLOPs removed, the
            lowest FLOPs ratio among them; the closest one when none does); ``"within"`` evaluates
            every schedule that meets the target and keeps the method's most accurate. For one
            reducer on one model, removing more tokens does not make it more accurate in
            expectation, and the gentlest schedule within the target is the one the target allows;
            each other schedule costs a full validation pass.
        tolerance: a measured speed-up within ``[target, target * (1 + tolerance)]`` ends a method's search,
            as does a schedule that met the target within ``1 + tolerance`` in FLOPs ratio of one that missed it.
        eval_batch_size: batch size of the accuracy evaluation (None: :data:`CPU_EVAL_BATCH` on the
            CPU, :data:`EVAL_BATCH` on other devices; set at construction).
        val_images: evaluate on this many validation images (a seeded random subset; None: all).
        seed: seed of the subset and of the recovery training.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        threads: CPU threads for timing and evaluation (None: torch's default).
        finetune_epochs: epochs of the recovery training (0: none).
        finetune_batch_size: batch size of the recovery training.
        finetune_lr: learning rate of the recovery training (None: TrainConfig's default).
        onnx: also write ``model.onnx`` of the chosen model.
        progress: tqdm bars (None: when stderr is a terminal).
    """

    batch_size: int = 256
    dtype: str = "fp32"
    methods: Optional[Sequence[str]] = None
    max_drop: Optional[float] = None
    rounds: int = 5
    min_rounds: int = 3
    warmup: int = 1
    min_block_s: float = 1.0
    max_trials: int = 4
    evaluate: str = "gentlest"
    tolerance: float = 0.05
    eval_batch_size: Optional[int] = None
    val_images: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    finetune_epochs: int = 0
    finetune_batch_size: int = 32
    finetune_lr: Optional[float] = None
    onnx: bool = False
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TokenTuneError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.evaluate not in EVALUATE:
            raise TokenTuneError(f"unknown evaluate choice {self.evaluate!r}: 'gentlest' (one schedule per method, "
                                 "the gentlest within the target) or 'within' (every schedule within the target)")
        if self.eval_batch_size is None:
            self.eval_batch_size = CPU_EVAL_BATCH if str(self.device).startswith("cpu") else EVAL_BATCH
        for name in ("batch_size", "rounds", "min_rounds", "max_trials", "eval_batch_size", "finetune_batch_size"):
            if int(getattr(self, name)) < 1:
                raise TokenTuneError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.val_images is not None and self.val_images < 1:
            raise TokenTuneError(f"val_images must be at least 1, got {self.val_images}")
        if self.max_drop is not None and self.max_drop < 0:
            raise TokenTuneError(f"max_drop is the top-1 points the choice may lose (>= 0), got {self.max_drop}")
        if self.finetune_epochs < 0 or self.warmup < 0 or self.tolerance < 0 or self.min_block_s < 0:
            raise TokenTuneError("finetune_epochs, warmup, tolerance and min_block_s must be >= 0")


# ----------------------------------------------------------------------------- 1. the source
@dataclass
class Source:
    """The model to accelerate.

    Attributes:
        model: as opened (a tokentune model; an export's is deployed already).
        spec: its build spec (:func:`tokentune.create_model`'s record).
        name: how the source was given.
        prep: its input preprocessing (:func:`tokentune.tools.export.preprocessing_of`).
        trainable: whether it can be trained further (not an export, whose LoRA is merged).
    """

    model: nn.Module
    spec: Dict[str, Any]
    name: str
    prep: Dict[str, Any]
    trainable: bool


def _cannot_adapt(what: str) -> TokenTuneError:
    return TokenTuneError(f"tokentune cannot adapt {what}: pass a tokentune run or export directory, a peft adapter "
                          "directory, a timm ViT name, or a model built by tokentune.create_model/open_model")


def _from_module(model: nn.Module, name: str) -> Source:
    info = info_of(model)
    if info is None or info.spec is None:
        raise _cannot_adapt(f"a {type(model).__name__} it did not build")
    return Source(model, dict(info.spec), name, preprocessing_of(model), trainable=not info.deployed)


def _from_directory(directory: str, name: str, pretrained, base_model: Optional[str]) -> Source:
    if is_export(directory):
        config = read_deployed_config(directory)
        model = load_deployed(directory)
        return Source(model, dict(config["spec"]), name, config.get("preprocessing") or preprocessing_of(model), False)
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        readers = [get_method(n).load_formats["peft"] for n in available_methods() if "peft" in get_method(n).load_formats]
        if not readers:
            raise _cannot_adapt(f"the peft adapter {directory!r} (no method reads the peft format)")
        model = readers[0](directory, base_model, pretrained=pretrained).eval()
        return Source(model, dict(info_of(model).spec), name, preprocessing_of(model), True)
    model = open_model(directory, pretrained=pretrained)
    return Source(model, dict(info_of(model).spec), name, preprocessing_of(model, read_config(directory)), True)


def open_source(source: Union[nn.Module, str, "os.PathLike[str]"], pretrained: Union[bool, str, None] = None,
                base_model: Optional[str] = None) -> Source:
    """The model to accelerate from a model, a run or export directory, a peft adapter directory (on
    ``base_model``, default: as the adapter records it), ``local-dir:``/``hf-hub:`` locations of
    those, or a timm name (with ``pretrained``: True = the hub, a weights file, or a
    ``hf-hub:``/``local-dir:`` location of weights)."""
    if isinstance(source, nn.Module):
        return _from_module(source, type(source).__name__)
    name = os.fspath(source)
    is_location = name.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(name)
    if is_location:
        directory = resolve_location(name, "the model", allow_patterns=OPEN_FILES)
        if os.path.isdir(directory):
            return _from_directory(directory, name, pretrained, base_model)
    if os.path.exists(name):
        raise _cannot_adapt(f"the file {name!r}")
    if "/" in name or os.sep in name:                   # timm names have no slash: a path that is not there
        raise TokenTuneError(f"{name!r} does not exist; pass a run, export or peft adapter directory, or a timm name")
    model = create_model(name, method="linear", pretrained=True if pretrained is None else pretrained)
    return Source(model.eval(), dict(info_of(model).spec), name, preprocessing_of(model), True)


def deployed_base(source: Source) -> nn.Module:
    """The unmodified model as it runs deployed (an export is that already)."""
    info = info_of(source.model)
    base = source.model if (info is not None and info.deployed) or not source.trainable else deploy(source.model)
    apply_preprocessing(base, source.prep)
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval()


# ----------------------------------------------------------------------------- 2. validation data
@dataclass
class Validation:
    """The validation images: in memory (``images``, ``labels``) when they fit, else the dataset."""

    dataset: Any
    images: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    name: str
    count: int

    def data(self):
        if self.images is None:
            return self.dataset
        return torch.utils.data.TensorDataset(self.images, self.labels)

    def batch(self, size: int, image_size: int, seed: int) -> torch.Tensor:
        """``size`` validation images (cycled) to time on; random ones when they are not in memory."""
        if self.images is None or self.images.shape[-1] != image_size:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(size, 3, image_size, image_size, generator=g)
        reps = math.ceil(size / len(self.images))
        return self.images.repeat(reps, 1, 1, 1)[:size].clone()


def load_validation(data, base: nn.Module, prep: Dict[str, Any], num_classes: int, limit: Optional[int] = None,
                    seed: int = 0, progress: Optional[bool] = None) -> Validation:
    """``data`` (items ``(image, label)``; a tokentune dataset gets the model's transform) checked
    against the model's classes, subsampled to ``limit`` images (seeded) and held in memory when it fits."""
    from tqdm.auto import tqdm

    if hasattr(data, "transform") and getattr(data, "transform", None) is None:
        data.transform = build_transform(base, interpolation=prep.get("interpolation") or "bicubic")
    classes = getattr(data, "num_classes", None)
    if classes is not None and int(classes) > num_classes:
        raise TokenTuneError(f"the validation data has {classes} classes but the model's head has {num_classes}; "
                             "validate on the classes the model was trained on (same class folders / dataset)")
    try:
        total = len(data)
    except TypeError:
        raise TokenTuneError("the validation data has no length; pass a map-style dataset (an image folder, a "
                             "VTAB split, a tokentune ImageSource)") from None
    if total == 0:
        raise TokenTuneError("the validation data is empty; pass a split with images")
    indices = list(range(total))
    if limit is not None and limit < total:
        indices = sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    subset = torch.utils.data.Subset(data, indices) if len(indices) < total else data
    first = subset[0][0]
    name = f"{getattr(data, 'name', type(data).__name__)} {getattr(data, 'split', '')}".strip()
    if not isinstance(first, torch.Tensor) or first.numel() * first.element_size() * len(indices) > CACHE_BYTES:
        return Validation(subset, None, None, name, len(indices))
    loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=0)
    images, labels = [], []
    for x, y in tqdm(loader, desc="validation images", leave=False, disable=not progress_enabled(progress)):
        images.append(x)
        labels.append(torch.as_tensor(y))
    labels_t = torch.cat(labels)
    if int(labels_t.max()) >= num_classes or int(labels_t.min()) < 0:
        raise TokenTuneError(f"the validation data has label {int(labels_t.max())} but the model's head has {num_classes} "
                             "classes; validate on the classes the model was trained on")
    return Validation(subset, torch.cat(images), labels_t, name, len(indices))


# ----------------------------------------------------------------------------- 3. candidates
def candidate_methods(spec: Dict[str, Any], wanted: Optional[Sequence[str]] = None) -> List[str]:
    """The methods whose schedule is searched: the model's own token reducers with a schedule option
    when it has any, else every training-free method with one that composes with the model's methods."""
    own = parse_method(spec["method"])
    for name in wanted or ():
        get_method(name)                              # an unknown name is one line
    reducers = [m for m in own if m.reduces_tokens]
    if reducers:
        found = [m.name for m in reducers if m.rate_option]
        if not found:
            raise TokenTuneError(f"this {spec['method']} model reduces tokens with {', '.join(m.name for m in reducers)}, "
                                 "which has no schedule to search (its rate is trained); it is as fast as it gets "
                                 "without training")
        other = sorted(set(wanted or ()) - set(found))
        if other:
            raise TokenTuneError(f"this {spec['method']} model keeps its own token reduction, so only the schedule of "
                                 f"{', '.join(found)} is searched; drop {', '.join(other)} from --methods")
        return found
    pool = [n for n in available_methods() if get_method(n).training_free and get_method(n).rate_option]
    for name in wanted or ():
        if name not in pool:
            raise TokenTuneError(f"{name!r} is not a candidate: it needs training or has no schedule option; "
                                 f"training-free methods: {', '.join(pool) or 'none'}")
    names = [n for n in pool if not wanted or n in wanted]
    usable = []
    for name in names:
        try:
            parse_method(f"{spec['method']}+{name}")
            usable.append(name)
        except TokenTuneError:
            continue
    if not usable:
        raise TokenTuneError(f"no training-free method can be added to this {spec['method']} model "
                             f"(tried {', '.join(names) or 'none'})")
    return usable


def _candidate_spec(spec: Dict[str, Any], method: str, rate: Any):
    names = spec["method"].split("+")
    combined = spec["method"] if method in names else f"{spec['method']}+{method}"
    options = rebuild_options(spec)
    config = dict(options.get(method) or {})
    config[get_method(method).rate_option] = rate
    options[method] = config
    return combined, options


def build_candidate(source: Source, base: nn.Module, method: str, rate: Any, device="cpu",
                    trainable: bool = False) -> nn.Module:
    """``method`` at ``rate`` (its ``rate_option`` value) on the source model: deployed with the base's
    tensors, or (``trainable``) the trainable model with the source's tensors."""
    spec = source.spec
    combined, options = _candidate_spec(spec, method, rate)
    build = dict(method=combined, num_classes=spec["num_classes"], pretrained=False,
                 train_head=spec.get("train_head", True), seed=spec.get("init_seed", 0), **options)
    if trainable:
        model = create_model(spec["model"], **build)
        _load(model, source.model.state_dict(), method, spec, assign=False)
        model.tokentune.spec["pretrained"] = spec.get("pretrained", False)
        apply_preprocessing(model, source.prep)
        return model.to(device)
    with torch.device("meta"):
        model = deploy(create_model(spec["model"], **build), inplace=True)
    _load(model, base.state_dict(), method, spec, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = deploy(create_model(spec["model"], **build), inplace=True)      # tensors beyond the state dict
        _load(model, base.state_dict(), method, spec, assign=False)
    model.tokentune.spec["pretrained"] = spec.get("pretrained", False)
    apply_preprocessing(model, source.prep)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def _load(model: nn.Module, tensors: Dict[str, torch.Tensor], method: str, spec: Dict[str, Any], assign: bool) -> None:
    state = {k: v.detach().clone() for k, v in tensors.items()} if assign else tensors
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as exc:
        raise TokenTuneError(f"{method} at this schedule does not fit the trained {spec['method']} model "
                             f"({error_line(exc)[:160]}); its trained parameters depend on the schedule") from None
    if missing or unexpected:
        raise TokenTuneError(f"{method} cannot be added to the {spec['method']} model without training: it needs "
                             f"{', '.join((missing or unexpected)[:3])}")


# ----------------------------------------------------------------------------- measurements
def gmacs_of(model: nn.Module, images: torch.Tensor) -> float:
    """Multiply-adds per image (billions) on the first image of ``images``, attention included."""
    return count_flops(model, images[:1]) / 2e9


def time_side_by_side(base: nn.Module, candidate: nn.Module, images: torch.Tensor, cfg: AccelerateConfig,
                      seed: int, base_warm: bool = False) -> Dict[str, float]:
    """Throughput of the candidate and the base in interleaved rounds; the speed-up with its spread
    (the candidate's slowest round over the base's fastest, and the reverse). ``base_warm``: the
    base ran on ``images`` in this process already (an earlier trial): only the candidate warms up."""
    stats = measure_throughput({"base": base, "candidate": candidate}, rounds=cfg.rounds, warmup=cfg.warmup,
                               dtype=cfg.dtype, device=cfg.device, seed=seed, images=images,
                               min_block_s=cfg.min_block_s, warm=("base",) if base_warm else (),
                               min_rounds=min(cfg.min_rounds, cfg.rounds), agree=cfg.tolerance)
    b, c = stats["base"], stats["candidate"]
    return {"speedup": c.median / b.median, "speedup_low": c.low / b.high, "speedup_high": c.high / b.low,
            "img_s": c.median, "base_img_s": b.median, "rounds": c.rounds}


def accuracy(model: nn.Module, val: Validation, cfg: AccelerateConfig, desc: str) -> float:
    amp = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}[cfg.dtype]
    return evaluate(model, val.data(), batch_size=cfg.eval_batch_size, device=cfg.device, amp=amp,
                    progress=cfg.progress, desc=desc)["top1"]


# ----------------------------------------------------------------------------- resumable state
class SearchState:
    """What the search measured so far, written to ``out_dir/accelerate-state.json`` after every step.

    ``setting`` fingerprints the search (source, target, timing setting, validation data, methods);
    a state of another setting is refused, so a changed command never mixes measurements.
    """

    def __init__(self, path: Optional[str], setting: Dict[str, Any]) -> None:
        self.path, self.setting = path, jsonable(setting)
        self.data: Dict[str, Any] = {"setting": self.setting, "trials": {}, "accuracy": {}, "limits": {},
                                     "base": None, "time": {}}
        self.resumed = False
        if path is not None and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise TokenTuneError(f"{path} is damaged; delete it to search afresh") from None
            if data.get("setting") != self.setting:
                changed = sorted(k for k in set(self.setting) | set(data.get("setting") or {})
                                 if self.setting.get(k) != (data.get("setting") or {}).get(k))
                raise TokenTuneError(f"{os.path.dirname(path) or '.'} holds a search with other settings "
                                     f"({', '.join(changed)} differ); use another --out or delete {path}")
            self.data, self.resumed = data, True

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.data)

    @contextlib.contextmanager
    def clock(self, phase: str):
        """Adds the seconds spent in the block to ``time[phase]`` and one to ``time["counts"][phase]``
        (both summed over resumed sessions): how many evaluations, timed trials, builds, ... the
        seconds were spent on."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def spent(self) -> Dict[str, Any]:
        """Seconds per phase and ``counts`` (a copy of ``time``)."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.data["time"].items()}

    def add(self, phase: str, seconds: float) -> None:
        spent = self.data["time"]
        spent[phase] = spent.get(phase, 0.0) + seconds
        counts = spent.setdefault("counts", {})
        counts[phase] = counts.get(phase, 0) + 1


@dataclass
class Context:
    """What every step of one search shares."""

    source: Source
    base: nn.Module
    val: Validation
    target: Target
    cfg: AccelerateConfig
    state: SearchState
    images: torch.Tensor
    log: Callable[[str], None] = print
    #: the candidate built last (at most one: :func:`_build` drops it before building another)
    built: Dict[str, nn.Module] = field(default_factory=dict)
    #: the base ran on ``images`` in this process (a trial timed it): later trials skip its warm-up
    base_warm: bool = False

    @property
    def base_gmacs(self) -> float:
        return self.state.data["base"]["gmacs"]


# ----------------------------------------------------------------------------- 3. the search
def _rate(ratio: float) -> str:
    return f"flops:{ratio:.4f}"


def _build(ctx: Context, method: str, rate: Any) -> nn.Module:
    """``method`` at ``rate`` on the source; the model built last is kept, so that a trial's model
    is evaluated (or exported) without building it again, and dropped before another is built (one
    candidate in memory beside the base)."""
    key = f"{method}|{rate}"
    if key not in ctx.built:
        ctx.built.clear()
        with ctx.state.clock("build"):
            ctx.built[key] = build_candidate(ctx.source, ctx.base, method, rate, ctx.cfg.device)
    return ctx.built[key]


def max_ratio(ctx: Context, method: str, ratio: float) -> float:
    """The largest FLOPs ratio ``method`` can be asked for (<= ``ratio``), by bisection on builds."""
    key = f"{method}|{ratio:.4f}"
    limits = ctx.state.data["limits"]
    if key not in limits:
        lo, hi = 1.0, ratio
        with ctx.state.clock("build"):
            for _ in range(24):
                mid = math.sqrt(lo * hi)           # geometric: the target may be far beyond the method
                try:
                    with torch.device("meta"):
                        create_model(ctx.source.spec["model"], **_meta_build(ctx.source.spec, method, _rate(mid)))
                    lo = mid
                except TokenTuneError:
                    hi = mid
        limits[key] = math.floor(lo * 1e4) / 1e4
        ctx.state.save()
    return limits[key]


def _meta_build(spec: Dict[str, Any], method: str, rate: Any) -> Dict[str, Any]:
    combined, options = _candidate_spec(spec, method, rate)
    return dict(method=combined, num_classes=spec["num_classes"], pretrained=False,
                train_head=spec.get("train_head", True), seed=spec.get("init_seed", 0), **options)


def trial(ctx: Context, method: str, ratio: float) -> Dict[str, Any]:
    """Build ``method`` at the FLOPs ratio, count its GMACs, time it beside the base (once; resumed
    searches take the recorded trial)."""
    rate = _rate(ratio)
    key = f"{method}|{rate}"
    trials = ctx.state.data["trials"]
    if key in trials:
        return trials[key]
    try:
        model = _build(ctx, method, rate)
    except TokenTuneError as exc:
        record = {"method": method, "rate": rate, "error": error_line(exc)}
    else:
        option = get_method(method).rate_option
        schedule = model.tokentune.spec["configs"][method][option]
        same = _timed_before(trials, method, schedule)
        if same is not None:                  # another FLOPs target gave a schedule already timed:
            return same                       # no second timing (search_method moves the target on)
        with ctx.state.clock("flops"):
            gmacs = gmacs_of(model, ctx.images)
        with ctx.state.clock("timing"):
            timed = time_side_by_side(ctx.base, model, ctx.images, ctx.cfg, ctx.cfg.seed, base_warm=ctx.base_warm)
        ctx.base_warm = True
        record = {"method": method, "rate": rate, "option": option, "schedule": schedule, "gmacs": gmacs,
                  "flops_ratio": ctx.base_gmacs / gmacs, **timed}
        ctx.log(f"  {method} {rate}: {gmacs:.4g} GMACs, {timed['speedup']:.3f}x "
                f"({timed['speedup_low']:.2f}-{timed['speedup_high']:.2f})")
    trials[key] = record
    ctx.state.save()
    return record


def _timed_before(trials: Dict[str, Dict[str, Any]], method: str, schedule: Any) -> Optional[Dict[str, Any]]:
    """The recorded trial of ``method`` with this schedule, if one was timed."""
    wanted = json.dumps(jsonable(schedule), sort_keys=True)
    for record in trials.values():
        if record.get("method") == method and "error" not in record and \
                json.dumps(jsonable(record.get("schedule")), sort_keys=True) == wanted:
            return record
    return None


def efficiency(trials: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Measured speed-up per FLOPs ratio, pooled (geometric mean) over ``trials``; None without any.

    One timing is noisy (a few percent on an idle machine, far more on a shared one); the
    efficiency of one backbone at nearby FLOPs is nearly constant, so pooling every trial averages
    the noise down instead of letting the last measurement throw the next candidate around.
    """
    values = [t["speedup"] / t["flops_ratio"] for t in trials if "error" not in t and t.get("flops_ratio")]
    if not values:
        return None
    return math.exp(sum(math.log(max(v, 1e-6)) for v in values) / len(values))


def _prior(ctx: Context, earlier: Sequence[str] = ()) -> Optional[float]:
    """The efficiency pooled over the trials of the ``earlier`` methods (None without any): they
    share the backbone, batch size and machine (naming them keeps a resumed search on the
    uninterrupted one's path)."""
    return efficiency([t for t in ctx.state.data["trials"].values() if t["method"] in earlier])


def first_ratio(ctx: Context, earlier: Sequence[str] = ()) -> float:
    """A method's first FLOPs ratio: the target's own, corrected for speed-up targets by the
    efficiency the ``earlier`` methods measured (:func:`_prior`)."""
    ratio = ctx.target.flops_ratio(ctx.base_gmacs)
    pooled = _prior(ctx, earlier)
    if ctx.target.kind != "speedup" or pooled is None:
        return ratio
    return max(min(ratio / pooled, ratio * 1.5), ratio / 1.5, MIN_RATIO)


def noisy(row: Dict[str, Any], others: Optional[float]) -> bool:
    """A timing thrown off by the machine: its efficiency (speed-up / FLOPs ratio) lies more than
    :data:`OUTLIER` off ``others`` (the efficiency pooled over every other trial measured) AND its
    own rounds disagree by more than that (the candidate's fastest round over the base's slowest
    above ``1 + OUTLIER`` times the reverse). A method whose efficiency differs from the others'
    measures it round after round, with a narrow spread, and is not noisy."""
    if others is None or "error" in row or not row.get("flops_ratio"):
        return False
    off = abs(math.log(row["speedup"] / row["flops_ratio"] / others)) > math.log(1 + OUTLIER)
    return off and row["speedup_high"] > row["speedup_low"] * (1 + OUTLIER)


def estimate(rows: Sequence[Dict[str, Any]], prior: Optional[float] = None) -> Optional[float]:
    """The efficiency the next FLOPs target of a method is computed from: pooled over its trials
    (:func:`efficiency`) less the :func:`noisy` ones, each judged against the method's other trials
    and the ``prior`` (the methods' before it, pooled with them as one trial); the ``prior`` alone
    when every trial is noisy.

    On ViT-B/16 at 2 threads a ToMe schedule measured 1.29x, spread 0.98-1.41, where its neighbours
    measured 1.63-1.67x: steering by that one timing sent the next schedule past the target and
    cost two more trials. A noisy trial still counts as measured (it met the target or missed it);
    only the next FLOPs target ignores it."""
    good = [r for r in rows if "error" not in r and r.get("flops_ratio")]
    keep = [r for i, r in enumerate(good) if not noisy(r, _pool(good[:i] + good[i + 1:], prior))]
    if not keep and prior is not None:
        return prior
    return efficiency(keep or good)


def _pool(rows: Sequence[Dict[str, Any]], prior: Optional[float]) -> Optional[float]:
    """The efficiency of ``rows`` and the ``prior`` (counted as one more trial), geometric."""
    own = efficiency(rows)
    if own is None or prior is None:
        return prior if own is None else own
    return math.exp((math.log(prior) + math.log(own) * len(rows)) / (1 + len(rows)))


def _next_ratio(ctx: Context, rows: Sequence[Dict[str, Any]], ratio: float, prior: Optional[float] = None) -> float:
    """The FLOPs ratio of the next candidate, corrected by what this method's trials measured
    (:func:`estimate`)."""
    last = rows[-1]
    if ctx.target.kind == "speedup":
        wanted = ctx.target.value / max(estimate(rows, prior) or 1.0, 1e-6)
        # one noisy timing must not throw the search to either end: at most 1.5x per step, never below 1
        return max(min(wanted, ratio * 1.5), ratio / 1.5, MIN_RATIO)
    limit = ctx.target.value if ctx.target.kind == "gmacs" else ctx.target.value * ctx.base_gmacs
    return ratio * last["gmacs"] / limit * (1 + 1e-4)


def _done(ctx: Context, row: Dict[str, Any]) -> bool:
    if ctx.target.kind != "speedup":
        return ctx.target.met(row, ctx.base_gmacs)
    return ctx.target.value <= row["speedup"] <= ctx.target.value * (1 + ctx.cfg.tolerance)


def _bracketed(ctx: Context, rows: Sequence[Dict[str, Any]]) -> bool:
    """A speed-up target is bracketed within the tolerance: the gentlest schedule that met it and a
    stronger one that missed it are at most ``1 + tolerance`` apart in FLOPs ratio (or the
    measurements contradict each other: a gentler schedule met it where a stronger one missed).

    The speed-up per FLOPs ratio of one backbone is nearly constant, so any schedule between the two
    would measure within the tolerance of the target: timing it would refine noise, not the
    choice (on ViT-B/16 at 2 threads one schedule measured 1.45x-1.74x from one trial to the next)."""
    if ctx.target.kind != "speedup":
        return False
    met = [r["flops_ratio"] for r in rows if ctx.target.met(r, ctx.base_gmacs)]
    missed = [r["flops_ratio"] for r in rows if not ctx.target.met(r, ctx.base_gmacs)]
    if not met or not missed:
        return False
    return max(missed) * (1 + ctx.cfg.tolerance) >= min(met)     # a contradiction (missed >= met) included


def search_method(ctx: Context, method: str, earlier: Sequence[str] = ()) -> Dict[str, Any]:
    """The schedules of ``method`` tried for the target and a first pick: the gentlest (fewest FLOPs
    removed) that meets the target, else the fastest (speed-up) or cheapest (GMACs) tried
    (with ``evaluate="within"``, :func:`_search_all` then keeps the most accurate of those that meet it)."""
    ratio = first_ratio(ctx, earlier)
    prior = _prior(ctx, earlier)
    rows: List[Dict[str, Any]] = []
    seen: Dict[str, Dict[str, Any]] = {}
    cap = None
    for _ in range(ctx.cfg.max_trials * 3):
        if len(rows) >= ctx.cfg.max_trials:
            break
        ratio = max(ratio, MIN_RATIO) if cap is None else min(max(ratio, MIN_RATIO), cap)
        row = trial(ctx, method, ratio)
        if "error" in row:
            if cap is not None or ratio <= MIN_RATIO:
                return {"method": method, "trials": rows, "error": row["error"]}
            cap = max_ratio(ctx, method, ratio)       # the target is beyond the method: try its most
            if cap <= MIN_RATIO:
                return {"method": method, "trials": rows, "error": row["error"]}
            continue
        key = json.dumps(row["schedule"])
        if key in seen:                               # the same schedule again: nudge the FLOPs target
            ratio *= 1.03 if not ctx.target.met(seen[key], ctx.base_gmacs) else 0.97
            continue
        seen[key] = row
        rows.append(row)
        if _done(ctx, row) or _bracketed(ctx, rows) or \
                (not ctx.target.met(row, ctx.base_gmacs) and cap is not None and ratio >= cap):
            break
        ratio = _next_ratio(ctx, rows, ratio, prior)
    if not rows:
        return {"method": method, "trials": rows, "error": "no schedule could be built"}
    met = [r for r in rows if ctx.target.met(r, ctx.base_gmacs)]
    if met:
        best = min(met, key=lambda r: r["flops_ratio"])
    elif ctx.target.kind == "speedup":
        best = max(rows, key=lambda r: r["speedup"])
    else:
        best = min(rows, key=lambda r: r["gmacs"])
    return {"method": method, "trials": rows, "chosen": dict(best, met=bool(met)), "limit": cap}


def method_accuracy(ctx: Context, row: Dict[str, Any]) -> float:
    """Top-1 of a kept candidate on the validation data (once; resumed searches take the record)."""
    key = f"{row['method']}|{row['rate']}"
    acc = ctx.state.data["accuracy"]
    if key not in acc:
        model = _build(ctx, row["method"], row["rate"])
        with ctx.state.clock("evaluation"):
            acc[key] = accuracy(model, ctx.val, ctx.cfg, f"top-1 {row['method']}")
        ctx.state.save()
    return acc[key]


# ----------------------------------------------------------------------------- 4. choice
def choose(rows: List[Dict[str, Any]], target: Target, base_gmacs: float) -> Optional[Dict[str, Any]]:
    """The most accurate evaluated candidate within the target (ties: the faster); None when none is."""
    within = [r for r in rows if r.get("top1") is not None and target.met(r, base_gmacs)]
    if not within:
        return None
    return max(within, key=lambda r: (r["top1"], r["speedup"]))


def unreachable(rows: List[Dict[str, Any]], target: Target, errors: Dict[str, str]) -> TokenTuneError:
    """One line: the target, and the closest any candidate reached."""
    if not rows:
        why = "; ".join(f"{m}: {e}" for m, e in errors.items())
        return TokenTuneError(f"no candidate could be built for {target.describe()} ({why})")
    if target.kind == "speedup":
        best = max(rows, key=lambda r: r["speedup"])
        reached = f"{best['speedup']:.2f}x measured"
    else:
        best = min(rows, key=lambda r: r["gmacs"])
        reached = f"{best['gmacs']:.4g} GMACs"
    return TokenTuneError(f"no candidate reaches {target.describe()}: the closest is {best['method']} "
                          f"({best['rate']}) with {reached}; ask for at most that (or a larger batch size, or "
                          "another dtype)")


# ----------------------------------------------------------------------------- 5. recovery
def finetune(ctx: Context, row: Dict[str, Any], train_data, out_dir: Optional[str]) -> Dict[str, Any]:
    """A short PEFT recovery of the chosen candidate on ``train_data`` (the source's trainable
    parameters; resumable in ``out_dir/finetune``), then the same measurements as the search's."""
    if not ctx.source.trainable:
        raise TokenTuneError("an export cannot be fine-tuned (its LoRA is merged into the weights); accelerate the "
                             "run directory or the peft adapter it came from to use --finetune-epochs")
    if train_data is None:
        raise TokenTuneError("--finetune-epochs needs training data: pass --train-data (a split name of the "
                             "validation source, or an image folder)")
    if hasattr(train_data, "transform") and getattr(train_data, "transform", None) is None:
        train_data.transform = build_transform(ctx.base, interpolation=ctx.source.prep.get("interpolation") or "bicubic")
    ctx.built.clear()                                 # one candidate in memory beside the base
    model = build_candidate(ctx.source, ctx.base, row["method"], row["schedule"], ctx.cfg.device, trainable=True)
    options = dict(epochs=ctx.cfg.finetune_epochs, batch_size=ctx.cfg.finetune_batch_size, seed=ctx.cfg.seed,
                   eval_every=0, amp={"fp32": "off", "bf16": "bf16", "fp16": "fp16"}[ctx.cfg.dtype])
    if ctx.cfg.finetune_lr is not None:
        options["lr"] = ctx.cfg.finetune_lr
    run_dir = os.path.join(out_dir, "finetune") if out_dir else None
    with ctx.state.clock("finetune"):
        train(model, train_data, None, TrainConfig(**options), out_dir=run_dir, resume=run_dir is not None,
              device=ctx.cfg.device, progress=ctx.cfg.progress, log=ctx.log)
    deployed = deploy(model, inplace=True)
    apply_preprocessing(deployed, ctx.source.prep)
    with ctx.state.clock("timing"):
        timed = time_side_by_side(ctx.base, deployed, ctx.images, ctx.cfg, ctx.cfg.seed, base_warm=ctx.base_warm)
    ctx.base_warm = True
    with ctx.state.clock("evaluation"):
        top1 = accuracy(deployed, ctx.val, ctx.cfg, "top-1 recovered")
    tuned = dict(row, **timed, top1=top1, finetuned_epochs=ctx.cfg.finetune_epochs, label=f"{row['method']} + recovery")
    tuned["drop"] = ctx.state.data["base"]["top1"] - top1
    return {"row": tuned, "model": deployed}


# ----------------------------------------------------------------------------- 6. outputs
def _short(schedule: Any) -> str:
    if isinstance(schedule, list):
        return ",".join(str(v) for v in schedule)
    return f"{schedule:.4g}" if isinstance(schedule, float) else str(schedule)


def table(rows: List[Dict[str, Any]], base: Dict[str, Any], choice: Optional[Dict[str, Any]],
          tried: Sequence[Dict[str, Any]] = ()) -> str:
    """The markdown table: method, schedule, GMACs, measured speed-up (spread), top-1 and drop of
    each method's kept candidate (``rows``), each followed by the method's other timed schedules
    (``tried``, marked so; top-1 and drop are :data:`NOT_EVALUATED` where a schedule was not evaluated)."""
    lines = [{"method": "unmodified", "schedule": "-", "GMACs": f"{base['gmacs']:.4g}", "speed-up": "1.00x",
              "top-1": f"{base['top1']:.2f}", "drop": "-"}]
    ordered = []
    for r in rows:
        ordered.append(r)
        if not r.get("finetuned_epochs"):
            ordered += [t for t in tried if t["method"] == r["method"]]
    ordered += [t for t in tried if t["method"] not in {r["method"] for r in rows}]
    for r in ordered:
        mark = " (chosen)" if choice is not None and r is choice else " (tried)" if any(r is t for t in tried) else ""
        lines.append({"method": r.get("label", r["method"]) + mark, "schedule": f"{r['option']}={_short(r['schedule'])}",
                      "GMACs": f"{r['gmacs']:.4g}",
                      "speed-up": f"{r['speedup']:.2f}x ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})",
                      "top-1": f"{r['top1']:.2f}" if r.get("top1") is not None else NOT_EVALUATED,
                      "drop": f"{r['drop']:+.2f}" if r.get("drop") is not None else NOT_EVALUATED})
    return markdown_table(lines, ["method", "schedule", "GMACs", "speed-up", "top-1", "drop"])


def picture(rows: List[Dict[str, Any]], base: Dict[str, Any], path: str, target: Target) -> Optional[str]:
    """Accuracy versus measured throughput (PNG) with the Pareto front; None without matplotlib or
    without a measured candidate."""
    if base.get("img_s") is None or not any(r.get("top1") is not None for r in rows):
        return None
    points = [TradeoffPoint("unmodified", accuracy=base["top1"], throughput=base["img_s"])]
    points += [TradeoffPoint(f"{r.get('label', r['method'])} {r['speedup']:.2f}x", accuracy=r["top1"],
                             throughput=r["img_s"]) for r in rows if r.get("top1") is not None]
    try:
        return plot_tradeoff(points, path, title=f"tokentune accelerate: {target.describe()}")
    except TokenTuneError as exc:
        if "matplotlib" in str(exc):
            return None
        raise


def write_outputs(ctx: Context, out_dir: str, record: Dict[str, Any], chosen_model: Optional[nn.Module]) -> None:
    """The export of the chosen model, the table, the picture and the JSON record, in ``out_dir``."""
    rows = record["candidates"]
    with ctx.state.clock("outputs"):
        if chosen_model is not None:
            export_deployed(chosen_model, out_dir)
            record["export"] = out_dir
            if ctx.cfg.onnx:
                record["onnx"] = export_onnx(chosen_model, os.path.join(out_dir, ONNX_NAME))
        atomic_write_text(os.path.join(out_dir, TABLE_NAME),
                          f"# tokentune accelerate: {ctx.target.describe()}\n\n{record['table']}\n")
        record["picture"] = picture(rows, record["base"], os.path.join(out_dir, PICTURE_NAME), ctx.target)
    record["time"] = ctx.state.spent()
    atomic_write_json(os.path.join(out_dir, RECORD_NAME), jsonable(record))
    ctx.state.save()


# ----------------------------------------------------------------------------- the whole search
@dataclass
class AccelerateResult:
    """What :func:`accelerate` found.

    Attributes:
        choice: the chosen candidate's row (method, rate, schedule, GMACs, speed-up, top-1, drop).
        rows: every method's kept candidate (the table's rows).
        record: everything measured (also ``out_dir/accelerate.json``).
        model: the chosen deployed model.
        out_dir: where the export, table, picture and record are (None: nothing written).
    """

    choice: Dict[str, Any]
    rows: List[Dict[str, Any]]
    record: Dict[str, Any]
    model: nn.Module
    out_dir: Optional[str] = None


def _check_out_dir(out_dir: Optional[str]) -> Optional[str]:
    if out_dir is None:
        return None
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TokenTuneError(f"--out {out_dir!r} is a file; name a directory for the accelerated model")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, STATE_NAME)):
        raise TokenTuneError(f"--out {out_dir!r} is not empty and holds no accelerate search; name a new directory")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def _setting(source: Source, target: Target, cfg: AccelerateConfig, val: Validation, methods: List[str]) -> Dict[str, Any]:
    timing = {k: getattr(cfg, k) for k in ("batch_size", "dtype", "rounds", "min_rounds", "warmup", "min_block_s",
                                             "max_trials", "evaluate", "tolerance", "val_images", "seed", "device",
                                             "threads")}
    return {"source": source.name, "method": source.spec["method"], "target": asdict(target), "candidates": methods,
            "validation": {"name": val.name, "images": val.count}, **timing}


def _base(ctx: Context) -> Dict[str, Any]:
    """GMACs and top-1 of the unmodified model (once)."""
    if ctx.state.data["base"] is None:
        with ctx.state.clock("flops"):
            gmacs = gmacs_of(ctx.base, ctx.images)
        with ctx.state.clock("evaluation"):
            top1 = accuracy(ctx.base, ctx.val, ctx.cfg, "top-1 unmodified")
        ctx.state.data["base"] = {"gmacs": gmacs, "top1": top1}
        ctx.state.save()
    return ctx.state.data["base"]


def _search_all(ctx: Context, methods: List[str]) -> Dict[str, Dict[str, Any]]:
    from tqdm.auto import tqdm

    found = {}
    bar = tqdm(methods, desc="accelerate", disable=not progress_enabled(ctx.cfg.progress), dynamic_ncols=True)
    for i, method in enumerate(bar):
        bar.set_postfix_str(method)
        ctx.log(f"{method}: searching its schedule for {ctx.target.describe()}")
        result = search_method(ctx, method, methods[:i])
        result["trials"] = [dict(t, top1=None, drop=None) for t in result["trials"]]     # None: not evaluated
        if "chosen" in result:
            evaluated = to_evaluate(ctx, result)
            for row in evaluated:
                row["top1"] = method_accuracy(ctx, row)
                row["drop"] = ctx.state.data["base"]["top1"] - row["top1"]
            met = result["chosen"]["met"]             # within: the method's most accurate one (ties: the faster)
            result["chosen"] = dict(max(evaluated, key=lambda t: (t["top1"], t["speedup"])), met=met)
        found[method] = result
    return found


def to_evaluate(ctx: Context, result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The trials of one method that get a validation pass (``AccelerateConfig.evaluate``): its
    pick (:func:`search_method`: the gentlest schedule that meets the target, else the closest),
    or with ``"within"`` every schedule that meets the target.

    Why one is enough by default: for one reducer family on one model, removing more tokens does
    not make the model more accurate in expectation, so the gentlest schedule within the target is
    the one to keep, and evaluating the others costs a full validation pass each.
    """
    trials = result["trials"]
    met = [t for t in trials if ctx.target.met(t, ctx.base_gmacs)]
    if ctx.cfg.evaluate == "within" and met:
        return met
    return [t for t in trials if t["rate"] == result["chosen"]["rate"]]


def accelerate(model: Union[nn.Module, str, "os.PathLike[str]"], val_data, target: Union[float, str, Target],
               out_dir: Optional[str] = None, *, train_data=None, pretrained: Union[bool, str, None] = None,
               base_model: Optional[str] = None, config: Optional[AccelerateConfig] = None,
               log: Optional[Callable[[str], None]] = print, **options) -> AccelerateResult:
    """Find, on ``val_data`` and this machine, the training-free token reduction that reaches
    ``target`` with the least accuracy lost (module docstring), and write it to ``out_dir``.

    Args:
        model: a model built by tokentune (trained or loaded), a run or export directory, a peft
            adapter directory, a ``hf-hub:``/``local-dir:`` location of those, or a timm name.
        val_data: validation items ``(image, label)``; a tokentune dataset without a transform gets
            the model's (resize, mean/std).
        target: a measured speed-up (``1.5``, ``"1.5x"``), ``"gmacs:G"`` or ``"share:F"``.
        out_dir: where the export, table, picture, record and the resumable state go (None: nothing
            is written and nothing resumes).
        train_data: training items for ``finetune_epochs``.
        pretrained, base_model: where a timm name's or a run's frozen weights come from; the base
            model of a peft adapter.
        config: an :class:`AccelerateConfig`; or its fields as keyword arguments.
        log: progress lines (None: quiet).
    """
    log = log or (lambda _line: None)
    if config is not None and options:
        raise TokenTuneError("pass either config= or its fields as keyword arguments, not both")
    unknown = sorted(set(options) - {f for f in AccelerateConfig.__dataclass_fields__})
    if unknown:
        raise TokenTuneError(f"unknown accelerate option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(AccelerateConfig.__dataclass_fields__)}")
    cfg = config or AccelerateConfig(**options)
    goal = parse_target(target)
    out_dir = _check_out_dir(out_dir)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _accelerate(model, val_data, goal, out_dir, train_data, pretrained, base_model, cfg, log)
    finally:
        torch.set_num_threads(threads)


def _accelerate(model, val_data, goal: Target, out_dir, train_data, pretrained, base_model, cfg, log) -> AccelerateResult:
    t0 = time.perf_counter()
    source = open_source(model, pretrained, base_model)
    base = deployed_base(source).to(cfg.device)
    methods = candidate_methods(source.spec, cfg.methods)
    opened = time.perf_counter() - t0
    val = load_validation(val_data, base, source.prep, int(source.spec["num_classes"]), cfg.val_images, cfg.seed,
                          cfg.progress)
    state = SearchState(os.path.join(out_dir, STATE_NAME) if out_dir else None, _setting(source, goal, cfg, val, methods))
    state.add("open", opened)
    state.add("data", time.perf_counter() - t0 - opened)
    if state.resumed:
        log(f"continuing the search in {out_dir} ({len(state.data['trials'])} trials measured)")
    state.save()                                   # the setting and the time so far, before the first measurement
    image_size = int(base.patch_embed.img_size[0])
    ctx = Context(source, base, val, goal, cfg, state, val.batch(cfg.batch_size, image_size, cfg.seed).to(cfg.device),
                  log)
    base_row = _base(ctx)
    if goal.kind == "gmacs" and base_row["gmacs"] <= goal.value:
        raise TokenTuneError(f"the model already runs at {base_row['gmacs']:.4g} GMACs per image, within {goal.describe()}; "
                             "ask for fewer GMACs")
    log(f"{source.spec['method']} model: {base_row['gmacs']:.4g} GMACs, top-1 {base_row['top1']:.2f}% on {val.name} "
        f"({val.count} images); candidates: {', '.join(methods)}")
    found = _search_all(ctx, methods)
    rows = [r["chosen"] for r in found.values() if "chosen" in r]
    trials = [t for r in found.values() for t in r["trials"]]
    base_row = dict(base_row, img_s=_median([t["base_img_s"] for t in trials]) if trials else None)
    choice = choose(rows, goal, base_row["gmacs"])
    record = {"source": source.name, "method": source.spec["method"], "target": asdict(goal),
              "config": jsonable(asdict(cfg)), "environment": dict(environment(cfg.device, cfg.dtype),
                                                                   load_average=_load_average()),
              "validation": {"name": val.name, "images": val.count}, "base": base_row, "search": found,
              "candidates": rows, "resumed": state.resumed}
    model_out, problem = None, None
    if choice is None:
        problem = unreachable(rows, goal, {m: r["error"] for m, r in found.items() if "error" in r})
    elif cfg.max_drop is not None and choice["drop"] > cfg.max_drop:
        if cfg.finetune_epochs:
            tuned = finetune(ctx, choice, train_data, out_dir)
            rows.append(tuned["row"])
            record["finetune"] = tuned["row"]
            choice, model_out = tuned["row"], tuned["model"]
        else:
            problem = TokenTuneError(f"the best candidate within the target ({choice['method']}, {choice['speedup']:.2f}x) "
                                     f"loses {choice['drop']:.2f} top-1 points, more than --max-drop {cfg.max_drop:g}; "
                                     "allow more, ask for less speed, or recover with --finetune-epochs N --train-data")
    if choice is not None and problem is None and model_out is None:
        model_out = _build(ctx, choice["method"], choice["rate"])
    record["choice"] = choice if problem is None else None
    tried = [t for r in found.values() for t in r["trials"] if "chosen" not in r or t["rate"] != r["chosen"]["rate"]]
    record["table"] = table(rows, base_row, choice if problem is None else None, tried)
    if out_dir is not None:
        write_outputs(ctx, out_dir, record, model_out if problem is None else None)
    else:
        record["time"] = state.spent()
    if problem is not None:
        raise problem
    log(record["table"])
    log(f"chosen: {choice.get('label', choice['method'])} ({choice['option']}={_short(choice['schedule'])}), "
        f"{choice['speedup']:.2f}x, top-1 {choice['top1']:.2f}% ({-choice['drop']:+.2f})"
        + (f"; exported to {out_dir}" if out_dir else ""))
    return AccelerateResult(choice, rows, record, model_out, out_dir)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
