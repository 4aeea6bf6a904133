"""``tokentune bench``: parameters, FLOPs, throughput, latency and memory of several configurations.

Every configuration (a method spec with options, or a trained run / export directory) becomes one
row. All rows are measured in ONE process, on the same random batch, with the instruments of
:mod:`tokentune.bench`:

* parameters: total, trainable (peft's count, head included) and the papers' count
  (:func:`tokentune.params.count_parameters`: backbone without head, as a share of the
  pretrained backbone);
* FLOPs of one forward of the *deployed* model on the timed batch, per image
  (:func:`tokentune.core.flops.count_flops`: ``torch.utils.flop_counter`` with fused attention
  counted), so ToMe/PYRA schedules and DyT activation rates are reflected; ``GMACs`` = the
  papers' "GFLOPs" (one multiply-add = 1), ``GFLOPs`` = 2 per multiply-add;
* inference throughput of the deployed models (:func:`tokentune.deploy`: LoRA merged; plain
  ``lora`` becomes the plain timm ViT with fused SDPA): warm-up, then timed rounds interleaved
  across all rows with rotating order (:func:`tokentune.timing.measure_throughput`), median and
  min-max of images/s; CUDA is synchronised around every timed call;
* batch-1 latency, measured the same way (interleaved) with batch 1;
* optionally a batch-size sweep (``sweep``, e.g. 1, 8, 32, 128): throughput (interleaved across
  rows at each batch size) and peak inference memory per batch size; token dispatchers keep the
  calibration of the main batch;
* peak memory of one inference forward (:func:`tokentune.tools.measure.peak_memory`; on CPU the peak of
  live tensor storage, parameters excluded);
* training: seconds per step (forward with the method's own training loss, e.g. DyT's
  complete-model pass and distillation, backward, AdamW step on the trainable parameters) and its
  peak memory (:func:`tokentune.tools.measure.measure_train_step`). Training steps are timed model by
  model (not interleaved: every model would have to keep its gradients and optimizer state).

Untrained DyT models have arbitrary activation rates, so their dispatchers are *calibrated*
(the method's ``set_activation`` hook, DyT: :func:`tokentune.methods.dyt.calibrate_activation`):
every dispatcher's bias is shifted so that it activates ``rate`` of the patch tokens of the timed batch (default: the config's
``dyt_target_rate``, 0.5). The table reports the activation measured on that batch.

Configuration syntax (``--config``)::

    METHOD[+METHOD...][:KEY=VALUE[,KEY=VALUE...]]

``METHOD`` is a method spec as in ``tokentune train --method`` (``lora``, ``lora+tome``,
``pyra``, ``dyt``, ``dyt+tome``, ``adapter+tome``, ``full+tome``, ...). Options are separated by
commas; a comma that is not followed by ``NAME=`` belongs to the value, so lists keep their
commas (``tome_r=16x11,10``). Keys:

* ``<method>_<field>`` (``tome_r=low``, ``lora_rank=4``, ``dyt_variant=layer``) or just
  ``<field>`` when exactly one method of the spec has that field (``r=low``, ``variant=layer``);
  values use the syntax of ``tokentune train`` (lists ``16,16,10`` or ``16x11,10``, booleans
  ``true``/``false``, ``none``);
* ``label=TEXT``: the row's name (default: the configuration text);
* ``model=NAME``: another timm model for this row (default: ``--model``), e.g. the
  small-model baseline ``lora:model=vit_small_patch16_224``;
* ``rate=R``: DyT only, calibrate the dispatchers to activation ``R``; ``rate=none`` keeps
  them as they are;
* ``deploy=false``: time the training-form model in eval mode instead of the deployed one;
* ``quantize=int8-dynamic``: deploy with int8 Linear layers (:func:`tokentune.deploy`'s
  ``quantize``; CPU, fp32 only). The row is timed interleaved with the others like any row; its
  FLOPs are those of the fp32 deployed model (the multiply-adds are the same, in int8), its
  ``int8_logit_diff`` is the largest absolute difference of its logits from the same model
  deployed in fp32 on the timed batch, and its training columns stay empty (training runs the
  fp32 model of its fp32 row);
* ``timm_<keyword>=VALUE``: a ``timm.create_model`` keyword for this row only
  (``timm_embed_dim=384``).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import gc
import io
import math
import os
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..core.deploy import deploy
from ..core.dispatch import activation_rate, dispatchers
from ..core.factory import create_model, methods_of
from ..core.flops import count_flops
from ..core.method import available_methods, parse_method
from ..core.params import count_parameters
from ..core.quantize import check_quantize, quantize_dynamic_int8
from ..core.task import task_head_of
from ..core.vit import info_of, input_size, num_input_tokens, spec_of
from ..engine.distributed import resolve_device
from ..engine.rundir import RunDir
from ..engine.training import loss_function
from ..errors import TokenTuneError
from ..fileio import atomic_write_json, atomic_write_text
from ..parsing import convert, describe, timm_kwarg
from ..precision import DTYPES, autocast
from ..timing import measure_throughput, random_images
from . import measure as bench
from .export import example_images, open_model

DEFAULT_MODEL = "vit_base_patch16_224"
RESERVED = ("label", "model", "rate", "deploy", "quantize")
AUTO = "auto"

# ----------------------------------------------------------------------------- configurations
@dataclass
class Candidate:
    """One row of a benchmark.

    Attributes:
        label: the row's name.
        method: method spec (``"lora+tome"``); ignored for ``run``.
        options: method options for :func:`tokentune.create_model` (``{"tome_r": "low"}``).
        model: timm model name (None: the benchmark's model).
        timm_kwargs: extra ``timm.create_model`` keywords of this row (added to the benchmark's).
        rate: DyT calibration target: a float in [0, 1], None (keep the dispatchers as they are),
            or ``"auto"`` (the config's ``dyt_target_rate`` for new models, none for runs).
        deploy: time the deployed model (:func:`tokentune.deploy`); False times the model as built.
        quantize: ``"int8-dynamic"``: time the deployed model with int8 Linear layers
            (:mod:`tokentune.core.quantize`); None: as deployed (fp32 or the benchmark's autocast).
        run: a training run directory (``tokentune train``) or export directory instead of a
            method spec.
        config: the configuration text it was parsed from (for the record).
    """

    label: str
    method: str = "lora"
    options: Dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    rate: Union[float, None, str] = AUTO
    deploy: bool = True
    quantize: Optional[str] = None
    run: Optional[str] = None
    config: str = ""


_NEXT_OPTION = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")


def _split_options(text: str) -> List[str]:
    return [part.strip() for part in _NEXT_OPTION.split(text)]


def parse_config(text: str) -> Candidate:
    """``"lora+tome:tome_r=low,label=ToMe low"`` -> a :class:`Candidate` (one-line errors)."""

    source = str(text)
    where = f"--config {source!r}"
    spec, _, opts = source.strip().partition(":")
    spec = spec.strip()
    if not spec or not re.fullmatch(r"[A-Za-z0-9_]+(\s*\+\s*[A-Za-z0-9_]+)*", spec):
        raise TokenTuneError(f"{where}: expected METHOD[+METHOD...][:KEY=VALUE,...], e.g. 'lora+tome:tome_r=low'")
    try:
        methods = parse_method(spec)
    except TokenTuneError as exc:
        raise TokenTuneError(f"{where}: {exc}") from None
    fields: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        if m.config is not None:
            fields[m.name] = typing.get_type_hints(m.config)
    cand = Candidate(label=source.strip(), method=spec.replace(" ", ""), config=source.strip())
    if not opts.strip():
        if ":" in source:
            raise TokenTuneError(f"{where}: nothing after ':'; give KEY=VALUE options or drop the ':'")
        return cand
    seen = set()
    for item in _split_options(opts):
        key, eq, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise TokenTuneError(f"{where}: {item!r} is not KEY=VALUE; separate options with ',' "
                                 "(e.g. 'lora+tome:tome_r=low,label=ToMe low')")
        if not value:
            raise TokenTuneError(f"{where}: option {key!r} has no value")
        if key in seen:
            raise TokenTuneError(f"{where}: option {key!r} is given twice")
        seen.add(key)
        if key in RESERVED:
            _set_reserved(cand, key, value, where)
            continue
        if key.startswith("timm_") and len(key) > 5:
            cand.timm_kwargs[key[5:]] = timm_kwarg(f"{key[5:]}={value}")[1]
            continue
        owner, name = _resolve_key(key, fields, [m.name for m in methods], where)
        hint = fields[owner][name]
        try:
            parsed = convert(hint, value)
        except (ValueError, TypeError) as exc:
            raise TokenTuneError(f"{where}: {owner}_{name}={value!r}: {exc} (expected {describe(hint)})") from None
        cand.options[f"{owner}_{name}"] = parsed
    if cand.rate not in (AUTO, None) and not any(m.set_activation for m in methods):   # token dispatchers
        raise TokenTuneError(f"{where}: rate= calibrates DyT token dispatchers; this spec has none (add dyt)")
    if cand.quantize is not None and not cand.deploy:
        raise TokenTuneError(f"{where}: quantize= quantizes the deployed model; drop deploy=false")
    return cand


def _set_reserved(cand: Candidate, key: str, value: str, where: str) -> None:

    if key == "label":
        cand.label = value
    elif key == "model":
        cand.model = value
    elif key == "deploy":
        try:
            cand.deploy = convert(bool, value)
        except ValueError as exc:
            raise TokenTuneError(f"{where}: deploy={value!r}: {exc}") from None
    elif key == "rate":
        try:
            rate = convert(Optional[float], value)
        except ValueError:
            raise TokenTuneError(f"{where}: rate={value!r} is not a number in [0, 1] or none") from None
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise TokenTuneError(f"{where}: rate={value} is outside [0, 1]")
        cand.rate = rate
    elif key == "quantize":
        quantize = None if value.lower() == "none" else value
        try:
            check_quantize(quantize)
        except TokenTuneError as exc:
            raise TokenTuneError(f"{where}: {exc}") from None
        cand.quantize = quantize


def _resolve_key(key: str, fields: Dict[str, Dict[str, Any]], names: List[str], where: str):
    """``tome_r`` / ``r`` -> ("tome", "r"), or a one-line error naming the valid keys."""

    for owner in sorted(fields, key=len, reverse=True):
        if key.startswith(owner + "_"):
            name = key[len(owner) + 1:]
            if name in fields[owner]:
                return owner, name
            raise TokenTuneError(f"{where}: unknown {owner} option {name!r}; {owner} options: "
                                 f"{', '.join(sorted(fields[owner]))}")
    owners = [o for o in fields if key in fields[o]]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise TokenTuneError(f"{where}: option {key!r} is ambiguous here; write "
                             f"{' or '.join(o + '_' + key for o in owners)}")
    other = next((m for m in available_methods() if key == m or key.startswith(m + "_")), None)
    if other is not None and other not in names:
        raise TokenTuneError(f"{where}: option {key!r} belongs to method {other!r}, which is not in the spec "
                             f"{'+'.join(names)}; add it (e.g. '{'+'.join(names)}+{other}:{key}=...')")
    valid = [f"{o}_{f}" for o in fields for f in sorted(fields[o])] + [f"{k}=" for k in RESERVED] + ["timm_<keyword>="]
    raise TokenTuneError(f"{where}: unknown option {key!r}; valid: {', '.join(valid)}")


def run_candidate(path: str) -> Candidate:
    """``--run DIR``: a training run directory or an export directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise TokenTuneError(f"--run {path!r} is not a directory; pass a run directory (tokentune train) or an "
                             "export directory")
    label = os.path.basename(os.path.normpath(os.path.abspath(path)))
    run = RunDir(path)
    if os.path.isfile(run.config):
        try:
            label = (run.read_config().get("run") or {}).get("label") or label
        except TokenTuneError:          # a damaged config: the folder name labels the row
            pass
    return Candidate(label=label, method="", run=path, config=f"--run {path}")


# ----------------------------------------------------------------------------- building
def _is_deployed(model: nn.Module) -> bool:
    """A model from an export (or a plain timm model) is already deployed."""
    info = info_of(model)
    return info is None or info.deployed


def share_frozen_tensors(model: nn.Module, pool: Dict[tuple, List[torch.Tensor]]) -> int:
    """Make ``model`` use the tensors of earlier models where its frozen parameters/buffers are
    identical (same name, shape, dtype, device and values). Saves one copy of the backbone per
    row (ViT-L); the computation is unchanged. Returns the bytes saved."""
    saved = 0
    for prefix, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for attr, t in list(table.items()):
                if t is None or t.requires_grad:
                    continue
                key = (f"{prefix}.{attr}", tuple(t.shape), t.dtype, t.device)
                for other in pool.get(key, []):
                    if other is t:
                        break
                    if torch.equal(other, t):
                        table[attr] = other
                        saved += t.numel() * t.element_size()
                        break
                else:
                    pool.setdefault(key, []).append(t)
    return saved


def _image_size(model: nn.Module) -> int:
    h, w = input_size(model)
    if h != w:
        raise TokenTuneError(f"non-square input size {(h, w)} is not supported by the benchmark")
    return h


@torch.no_grad()
def _token_counts(model: nn.Module, images: torch.Tensor):
    """(tokens entering the first block, tokens leaving the last) on one of the timed images."""
    try:
        n = num_input_tokens(model)
    except (TokenTuneError, AttributeError):
        return None, None
    if info_of(model) is None:                  # a plain timm model keeps every token
        return n, n
    was_training = model.training
    model.eval()
    try:
        if model._modules.get("task_head") is not None:   # a task model (video clips): the tokens of its state
            _, state = model(images[:1], return_state=True)
            return n, (int(state.size.shape[1]) if state.size is not None else n)
        _, tokens = model(images[:1], return_tokens=True)   # pruning methods keep no sizes: count tokens
    finally:
        model.train(was_training)
    return n, int(tokens.shape[1])


def _hook(model: nn.Module, name: str):
    """The first ``name`` hook of the model's methods (None without one)."""
    if spec_of(model) is None:
        return None
    return next((getattr(m, name) for m in methods_of(model) if getattr(m, name) is not None), None)


def _train_loss(model: nn.Module) -> Callable:

    fn = loss_function(model)
    return lambda images, targets: fn(images, targets, nn.functional.cross_entropy)[0]


@torch.no_grad()
def _targets(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Random targets shaped like the model's outputs without the class dimension (labels, masks)."""
    out = model(inputs[:1])
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, out.shape[1], (inputs.shape[0],) + tuple(out.shape[2:]), generator=g)


def _infer(model: nn.Module, images: torch.Tensor, dtype: str, device: torch.device):
    with torch.inference_mode(), autocast(device, dtype):
        return model(images)


# ----------------------------------------------------------------------------- measuring
@dataclass
class BenchSettings:
    """How a benchmark runs.

    Attributes:
        model: timm model of the configurations (rows may override it with ``model=``).
        image_size: input resolution (None: the model's own).
        batch_size: images per timed forward and per training step.
        dtype: ``fp32``, or ``bf16``/``fp16`` autocast.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        rounds: timed rounds (every row once per round, rotating order).
        warmup: untimed forwards per row before timing.
        latency: measure batch-1 latency too.
        latency_iters: batch-1 forwards per row and round.
        memory: measure the peak memory of one inference forward.
        train: measure the training step.
        train_steps: timed training steps per row (after one warm-up step).
        num_classes: classes of the head of new models.
        pretrained: backbone weights of new models (False: random; speed does not depend on
            them); for runs None keeps what the run recorded.
        timm_kwargs: extra ``timm.create_model`` keywords for new models.
        rate: DyT calibration target for rows without ``rate=`` (None: each row's default).
        seed: seed of the models' initialisation and of the timed batch.
        share_weights: share identical frozen tensors between the deployed rows (memory).
        task: build new models for a task (``segmentation``, ``video``): every number is then per
            sample of the task (per segmentation image, per clip), on its example inputs (random
            images at the input size, random clips of the model's frame count).
        task_options: the task's options (``{"video_frames": 8}``).
        sweep: batch sizes of an extra throughput and peak-memory sweep (empty: none).
    """

    model: str = DEFAULT_MODEL
    image_size: Optional[int] = None
    batch_size: int = 16
    dtype: str = "fp32"
    device: str = "cpu"
    rounds: int = 10
    warmup: int = 2
    latency: bool = True
    latency_iters: int = 3
    memory: bool = True
    train: bool = True
    train_steps: int = 3
    num_classes: int = 100
    pretrained: Union[bool, str, None] = None
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    rate: Optional[float] = None
    seed: int = 0
    share_weights: bool = True
    task: Optional[str] = None
    task_options: Dict[str, Any] = field(default_factory=dict)
    sweep: Sequence[int] = ()


@dataclass
class BenchResult:
    """Rows (one dict per candidate, machine-readable keys), the environment and the settings."""

    rows: List[Dict[str, Any]]
    environment: Dict[str, Any]
    settings: Dict[str, Any]
    title: str


def _resolve_device(device: str) -> torch.device:
    return resolve_device(None if device in (None, AUTO) else device)


def _mib(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2 ** 20


def _say(progress: Optional[Callable[[str], None]], text: str) -> None:
    if progress is not None:
        progress(text)


def _build(cand: Candidate, s: BenchSettings, device: torch.device):

    torch.manual_seed(s.seed)          # every row of a model starts from the same backbone
    if cand.run is not None:
        model = open_model(cand.run, pretrained=s.pretrained)
        deployed = _is_deployed(model)
    else:
        kwargs = dict(s.timm_kwargs)
        kwargs.update(cand.timm_kwargs)
        if s.image_size is not None:
            kwargs.setdefault("img_size", s.image_size)
        try:
            model = create_model(cand.model or s.model, method=cand.method, num_classes=s.num_classes,
                                 pretrained=bool(s.pretrained) if s.pretrained in (None, False, True) else s.pretrained,
                                 task=s.task, **s.task_options, **kwargs, **cand.options)
        except TypeError as exc:
            if "unexpected keyword" not in str(exc):
                raise
            raise TokenTuneError(f"{cand.config or cand.label}: {exc}; check the --timm keywords") from None
        deployed = False
    return model.to(device), deployed


def measure(candidates: Sequence[Candidate], settings: BenchSettings,
            progress: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Build, deploy and measure every candidate; returns one row per candidate, in order.

    The steps: check the settings; per candidate build it (:func:`_build`), describe it (parameters,
    tokens), put its token dispatchers at an activation rate (:func:`_calibrate`), make the network
    that is timed (:func:`_timed_net`) and measure what needs no timing (:func:`_measure_untimed`);
    then time every network interleaved (:func:`_time_all`) and relate the rows (:func:`_result`)."""
    _check_settings(candidates, settings)
    s = settings
    device = _resolve_device(s.device)
    quantized = [c.label for c in candidates if c.quantize]
    if quantized and (device.type != "cpu" or s.dtype != "fp32"):
        raise TokenTuneError(f"{quantized[0]}: quantize=int8-dynamic runs PyTorch's int8 CPU kernels on fp32 models, "
                             f"not {s.dtype} on {device.type}; use --device cpu --dtype fp32 or drop quantize=")
    labels: Dict[str, int] = {}
    rows: List[Dict[str, Any]] = []
    timed: Dict[str, nn.Module] = {}
    pool: Dict[tuple, List[torch.Tensor]] = {}
    image_size, images = s.image_size, None
    for i, cand in enumerate(candidates):
        label = _unique_label(cand.label, labels)
        _say(progress, f"[{i + 1}/{len(candidates)}] {label}: building")
        t0 = time.perf_counter()
        model, is_deployed = _build(cand, s, device)
        size = _image_size(model)
        if image_size is None:
            image_size = size
        elif size != image_size:
            raise TokenTuneError(f"{label}: the model takes {size}px images but the benchmark uses {image_size}px; "
                                 "every row needs the same input size (--image-size)")
        if images is None:          # a task's inputs (clips) come from its head; plain images as always otherwise
            images = (example_images(model, s.batch_size, seed=s.seed).to(device) if task_head_of(model) is not None
                      else random_images(s.batch_size, image_size, s.seed, device))
        row = _describe(cand, model, s, label, is_deployed)
        row["tokens_in"], row["tokens_out"] = _token_counts(model, images)
        has_dispatchers = _calibrate(cand, model, images, s, label, row)
        net = _timed_net(model, cand, is_deployed, s, pool, images, row)
        if s.train and not is_deployed and not cand.quantize and any(p.requires_grad for p in model.parameters()):
            _say(progress, f"[{i + 1}/{len(candidates)}] {label}: training step")
        _measure_untimed(row, model, net, images, s, device, image_size, has_dispatchers, is_deployed)
        del model
        gc.collect()
        timed[label] = net
        rows.append(row)
        _say(progress, f"[{i + 1}/{len(candidates)}] {label}: {row['gmacs']:.3g} GMACs, "
                       f"{row['params_total'] / 1e6:.2f}M params ({time.perf_counter() - t0:.1f} s)")
    _time_all(timed, rows, s, image_size, device, progress, images)
    return _result(rows, s, device, image_size, images)


def _check_settings(candidates: Sequence[Candidate], s: BenchSettings) -> None:
    if not candidates:
        raise TokenTuneError("nothing to measure; give at least one --config (e.g. --config lora) or --run DIR")
    if s.dtype not in DTYPES:
        raise TokenTuneError(f"unknown dtype {s.dtype!r}; choose from {', '.join(DTYPES)}")
    for name, value in (("batch size", s.batch_size), ("rounds", s.rounds), ("latency iterations", s.latency_iters),
                        ("training steps", s.train_steps), *(("sweep batch size", b) for b in s.sweep)):
        if value < 1:
            raise TokenTuneError(f"{name} must be at least 1, got {value}")
    if s.warmup < 0:
        raise TokenTuneError(f"warm-up must be >= 0, got {s.warmup}")


def _unique_label(label: str, labels: Dict[str, int]) -> str:
    """Rows are keyed by label: a repeated one gets a number."""
    if label in labels:
        labels[label] += 1
        label = f"{label} ({labels[label]})"
    labels.setdefault(label, 1)
    return label


def _describe(cand: Candidate, model: nn.Module, s: BenchSettings, label: str, is_deployed: bool) -> Dict[str, Any]:
    """A row's description: what was built, its parameters as a whole and as the papers count them."""
    counts = count_parameters(model)
    head = task_head_of(model)
    return {
        "label": label, "unit": head.unit if head is not None else "image", "config": cand.config,
        "run": os.path.abspath(cand.run) if cand.run else None,
        "model": ((spec_of(model) or {}).get("model")
                  or cand.model or (s.model if cand.run is None else type(model).__name__)),
        "method": (spec_of(model) or {}).get("method", cand.method or "deployed"),
        "options": {k: v for k, v in cand.options.items()},
        "deployed": bool(cand.deploy or is_deployed),
        "quantize": cand.quantize, "int8_logit_diff": None,
        "params_total": int(counts["total"]),
        "params_trainable": None if is_deployed else int(counts["trainable"]),
        "paper_trainable": None if is_deployed else int(counts["paper_trainable"]),
        "paper_pct": None if is_deployed else float(counts["paper_pct"]),
        "backbone_params": int(counts["backbone"]),
    }


def _calibrate(cand: Candidate, model: nn.Module, images: torch.Tensor, s: BenchSettings, label: str,
               row: Dict[str, Any]) -> bool:
    """Put untrained token dispatchers (DyT's) at an activation rate on the timed batch; whether there are any."""
    has_dispatchers = bool(dispatchers(model))
    set_activation, target = _hook(model, "set_activation"), _hook(model, "activation_target")
    rate = cand.rate
    if rate == AUTO:
        rate = s.rate if s.rate is not None else (
            target(model) if target is not None and cand.run is None else None)
    if rate is not None and has_dispatchers:
        if set_activation is None:
            raise TokenTuneError(f"{label}: rate= needs a method that can set its dispatchers' activation rate")
        set_activation(model, images, float(rate))
    elif cand.rate not in (AUTO, None) and not has_dispatchers:
        raise TokenTuneError(f"{label}: rate= calibrates token dispatchers (DyT); this model has none")
    row["calibrated_rate"] = float(rate) if (rate is not None and has_dispatchers) else None
    return has_dispatchers


def _timed_net(model: nn.Module, cand: Candidate, is_deployed: bool, s: BenchSettings,
               pool: Dict[tuple, List[torch.Tensor]], images: torch.Tensor, row: Dict[str, Any]) -> nn.Module:
    """The network that is timed: deployed when asked (in int8 with ``quantize=``), an eval-mode copy
    otherwise (frozen tensors shared)."""
    if is_deployed:
        net = model.eval()
    elif cand.deploy:
        net = deploy(model)
    else:
        net = copy.deepcopy(model).eval()
    if cand.quantize:
        net = _quantized(net, images, row)
    if s.share_weights:
        share_frozen_tensors(net, pool)
    return net


def _quantized(net: nn.Module, images: torch.Tensor, row: Dict[str, Any]) -> nn.Module:
    """The int8 form of the deployed ``net`` (made in place); into ``row``: the FLOPs of the fp32 model (the
    same multiply-adds, in int8; the FLOP counter does not see int8 kernels) and the largest absolute
    difference of the int8 logits from the fp32 ones on ``images``."""
    row["flops"] = count_flops(net, images) / images.shape[0]
    with torch.inference_mode():
        want = net(images).float()
    net = quantize_dynamic_int8(net)
    with torch.inference_mode():
        got = net(images).float()
    row["int8_logit_diff"] = float((got - want).abs().max())
    return net


def _measure_untimed(row: Dict[str, Any], model: nn.Module, net: nn.Module, images: torch.Tensor, s: BenchSettings,
                     device: torch.device, image_size: int, has_dispatchers: bool, is_deployed: bool) -> None:
    """FLOPs, the dispatchers' activation, inference memory and a training step: into ``row``."""
    flops = row["flops"] if row["quantize"] else count_flops(net, images) / s.batch_size   # int8: of its fp32 form
    row.update(flops=flops, gflops=flops / 1e9, gmacs=flops / 2e9)
    row["activation"] = None
    if has_dispatchers:
        with torch.inference_mode():
            _, state = net(images, return_state=True)
        rate_now = activation_rate(state)
        row["activation"] = None if rate_now is None else float(rate_now)
    row["infer_peak_mib"] = (_mib(bench.peak_memory(functools.partial(_infer, net, images, s.dtype, device),
                                                    device)) if s.memory else None)
    row["train_step_s"] = row["train_img_per_s"] = row["train_peak_mib"] = None
    if s.train and not is_deployed and not row["quantize"] and any(p.requires_grad for p in model.parameters()):
        step = bench.measure_train_step(model, batch_size=s.batch_size, image_size=image_size,
                                        steps=s.train_steps, warmup=1, dtype=s.dtype, device=device,
                                        loss=_train_loss(model), inputs=images, targets=_targets(net, images))
        row.update(train_step_s=step["seconds_per_step"], train_img_per_s=s.batch_size / step["seconds_per_step"],
                   train_peak_mib=_mib(step["peak_memory_bytes"]))


def _result(rows: List[Dict[str, Any]], s: BenchSettings, device: torch.device, image_size: int,
            images: torch.Tensor) -> BenchResult:
    """The rows relative to the first (FLOPs ratio, speed-up), the environment, the settings and a title."""
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = base["flops"] / row["flops"] if row["flops"] else None
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        if row.get("latency_ms") is not None:
            row["latency_speedup"] = base["latency_ms"] / row["latency_ms"]
    env = bench.environment(device, s.dtype)
    settings_record = {k: v for k, v in dataclasses.asdict(s).items()}
    settings_record.update(image_size=image_size, device=str(device), baseline=base["label"])
    unit = rows[0]["unit"]
    what = f"{s.task} task, per {unit}" + (f" of {images.shape[1]} frames" if images.dim() == 5 else "")
    title = (f"{s.model if all(r['model'] == s.model for r in rows) else 'several models'} {image_size}px, "
             + (f"{what}, " if s.task else "") +
             f"batch {s.batch_size}, {s.dtype}, {device}, {torch.get_num_threads()} threads, {s.rounds} interleaved "
             f"rounds after {s.warmup} warm-up")
    return BenchResult(rows=rows, environment=env, settings=settings_record, title=title)


def _time_all(timed: Dict[str, nn.Module], rows: List[Dict[str, Any]], s: BenchSettings, image_size: int,
              device: torch.device, progress, images: torch.Tensor) -> None:
    start = time.perf_counter()

    def report(what):
        def cb(done, total):
            if done == 0:
                _say(progress, f"{what}: warm-up done, timing {total} rounds")
                return
            elapsed = time.perf_counter() - start
            left = elapsed / done * (total - done)
            _say(progress, f"{what}: round {done}/{total} ({elapsed:.0f} s, about {left:.0f} s left)")
        return cb

    _say(progress, f"throughput: {len(timed)} model(s), batch {s.batch_size}, {s.warmup} warm-up + {s.rounds} rounds")
    stats = measure_throughput(timed, batch_size=s.batch_size, image_size=image_size, rounds=s.rounds,
                                     warmup=s.warmup, dtype=s.dtype, device=device, seed=s.seed,
                                     progress=report("throughput"), images=images)
    for row in rows:
        st = stats[row["label"]]
        row.update(img_per_s=st.median, img_per_s_low=st.low, img_per_s_high=st.high,
                   batch_ms=1000.0 * st.seconds_per_batch)
    for row in rows:
        row["latency_ms"] = row["latency_ms_low"] = row["latency_ms_high"] = None
        row["sweep"] = {}
    for b in s.sweep:
        start = time.perf_counter()
        images = random_images(b, image_size, s.seed, device)
        sweep = measure_throughput(timed, images=images, rounds=s.rounds, warmup=max(s.warmup, 1), dtype=s.dtype,
                                   device=device, progress=report(f"batch {b}"))
        for row in rows:
            st, net = sweep[row["label"]], timed[row["label"]]
            peak = (bench.peak_memory(functools.partial(_infer, net, images, s.dtype, device), device)
                    if s.memory else None)
            row["sweep"][str(b)] = {"img_per_s": st.median, "img_per_s_low": st.low, "img_per_s_high": st.high,
                                    "speedup": st.median / sweep[rows[0]["label"]].median, "peak_mib": _mib(peak)}
    if s.latency:
        start = time.perf_counter()
        lat = measure_throughput(timed, batch_size=1, image_size=image_size, rounds=s.rounds,
                                       warmup=max(s.warmup, 1), iters_per_round=s.latency_iters, dtype=s.dtype,
                                       device=device, seed=s.seed, progress=report("batch-1 latency"),
                                       images=images[:1])
        for row in rows:
            st = lat[row["label"]]
            row.update(latency_ms=1000.0 / st.median, latency_ms_low=1000.0 / st.high,
                       latency_ms_high=1000.0 / st.low)


# ----------------------------------------------------------------------------- reporting
def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return format(value, spec)


def display_rows(result: BenchResult) -> List[Dict[str, str]]:
    """The table shown on screen and in Markdown (formatted strings; the JSON keeps raw numbers)."""
    rows = result.rows
    several_models = len({r["model"] for r in rows}) > 1
    any_dyt = any(r["activation"] is not None for r in rows)
    any_train = any(r["train_step_s"] is not None for r in rows)
    any_mem = any(r["infer_peak_mib"] is not None for r in rows)
    any_latency = any(r.get("latency_ms") is not None for r in rows)
    any_int8 = any(r.get("quantize") for r in rows)
    out = []
    for r in rows:
        d: Dict[str, str] = {"config": r["label"]}
        if several_models:
            d["model"] = r["model"]
        d["method"] = r["method"]
        if any_int8:
            d["precision"] = r["quantize"] or result.settings["dtype"]
        d["params"] = f"{r['params_total'] / 1e6:.2f}M"
        d["trainable"] = _fmt(r["params_trainable"], ",")
        d["paper count (%)"] = ("" if r["paper_trainable"] is None
                                else f"{r['paper_trainable']:,} ({r['paper_pct']:.3f}%)")
        d["tokens"] = ("" if r["tokens_in"] is None else
                       f"{r['tokens_in']}" if r["tokens_in"] == r["tokens_out"] else f"{r['tokens_in']}->{r['tokens_out']}")
        if any_dyt:
            d["active"] = "" if r["activation"] is None else f"{100 * r['activation']:.1f}%"
        d["GMACs"] = f"{r['gmacs']:.3f}" if r["gmacs"] < 1 else f"{r['gmacs']:.2f}"
        d["FLOPs ratio"] = _fmt(r["flops_ratio"], ".2f") + "x"
        per = "img" if r.get("unit", "image") == "image" else r["unit"] + "s"
        d[f"{per}/s"] = f"{r['img_per_s']:.1f}"
        d[f"{per}/s min-max"] = f"{r['img_per_s_low']:.1f}-{r['img_per_s_high']:.1f}"
        d["speed-up"] = f"{r['speedup']:.2f}x"
        if any_int8:
            d["int8 logit diff"] = _fmt(r.get("int8_logit_diff"), ".3g")
        if any_latency:
            d["b1 latency ms"] = _fmt(r["latency_ms"], ".2f")
        if any_mem:
            d["infer MiB"] = _fmt(r["infer_peak_mib"], ".1f")
        if any_train:
            d["train s/step"] = _fmt(r["train_step_s"], ".3f")
            d["train MiB"] = _fmt(r["train_peak_mib"], ".1f")
        out.append(d)
    return out


NOTES = ("GMACs: multiply-adds per sample (an image; a clip or a segmentation image with --task) of the deployed "
         "model on the timed batch (the papers' \"GFLOPs\"; "
         "attention counted). FLOPs ratio and speed-up: relative to the first row (>1 = fewer FLOPs / faster). "
         "img/s: median over interleaved rounds, min-max beside it. paper count: trainable backbone parameters "
         "without head, as a share of the pretrained backbone (as PYRA/DyT count). tokens: entering the first "
         "block -> after the last. active: DyT activation rate measured on the timed batch. infer/train MiB: "
         "peak memory of one forward / training step (CPU: live tensors, parameters excluded).")
INT8_NOTES = (" precision int8-dynamic: the deployed model with int8 Linear layers (weights per output channel, inputs "
              "per batch; PyTorch's CPU kernels), timed in the same rounds as the fp32 rows; its GMACs are its fp32 "
              "form's (the same multiply-adds, in int8); int8 logit diff: the largest absolute difference of its "
              "logits from the same model deployed in fp32, on the timed batch; no training columns (training runs "
              "the fp32 model).")


def sweep_rows(result: BenchResult) -> List[Dict[str, str]]:
    """The batch-size sweep as a table: per batch size, img/s with the speed-up over the first row,
    and the peak inference memory (empty without a sweep)."""
    out = []
    for r in result.rows:
        if not r.get("sweep"):
            continue
        d = {"config": r["label"]}
        for b, m in r["sweep"].items():
            d[f"b{b} img/s"] = f"{m['img_per_s']:.1f} ({m['speedup']:.2f}x)"
            if m["peak_mib"] is not None:
                d[f"b{b} MiB"] = f"{m['peak_mib']:.1f}"
        out.append(d)
    return out


def markdown(result: BenchResult) -> str:
    """Title, environment, table(s) and notes as Markdown."""
    env = ", ".join(f"{k}={v}" for k, v in result.environment.items())
    table = display_rows(result)
    notes = NOTES + (INT8_NOTES if any(r.get("quantize") for r in result.rows) else "")
    text = (f"## tokentune bench: {result.title}\n\nEnvironment: {env}\n\n"
            f"{bench.markdown_table(table, list(table[0]))}\n\n{notes}\n")
    sweep = sweep_rows(result)
    if sweep:
        text += (f"\n### Batch-size sweep\n\n{bench.markdown_table(sweep, list(sweep[0]))}\n\n"
                 "img/s: median over interleaved rounds at that batch size (speed-up over the first row); "
                 "MiB: peak memory of one inference forward at that batch size.\n")
    return text


CSV_KEYS = ("label", "unit", "model", "method", "config", "run", "deployed", "quantize", "params_total", "params_trainable",
            "paper_trainable", "paper_pct", "backbone_params", "tokens_in", "tokens_out", "calibrated_rate",
            "activation", "flops", "gflops", "gmacs", "flops_ratio", "img_per_s", "img_per_s_low", "img_per_s_high",
            "batch_ms", "speedup", "latency_ms", "latency_ms_low", "latency_ms_high", "latency_speedup",
            "infer_peak_mib", "train_step_s", "train_img_per_s", "train_peak_mib", "int8_logit_diff")


def write_outputs(result: BenchResult, directory: str, name: str) -> Dict[str, str]:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.csv`` into ``directory`` (atomically)."""

    paths = {ext: os.path.join(directory, f"{name}.{ext}") for ext in ("md", "json", "csv")}
    text = markdown(result)

    atomic_write_text(paths["md"], text)
    atomic_write_json(paths["json"], {"title": result.title, "environment": result.environment,
                                      "settings": result.settings, "rows": result.rows})
    buf = io.StringIO()
    batches = list(result.rows[0].get("sweep") or {})
    sweep_keys = [f"b{b}_{k}" for b in batches for k in ("img_per_s", "speedup", "peak_mib")]
    writer = csv.DictWriter(buf, fieldnames=list(CSV_KEYS) + sweep_keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        flat = dict(row, **{f"b{b}_{k}": v for b, m in (row.get("sweep") or {}).items() for k, v in m.items()})
        writer.writerow({k: ("" if flat.get(k) is None else flat.get(k)) for k in list(CSV_KEYS) + sweep_keys})
    atomic_write_text(paths["csv"], buf.getvalue())
    return paths


def default_name(result: BenchResult) -> str:
    s = result.settings
    arch = str(s["model"]).split(".")[0]
    dev = str(s["device"]).split(":")[0]
    return f"bench-{arch}-{s['image_size']}px-b{s['batch_size']}-{s['dtype']}-{dev}"
