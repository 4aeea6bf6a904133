"""``tokentune bench``: parameters, FLOPs, throughput, latency and memory of several configurations.

Every configuration (a method spec with options, or a trained run / export directory) becomes one
row. All rows are measured in ONE process, on the same random batch, with the instruments of
:mod:`tokentune.bench`:

* parameters: total, trainable (peft's count, head included) and the papers' count
  (:func:`tokentune.params.count_parameters`: backbone without head, as a share of the
  pretrained backbone);
* FLOPs of one forward of the *deployed* model on the timed batch, per image
  (:func:`tokentune.bench.count_flops`: ``torch.utils.flop_counter`` with fused attention
  counted), so ToMe/PYRA schedules and DyT activation rates are reflected; ``GMACs`` = the
  papers' "GFLOPs" (one multiply-add = 1), ``GFLOPs`` = 2 per multiply-add;
* inference throughput of the deployed models (:func:`tokentune.deploy`: LoRA merged; plain
  ``lora`` becomes the plain timm ViT with fused SDPA): warm-up, then timed rounds interleaved
  across all rows with rotating order (:func:`tokentune.bench.measure_throughput`), median and
  min-max of images/s; CUDA is synchronised around every timed call;
* batch-1 latency, measured the same way (interleaved) with batch 1;
* peak memory of one inference forward (:func:`tokentune.bench.peak_memory`; on CPU the peak of
  live tensor storage, parameters excluded);
* training: seconds per step (forward with the method's own training loss, e.g. DyT's
  complete-model pass and distillation, backward, AdamW step on the trainable parameters) and its
  peak memory (:func:`tokentune.bench.measure_train_step`). Training steps are timed model by
  model (not interleaved: every model would have to keep its gradients and optimizer state).

Untrained DyT models have arbitrary activation rates, so their dispatchers are *calibrated*
(:func:`tokentune.dyt.calibrate_activation`): every dispatcher's bias is shifted so that it
activates ``rate`` of the patch tokens of the timed batch (default: the config's
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
* ``timm_<keyword>=VALUE``: a ``timm.create_model`` keyword for this row only
  (``timm_embed_dim=384``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import io
import json
import math
import os
import re
import sys
import textwrap
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from . import bench
from .errors import TokenTuneError

DEFAULT_MODEL = "vit_base_patch16_224"
RESERVED = ("label", "model", "rate", "deploy")
DTYPES = ("fp32", "bf16", "fp16")
AUTO = "auto"

HELP = "measure parameters, FLOPs, throughput, latency and memory of configurations side by side"
DESCRIPTION = ("Build every configuration (--config METHOD[:OPTIONS]) or trained run (--run DIR), deploy it, and "
               "measure parameters, FLOPs (attention counted), interleaved inference throughput (median and "
               "min-max), batch-1 latency, inference memory and training step time and memory, all in one "
               "process on the same random batch. Prints a table and writes Markdown, JSON and CSV files.")


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
    run: Optional[str] = None
    config: str = ""


_NEXT_OPTION = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")


def _split_options(text: str) -> List[str]:
    return [part.strip() for part in _NEXT_OPTION.split(text)]


def parse_config(text: str) -> Candidate:
    """``"lora+tome:tome_r=low,label=ToMe low"`` -> a :class:`Candidate` (one-line errors)."""
    from . import cli
    from .methods import parse_method

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
            cand.timm_kwargs[key[5:]] = cli._timm_kwarg(f"{key[5:]}={value}")[1]
            continue
        owner, name = _resolve_key(key, fields, [m.name for m in methods], where)
        hint = fields[owner][name]
        try:
            parsed = cli.convert(hint, value)
        except (ValueError, TypeError) as exc:
            raise TokenTuneError(f"{where}: {owner}_{name}={value!r}: {exc} (expected {cli.describe(hint)})") from None
        cand.options[f"{owner}_{name}"] = parsed
    if cand.rate not in (AUTO, None) and "dyt" not in [m.name for m in methods]:
        raise TokenTuneError(f"{where}: rate= calibrates DyT token dispatchers; this spec has none (add dyt)")
    return cand


def _set_reserved(cand: Candidate, key: str, value: str, where: str) -> None:
    from . import cli

    if key == "label":
        cand.label = value
    elif key == "model":
        cand.model = value
    elif key == "deploy":
        try:
            cand.deploy = cli.convert(bool, value)
        except ValueError as exc:
            raise TokenTuneError(f"{where}: deploy={value!r}: {exc}") from None
    elif key == "rate":
        try:
            rate = cli.convert(Optional[float], value)
        except ValueError:
            raise TokenTuneError(f"{where}: rate={value!r} is not a number in [0, 1] or none") from None
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise TokenTuneError(f"{where}: rate={value} is outside [0, 1]")
        cand.rate = rate


def _resolve_key(key: str, fields: Dict[str, Dict[str, Any]], names: List[str], where: str):
    """``tome_r`` / ``r`` -> ("tome", "r"), or a one-line error naming the valid keys."""
    from .methods import available_methods

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
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as fh:
                recorded = (json.load(fh).get("run") or {}).get("label")
            label = recorded or label
        except (OSError, ValueError, AttributeError):
            pass
    return Candidate(label=label, method="", run=path, config=f"--run {path}")


# ----------------------------------------------------------------------------- building
def _load_run(path: str, pretrained) -> nn.Module:
    """A model from a run directory (trainable form) or an export directory (deployed form)."""
    try:   # load_model (tokentune.export) reads both kinds of directory
        from .export import load_model
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.export":
            raise
        load_model = None
    if load_model is not None:
        model = load_model(path, pretrained=pretrained)
    else:
        if os.path.isfile(os.path.join(path, "deployed.json")):
            raise TokenTuneError(f"{path!r} is an export directory; this tokentune has no tokentune.export to "
                                 "read it: pass the training run directory instead")
        from .checkpoint import load_trained
        model = load_trained(path, pretrained=pretrained)
    return model


def _is_deployed(model: nn.Module, path: Optional[str]) -> bool:
    return bool(path and os.path.isfile(os.path.join(path, "deployed.json"))
                and not os.path.isfile(os.path.join(path, "config.json")))


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
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise TokenTuneError("cannot tell this model's input size; pass --image-size")
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise TokenTuneError(f"non-square input size {size} is not supported by the benchmark")
    return int(size[0])


def _token_counts(model: nn.Module):
    """(tokens entering the first block, tokens after the last) from the merge schedule."""
    from .model import num_input_tokens
    from .tome import token_counts

    try:
        n = num_input_tokens(model)
    except (TokenTuneError, AttributeError):
        return None, None
    schedule = getattr(model, "tome_schedule", None)
    if schedule is None:
        r = (((getattr(model, "tokentune_spec", None) or {}).get("configs") or {}).get("tome") or {}).get("r")
        schedule = r if isinstance(r, list) else None
    return n, (token_counts(schedule, n)[-1] if schedule else n)


def _train_loss(model: nn.Module) -> Callable:
    from .train import loss_function

    fn = loss_function(model)
    return lambda images, targets: fn(images, targets, nn.functional.cross_entropy)[0]


def _infer(model: nn.Module, images: torch.Tensor, dtype: str, device: torch.device):
    with torch.inference_mode(), bench._autocast(device, dtype):
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


@dataclass
class BenchResult:
    """Rows (one dict per candidate, machine-readable keys), the environment and the settings."""

    rows: List[Dict[str, Any]]
    environment: Dict[str, Any]
    settings: Dict[str, Any]
    title: str


def _resolve_device(device: str) -> torch.device:
    from .distributed import resolve_device
    return resolve_device(None if device in (None, AUTO) else device)


def _mib(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 2 ** 20


def _say(progress: Optional[Callable[[str], None]], text: str) -> None:
    if progress is not None:
        progress(text)


def _build(cand: Candidate, s: BenchSettings, device: torch.device):
    from .methods import create_model

    torch.manual_seed(s.seed)          # every row of a model starts from the same backbone
    if cand.run is not None:
        model = _load_run(cand.run, s.pretrained)
        deployed = _is_deployed(model, cand.run)
    else:
        kwargs = dict(s.timm_kwargs)
        kwargs.update(cand.timm_kwargs)
        if s.image_size is not None:
            kwargs.setdefault("img_size", s.image_size)
        try:
            model = create_model(cand.model or s.model, method=cand.method, num_classes=s.num_classes,
                                 pretrained=bool(s.pretrained) if s.pretrained in (None, False, True) else s.pretrained,
                                 **kwargs, **cand.options)
        except TypeError as exc:
            if "unexpected keyword" not in str(exc):
                raise
            raise TokenTuneError(f"{cand.config or cand.label}: {exc}; check the --timm keywords") from None
        deployed = False
    return model.to(device), deployed


def measure(candidates: Sequence[Candidate], settings: BenchSettings,
            progress: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Build, deploy and measure every candidate; returns one row per candidate, in order."""
    from .deploy import deploy
    from .params import count_parameters

    if not candidates:
        raise TokenTuneError("nothing to measure; give at least one --config (e.g. --config lora) or --run DIR")
    s = settings
    if s.dtype not in DTYPES:
        raise TokenTuneError(f"unknown dtype {s.dtype!r}; choose from {', '.join(DTYPES)}")
    for name, value in (("batch size", s.batch_size), ("rounds", s.rounds), ("latency iterations", s.latency_iters),
                        ("training steps", s.train_steps)):
        if value < 1:
            raise TokenTuneError(f"{name} must be at least 1, got {value}")
    if s.warmup < 0:
        raise TokenTuneError(f"warm-up must be >= 0, got {s.warmup}")
    device = _resolve_device(s.device)
    labels: Dict[str, int] = {}
    rows: List[Dict[str, Any]] = []
    timed: Dict[str, nn.Module] = {}
    pool: Dict[tuple, List[torch.Tensor]] = {}
    image_size = s.image_size
    images = None
    for i, cand in enumerate(candidates):
        label = cand.label
        if label in labels:             # rows are keyed by label: keep them apart
            labels[label] += 1
            label = f"{label} ({labels[label]})"
        labels.setdefault(label, 1)
        _say(progress, f"[{i + 1}/{len(candidates)}] {label}: building")
        t0 = time.perf_counter()
        model, is_deployed = _build(cand, s, device)
        size = _image_size(model)
        if image_size is None:
            image_size = size
        elif size != image_size:
            raise TokenTuneError(f"{label}: the model takes {size}px images but the benchmark uses {image_size}px; "
                                 "every row needs the same input size (--image-size)")
        if images is None:
            images = bench.random_images(s.batch_size, image_size, s.seed, device)
        counts = count_parameters(model)
        row: Dict[str, Any] = {
            "label": label, "config": cand.config, "run": os.path.abspath(cand.run) if cand.run else None,
            "model": ((getattr(model, "tokentune_spec", None) or {}).get("model")
                      or cand.model or (s.model if cand.run is None else type(model).__name__)),
            "method": (getattr(model, "tokentune_spec", None) or {}).get("method", cand.method or "deployed"),
            "options": {k: v for k, v in cand.options.items()},
            "deployed": bool(cand.deploy or is_deployed),
            "params_total": int(counts["total"]),
            "params_trainable": None if is_deployed else int(counts["trainable"]),
            "paper_trainable": None if is_deployed else int(counts["paper_trainable"]),
            "paper_pct": None if is_deployed else float(counts["paper_pct"]),
            "backbone_params": int(counts["backbone"]),
        }
        row["tokens_in"], row["tokens_out"] = _token_counts(model)
        # DyT: calibrate untrained dispatchers on the timed batch
        from . import dyt
        has_dispatchers = bool(dyt.dispatchers(model))
        rate = cand.rate
        if rate == AUTO:
            rate = s.rate if s.rate is not None else (
                getattr(getattr(model, "dyt_config", None), "target_rate", None) if cand.run is None else None)
        if rate is not None and has_dispatchers:
            dyt.calibrate_activation(model, images, float(rate))
        elif cand.rate not in (AUTO, None) and not has_dispatchers:
            raise TokenTuneError(f"{label}: rate= calibrates DyT token dispatchers; this model has none")
        row["calibrated_rate"] = float(rate) if (rate is not None and has_dispatchers) else None
        if is_deployed:
            net = model.eval()
        elif cand.deploy:
            net = deploy(model)
        else:
            net = copy.deepcopy(model).eval()
        if s.share_weights:
            share_frozen_tensors(net, pool)
        flops = bench.count_flops(net, images) / s.batch_size
        row.update(flops=flops, gflops=flops / 1e9, gmacs=flops / 2e9)
        row["activation"] = None
        if has_dispatchers:
            with torch.inference_mode():
                _, state = net(images, return_state=True)
            rate_now = dyt.activation_rate(state)
            row["activation"] = None if rate_now is None else float(rate_now)
        row["infer_peak_mib"] = (_mib(bench.peak_memory(lambda: _infer(net, images, s.dtype, device), device))
                                 if s.memory else None)
        row["train_step_s"] = row["train_img_per_s"] = row["train_peak_mib"] = None
        if s.train and not is_deployed and any(p.requires_grad for p in model.parameters()):
            _say(progress, f"[{i + 1}/{len(candidates)}] {label}: training step")
            step = bench.measure_train_step(model, batch_size=s.batch_size, image_size=image_size,
                                            steps=s.train_steps, warmup=1, dtype=s.dtype, device=device,
                                            loss=_train_loss(model))
            row.update(train_step_s=step["seconds_per_step"], train_img_per_s=s.batch_size / step["seconds_per_step"],
                       train_peak_mib=_mib(step["peak_memory_bytes"]))
        del model
        gc.collect()
        timed[label] = net
        rows.append(row)
        _say(progress, f"[{i + 1}/{len(candidates)}] {label}: {row['gmacs']:.3g} GMACs, "
                       f"{row['params_total'] / 1e6:.2f}M params ({time.perf_counter() - t0:.1f} s)")
    _time_all(timed, rows, s, image_size, device, progress)
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = base["flops"] / row["flops"] if row["flops"] else None
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        if row.get("latency_ms") is not None:
            row["latency_speedup"] = base["latency_ms"] / row["latency_ms"]
    env = bench.environment(device, s.dtype)
    settings_record = {k: v for k, v in dataclasses.asdict(s).items()}
    settings_record.update(image_size=image_size, device=str(device), baseline=base["label"])
    title = (f"{s.model if all(r['model'] == s.model for r in rows) else 'several models'} {image_size}px, "
             f"batch {s.batch_size}, {s.dtype}, {device}, {torch.get_num_threads()} threads, {s.rounds} interleaved "
             f"rounds after {s.warmup} warm-up")
    return BenchResult(rows=rows, environment=env, settings=settings_record, title=title)


def _time_all(timed: Dict[str, nn.Module], rows: List[Dict[str, Any]], s: BenchSettings, image_size: int,
              device: torch.device, progress) -> None:
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
    stats = bench.measure_throughput(timed, batch_size=s.batch_size, image_size=image_size, rounds=s.rounds,
                                     warmup=s.warmup, dtype=s.dtype, device=device, seed=s.seed,
                                     progress=report("throughput"))
    for row in rows:
        st = stats[row["label"]]
        row.update(img_per_s=st.median, img_per_s_low=st.low, img_per_s_high=st.high,
                   batch_ms=1000.0 * st.seconds_per_batch)
    for row in rows:
        row["latency_ms"] = row["latency_ms_low"] = row["latency_ms_high"] = None
    if s.latency:
        start = time.perf_counter()
        lat = bench.measure_throughput(timed, batch_size=1, image_size=image_size, rounds=s.rounds,
                                       warmup=max(s.warmup, 1), iters_per_round=s.latency_iters, dtype=s.dtype,
                                       device=device, seed=s.seed, progress=report("batch-1 latency"))
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
    out = []
    for r in rows:
        d: Dict[str, str] = {"config": r["label"]}
        if several_models:
            d["model"] = r["model"]
        d["method"] = r["method"]
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
        d["img/s"] = f"{r['img_per_s']:.1f}"
        d["img/s min-max"] = f"{r['img_per_s_low']:.1f}-{r['img_per_s_high']:.1f}"
        d["speed-up"] = f"{r['speedup']:.2f}x"
        if any_latency:
            d["b1 latency ms"] = _fmt(r["latency_ms"], ".2f")
        if any_mem:
            d["infer MiB"] = _fmt(r["infer_peak_mib"], ".1f")
        if any_train:
            d["train s/step"] = _fmt(r["train_step_s"], ".3f")
            d["train MiB"] = _fmt(r["train_peak_mib"], ".1f")
        out.append(d)
    return out


NOTES = ("GMACs: multiply-adds per image of the deployed model on the timed batch (the papers' \"GFLOPs\"; "
         "attention counted). FLOPs ratio and speed-up: relative to the first row (>1 = fewer FLOPs / faster). "
         "img/s: median over interleaved rounds, min-max beside it. paper count: trainable backbone parameters "
         "without head, as a share of the pretrained backbone (as PYRA/DyT count). tokens: entering the first "
         "block -> after the last. active: DyT activation rate measured on the timed batch. infer/train MiB: "
         "peak memory of one forward / training step (CPU: live tensors, parameters excluded).")


def markdown(result: BenchResult) -> str:
    """Title, environment, table and notes as Markdown."""
    env = ", ".join(f"{k}={v}" for k, v in result.environment.items())
    table = display_rows(result)
    return (f"## tokentune bench: {result.title}\n\nEnvironment: {env}\n\n"
            f"{bench.markdown_table(table, list(table[0]))}\n\n{NOTES}\n")


CSV_KEYS = ("label", "model", "method", "config", "run", "deployed", "params_total", "params_trainable",
            "paper_trainable", "paper_pct", "backbone_params", "tokens_in", "tokens_out", "calibrated_rate",
            "activation", "flops", "gflops", "gmacs", "flops_ratio", "img_per_s", "img_per_s_low", "img_per_s_high",
            "batch_ms", "speedup", "latency_ms", "latency_ms_low", "latency_ms_high", "latency_speedup",
            "infer_peak_mib", "train_step_s", "train_img_per_s", "train_peak_mib")


def write_outputs(result: BenchResult, directory: str, name: str) -> Dict[str, str]:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.csv`` into ``directory`` (atomically)."""
    from .checkpoint import atomic_write, atomic_write_json

    paths = {ext: os.path.join(directory, f"{name}.{ext}") for ext in ("md", "json", "csv")}
    text = markdown(result)

    def write_text(content):
        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                fh.write(content)
        return write

    atomic_write(paths["md"], write_text(text))
    atomic_write_json(paths["json"], {"title": result.title, "environment": result.environment,
                                      "settings": result.settings, "rows": result.rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_KEYS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_KEYS})
    atomic_write(paths["csv"], write_text(buf.getvalue()))
    return paths


def default_name(result: BenchResult) -> str:
    s = result.settings
    arch = str(s["model"]).split(".")[0]
    dev = str(s["device"]).split(":")[0]
    return f"bench-{arch}-{s['image_size']}px-b{s['batch_size']}-{s['dtype']}-{dev}"


# ----------------------------------------------------------------------------- command line
EPILOG = """configuration syntax (--config, repeatable; rows keep the order given):
  METHOD[+METHOD...][:KEY=VALUE[,KEY=VALUE...]]
  METHOD   a method spec as in 'tokentune train --method': lora, lora+tome, pyra, dyt, dyt+tome,
           adapter+tome, full+tome, linear, ...
  KEY      <method>_<field> (tome_r, lora_rank, dyt_variant, pyra_variant, adapter_bottleneck, ...),
           or <field> alone when one method of the spec has it (r, rank, variant); values as in
           'tokentune train' (lists 16,16,10 or 16x11,10; true/false; none). A comma starts the next
           option only when NAME= follows it, so list values keep their commas. Reserved keys:
             label=TEXT    the row's name (default: the configuration text)
             model=NAME    another timm model for this row (e.g. the small-model baseline)
             rate=R        DyT: calibrate the untrained dispatchers to activate R of the patch tokens
                           of the timed batch (default: dyt_target_rate, 0.5; none: as initialised)
             deploy=false  time the training form (eval mode) instead of tokentune.deploy's model
             timm_<kw>=V   a timm.create_model keyword for this row only (timm_embed_dim=384)
  --run DIR adds a trained run directory (tokentune train) or an export directory as a row.

The first row is the baseline of the FLOPs ratio and speed-up columns. Every model is deployed
(LoRA merged; plain LoRA becomes the timm ViT with fused SDPA) and timed in interleaved rounds on
the same random batch. Random weights are fine for speed (--pretrained none, the default for
new models); DyT is calibrated as above because its cost depends on its activation rate.

examples:
  tokentune bench --config lora --config lora+tome:tome_r=low --config pyra:tome_r=high
  tokentune bench --config lora --config "dyt:dyt_variant=layer,rate=0.5" --config dyt+tome:tome_r=8
  tokentune bench --config lora --config "lora:model=vit_small_patch16_224,rank=4,label=ViT-S LoRA" --no-train
  tokentune bench --config lora --run runs/cifar-pyra --run exports/cifar-dyt --dtype bf16 --device cuda"""


class _Entry(argparse.Action):
    """--config and --run append to one ordered list, so rows keep the command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        entries = list(getattr(namespace, "entries", None) or [])
        entries.append(("run" if option_string == "--run" else "config", values))
        namespace.entries = entries


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``tokentune bench``."""
    from . import cli

    parser.formatter_class = argparse.RawDescriptionHelpFormatter   # keeps the syntax block below as written
    parser.description = textwrap.fill(DESCRIPTION, 100)
    parser.epilog = EPILOG
    parser.set_defaults(entries=[])
    g = parser.add_argument_group("what to measure")
    g.add_argument("--config", action=_Entry, metavar="SPEC", dest="entries",
                   help="a configuration METHOD[:KEY=VALUE,...] (syntax below); repeatable")
    g.add_argument("--run", action=_Entry, metavar="DIR", dest="entries",
                   help="a trained run directory or export directory; repeatable")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"timm ViT of the configurations [default: {DEFAULT_MODEL}]")
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="input resolution [default: the model's, 224 for the ViT-B/16]")
    g.add_argument("--num-classes", type=int, default=100, metavar="N", help="head classes of new models [default: 100]")
    g.add_argument("--pretrained", type=cli._pretrained, default=None, metavar="hub|PATH|none",
                   help="backbone weights [default: random for new models (speed does not depend on them), as "
                        "recorded for --run]")
    g.add_argument("--timm", type=cli._timm_kwarg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keyword for new models, repeatable (e.g. --timm embed_dim=64)")
    g.add_argument("--rate", type=float, default=None, metavar="R",
                   help="calibrate every DyT row without its own rate= (runs included) to activation R")
    g = parser.add_argument_group("how to measure")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="batch of the throughput and training "
                   "measurements [default: 16]")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32, or bf16/fp16 autocast [default: fp32]")
    g.add_argument("--device", default=AUTO, metavar="DEV", help="auto, cpu, cuda, cuda:N [default: auto]")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (torch.set_num_threads) "
                   "[default: torch's]")
    g.add_argument("--rounds", type=int, default=10, metavar="N", help="timed interleaved rounds [default: 10]")
    g.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed forwards per model first [default: 2]")
    g.add_argument("--latency-iters", type=int, default=3, metavar="N",
                   help="batch-1 forwards per model and round [default: 3]")
    g.add_argument("--train-steps", type=int, default=3, metavar="N", help="timed training steps [default: 3]")
    g.add_argument("--no-train", action="store_true", help="skip the training step measurement")
    g.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    g.add_argument("--no-memory", action="store_true", help="skip the inference peak-memory measurement")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the weights and the batch [default: 0]")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for NAME.md, NAME.json and NAME.csv [default: bench-results]")
    g.add_argument("--name", default=None, metavar="NAME",
                   help="file name stem [default: bench-<model>-<size>px-b<batch>-<dtype>-<device>]")
    g.add_argument("--quiet", action="store_true", help="no progress lines (on stderr)")


def candidates_from_args(args: argparse.Namespace) -> List[Candidate]:
    """Parse every --config / --run (all syntax errors before any model is built)."""
    out = []
    for kind, value in args.entries or []:
        out.append(run_candidate(value) if kind == "run" else parse_config(value))
    if not out:
        raise TokenTuneError("nothing to measure; give configurations, e.g. tokentune bench --config lora "
                             "--config lora+tome:tome_r=low")
    return out


def run_bench(args: argparse.Namespace) -> int:
    """``tokentune bench``: measure, print the table, write the files."""
    candidates = candidates_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise TokenTuneError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = BenchSettings(model=args.model, image_size=args.image_size, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, rounds=args.rounds, warmup=args.warmup, latency=not args.no_latency,
                             latency_iters=args.latency_iters, memory=not args.no_memory, train=not args.no_train,
                             train_steps=args.train_steps, num_classes=args.num_classes, pretrained=args.pretrained,
                             timm_kwargs=dict(args.timm or []), rate=args.rate, seed=args.seed)
    if args.rate is not None and not 0.0 <= args.rate <= 1.0:
        raise TokenTuneError(f"--rate must be in [0, 1], got {args.rate}")
    progress = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    result = measure(candidates, settings, progress=progress)
    print(markdown(result), end="")
    paths = write_outputs(result, args.out, args.name or default_name(result))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['csv']}")
    return 0
