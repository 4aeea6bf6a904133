"""``create_model``: a timm ViT, adapted, with methods applied; the one place methods are applied.

A *method spec* is a ``+``-joined list of method names, e.g. ``"lora"``, ``"lora+tome"``,
``"adapter+tome"``, ``"full+tome"``, ``"pyra"`` (= ``lora+tome+pyra``), ``"dyt"``. Each method
has a config dataclass whose fields can be given as prefixed keyword arguments
(``lora_rank=8``, ``tome_r=[16] * 11 + [10]``) or as a whole config (``lora=LoRAConfig(...)``);
every other keyword goes to ``timm.create_model`` (``drop_path_rate``, ``img_size``, ...).

Methods are applied in a fixed order: parameter-efficient tuning (``full``, ``linear``, ``lora``,
``adapter``), then token reduction (``tome``), then what builds on it (``pyra``, ``dyt``).
Only the parameters a method declares (plus the classification head) are left trainable.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import TokenTuneError
from ..parsing import convert
from ..utils import jsonable
from .backbone import architecture_of, create_backbone
from .features import features_only as feature_extractor
from .hub import absolute_source
from .method import BuildContext, Method, available_methods, canonical_spec, get_method, parse_method
from .task import Task, get_task
from .vit import adapt_vit, spec_of

# the classification head(s) and a task's head: trained with train_head, outside the papers' counts
HEAD_PATTERN = r"^(head|head_dist|task_head)\."


def _coerce_config(method: Method, value: Any) -> Any:
    if method.config is None:
        raise TokenTuneError(f"method {method.name!r} takes no options")
    if isinstance(value, method.config):
        return dataclasses.replace(value)
    if isinstance(value, dict):
        return make_config(method, value)
    raise TokenTuneError(f"{method.name}= expects a {method.config.__name__} or a dict, got {type(value).__name__}")


def make_config(method: Method, values: Dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(method.config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TokenTuneError(f"unknown {method.name} option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
    return method.config(**values)


def split_options(methods: Sequence[Method], options: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Separate method configs (by ``name=`` or ``name_field=``) from timm keyword arguments."""
    configs: Dict[str, Any] = {}
    prefixed: Dict[str, Dict[str, Any]] = {}
    timm_kwargs: Dict[str, Any] = {}
    by_name = {m.name: m for m in methods}
    all_names = set(available_methods())
    for key, value in options.items():
        if key in by_name:
            configs[key] = _coerce_config(by_name[key], value)
            continue
        owner = next((m for m in sorted(by_name, key=len, reverse=True) if key.startswith(m + "_")), None)
        if owner is not None and by_name[owner].config is not None:
            prefixed.setdefault(owner, {})[key[len(owner) + 1:]] = value
            continue
        other = next((m for m in all_names if key == m or key.startswith(m + "_")), None)
        if other is not None and other not in by_name:
            raise TokenTuneError(f"option {key!r} belongs to method {other!r}, which is not in the method spec; "
                                 f"add it, e.g. method='{canonical_spec(methods)}+{other}'")
        timm_kwargs[key] = value
    for name, values in prefixed.items():
        base = dataclasses.asdict(configs[name]) if name in configs else {}
        base.update(values)
        configs[name] = make_config(by_name[name], base)
    for m in methods:
        if m.config is not None and m.name not in configs:
            configs[m.name] = m.config()
    return configs, timm_kwargs


def training_free_methods() -> List[str]:
    """The registered methods that work on a trained model without training (``Method.training_free``)."""
    return [n for n in available_methods() if get_method(n).training_free]


def _added_options(method: Method, text: str, item: str) -> Dict[str, Any]:
    """``field=value,field=value`` (fields with or without the ``<method>_`` prefix) -> create_model options."""
    if method.config is None:
        raise TokenTuneError(f"method {method.name!r} takes no options (in {item!r})")
    hints = typing.get_type_hints(method.config)
    options: Dict[str, Any] = {}
    for pair in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):
        key, sep, value = pair.partition("=")
        key = key.strip().removeprefix(method.name + "_")
        if not sep or key not in hints:
            raise TokenTuneError(f"{item!r}: expected {method.name}:FIELD=VALUE[,FIELD=VALUE...] with FIELD one of "
                                 f"{', '.join(hints)}")
        try:
            options[f"{method.name}_{key}"] = convert(hints[key], value.strip())
        except (ValueError, TypeError) as exc:
            raise TokenTuneError(f"{item!r}: {method.name}_{key}: {exc}") from None
    return options


def added_methods(specs: Union[str, Sequence[str]]) -> Tuple[List[str], Dict[str, Any]]:
    """Training-free methods to add to a trained model, as ``tokentune eval --add-method`` gives them.

    Each item is ``NAME[:FIELD=VALUE,...]`` (``"pitome:pitome_r=0.9"``, ``"tome:r=flops:2.0"``); items
    may be repeated or ``+``-joined (``"tome:r=4+..."``). Only methods with ``training_free=True``
    are accepted. Returns the method names and their :func:`create_model` options.
    """
    items = [specs] if isinstance(specs, str) else list(specs)
    names: List[str] = []
    options: Dict[str, Any] = {}
    for spec in items:
        for item in re.split(r"\+(?=\s*[A-Za-z_]\w*\s*(?::|\+|$))", str(spec)):
            name, _, text = item.strip().partition(":")
            if not name:
                raise TokenTuneError(f"empty method in --add-method {spec!r}; write NAME[:FIELD=VALUE,...], e.g. "
                                     "pitome:pitome_r=0.9")
            method = get_method(name.strip().lower())
            if not method.training_free:
                raise TokenTuneError(f"'{method.name}' needs training and cannot be added to a trained model; add a "
                                     f"training-free method: {', '.join(training_free_methods()) or 'none registered'}")
            names.append(method.name)
            if text.strip():
                options.update(_added_options(method, text, item.strip()))
    return names, options


def check_model_options(method: str, options: Dict[str, Any]) -> None:
    """Validate a method spec and its options (one clear error) without building anything."""
    split_options(parse_method(method), options)


def mark_trainable(model: nn.Module, methods: Sequence[Method], train_head: bool = True) -> None:
    """Freeze everything, then unfreeze what the methods (and the head) train."""
    patterns = [re.compile(p) for m in methods for p in m.trainable]
    if train_head:
        patterns.append(re.compile(HEAD_PATTERN))
    for name, param in model.named_parameters():
        param.requires_grad_(any(p.search(name) for p in patterns))


def init_seed(seed: Optional[int] = None) -> int:
    """The seed :func:`create_model` initialises a model from: ``seed``, or one taken from torch's global generator.

    With ``seed=None``: the seed of the last ``torch.manual_seed(s)`` while nothing has drawn from
    the generator since (then ``torch.manual_seed(s); create_model(...)`` builds exactly the model
    it built before seeds were recorded), else a seed drawn from it. Either way the global
    generator moves on by one draw, so two models built in a row differ.
    """
    if seed is not None:
        return int(seed)
    last = torch.initial_seed()
    fresh = torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(last).get_state())
    drawn = int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())
    return last if fresh else drawn


def _task_config(task: Task, options: Dict[str, Any]) -> Any:
    """Take the task's options (``<task>=cfg`` or ``<task>_<field>=``) out of ``options``; its config."""
    values: Dict[str, Any] = {}
    whole = options.pop(task.name, None)
    if whole is not None:
        values.update(dataclasses.asdict(whole) if dataclasses.is_dataclass(whole) else dict(whole))
    for key in [k for k in options if k.startswith(task.name + "_")]:
        values[key[len(task.name) + 1:]] = options.pop(key)
    names = {f.name for f in dataclasses.fields(task.config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TokenTuneError(f"unknown {task.name} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return task.config(**values)


def rebuild_options(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The :func:`create_model` keywords that rebuild the model of a build spec (or a run's config.json),
    besides name, method, num_classes and pretrained: timm keywords, method configs, the task and its config."""
    options = dict(spec.get("timm_kwargs", {}))
    options.update(spec.get("configs", {}))
    if spec.get("task"):
        options["task"] = spec["task"]
        options[spec["task"]] = spec.get("task_config") or {}
    return options


def create_model(name: str, method: str = "lora", num_classes: Optional[int] = None,
                 pretrained: Union[bool, str] = False, *, train_head: bool = True, pretrained_head: bool = False,
                 head_init_std: Optional[float] = None, seed: Optional[int] = None, task: Optional[str] = None,
                 **options) -> nn.Module:
    """Build the timm ViT ``name`` with ``method`` applied.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224.orig_in21k``, ``deit_small_patch16_224``.
        method: method spec, e.g. ``"lora"``, ``"lora+tome"``, ``"pyra"``, ``"dyt"``, ``"full"``.
        num_classes: classes of the new head (None keeps the checkpoint's head). A new head starts from
            timm's initialisation even when the checkpoint's head has as many classes (adapting to a
            new task), unless ``pretrained_head=True``.
        pretrained: False (random init), True (timm hub) or a local ``.npz/.pth/.safetensors`` file.
        train_head: leave the classification head trainable.
        pretrained_head: keep the checkpoint's head when its class count equals ``num_classes``
            (e.g. evaluating or continuing on the checkpoint's own classes).
        head_init_std: re-initialise the head with trunc_normal(std) and zero bias.
        task: ``None`` (image classification) or a registered task (``"segmentation"``, ``"video"``;
            :mod:`tokentune.tasks`) whose head is added (``model.task_head``) with the options
            ``<task>_<field>=`` (``video_frames=8``); ``num_classes`` is then the task's class count.
        seed: seed of every random initialisation (the backbone when ``pretrained=False``, new
            layers, a new head), drawn on torch's CPU generator (models are built on the CPU);
            None takes one from the global generator (see :func:`init_seed`), which the build
            does not otherwise touch. Recorded as ``init_seed`` in ``model.tokentune.spec`` and
            ``config.json``, so :func:`tokentune.load_trained` rebuilds the same frozen weights.
        **options: method options (``lora_rank=8``, ``tome_r=16``, ``lora=LoRAConfig(...)``) and
            timm keyword arguments (``drop_path_rate=0.1``, ``img_size=...``). ``features_only=True``
            (with ``out_indices``, default the last 3 blocks) returns timm's feature extractor over the
            adapted model instead, as ``timm.create_model(..., features_only=True)`` does for ViTs
            (see :func:`tokentune.core.features.features_only`).

    Returns:
        The model (a subclass of the timm model's own class); ``model(x)`` gives logits and
        ``model(x, return_state=True)`` also the final :class:`tokentune.TokenState`.
    """
    if options.pop("features_only", False):
        out_indices = options.pop("out_indices", 3)
        model = create_model(name, method, num_classes, pretrained, train_head=train_head,
                             pretrained_head=pretrained_head, head_init_std=head_init_std, seed=seed, **options)
        return feature_extractor(model, out_indices=out_indices, prune=True)
    methods = parse_method(method)
    task_def = get_task(task) if task else None
    task_cfg = _task_config(task_def, options) if task_def is not None else None
    if task_def is not None and not num_classes:
        raise TokenTuneError(f"the {task} task needs num_classes (its class count)")
    configs, timm_kwargs = split_options(methods, options)
    seed = init_seed(seed)
    with torch.random.fork_rng(devices=[]):     # the model depends on the seed alone
        torch.random.default_generator.manual_seed(seed)
        model = create_backbone(name, pretrained=pretrained, num_classes=num_classes, fresh_head=not pretrained_head,
                                **timm_kwargs)
        adapt_vit(model)
        head = re.compile(HEAD_PATTERN)
        backbone_params = sum(p.numel() for n, p in model.named_parameters() if not head.search(n))
        ctx = BuildContext(model_name=architecture_of(name, model), methods=[m.name for m in methods], configs=configs)
        stored = dict(configs)
        for m in methods:
            recorded = m.apply(model, configs.get(m.name), ctx)
            if recorded is not None:
                stored[m.name] = recorded
        if task_def is not None:
            task_cfg = task_def.apply(model, task_cfg, int(num_classes)) or task_cfg
        if head_init_std is not None:
            init_head(model, head_init_std)
    mark_trainable(model, methods, train_head)
    model.tokentune.spec = {
        "model": absolute_source(name),
        "method": canonical_spec(methods),
        "num_classes": int(num_classes if task_def is not None else model.num_classes),
        "pretrained": pretrained if isinstance(pretrained, (bool, str)) else str(pretrained),
        "configs": jsonable(stored),
        "timm_kwargs": jsonable(timm_kwargs),
        "train_head": train_head,
        "pretrained_head": bool(pretrained_head),
        "backbone_params": backbone_params,
        "init_seed": seed,
    }
    if task_def is not None:
        model.tokentune.spec.update(task=task_def.name, task_config=jsonable(task_cfg))
    return model


@torch.no_grad()
def init_head(model: nn.Module, std: float) -> None:
    """Re-initialise the classification head(s): trunc_normal(std) weights, zero bias."""
    for attr in ("head", "head_dist"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)


def record_config(model: nn.Module, name: str, cfg: Any) -> None:
    """Replace method ``name``'s config in the build spec (e.g. a deployment setting that an
    export must rebuild); the method keeps its own state in ``model.tokentune.state``."""
    spec = spec_of(model)
    if spec is not None:
        spec["configs"] = dict(spec.get("configs", {}), **{name: jsonable(cfg)})


def methods_of(model: nn.Module) -> List[Method]:
    """The methods a model built by :func:`create_model` carries, in application order."""
    spec = spec_of(model)
    if spec is None:
        raise TokenTuneError("this model was not built by tokentune.create_model")
    return parse_method(spec["method"])
