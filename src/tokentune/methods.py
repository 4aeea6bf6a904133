"""Method registry and :func:`create_model`: the one place where methods are applied.

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
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapter import AdapterConfig, apply_adapters
from .backbone import create_backbone
from .errors import TokenTuneError
from .lora import LoRAConfig, apply_lora
from .model import adapt_vit, adapted_blocks, num_input_tokens
from .tome import TokenMerging, ToMeConfig, fit_schedule, named_schedule, parse_schedule

HEAD_PATTERN = r"^(head|head_dist)\."


@dataclass
class Method:
    """A registered method.

    Attributes:
        name: spec name.
        config: its config dataclass (None if it has no options).
        apply: ``apply(model, cfg, ctx)`` modifies the adapted model in place.
        trainable: regexes of parameter names the method trains.
        order: application order (PEFT 10-19, token reduction 20-29, built on top 30+).
        peft: whether it decides how the backbone is tuned (full/linear/lora/adapter/dyt).
        implies: methods it needs (``pyra`` implies ``tome``).
        default_peft: PEFT method added when the spec names none.
        deploy: ``deploy(model)`` folds/switches the method for inference (in place).
        exclude_from_paper_count: regexes of trainable names the papers do not count.
        loss: ``loss(model, images, targets, criterion) -> (loss, logs)`` replacing the plain
            ``criterion(model(images), targets)`` in training (DyT's rate/distillation losses);
            ``logs`` is a dict of floats for progress output. At most one method per model has one.
        on_step: ``on_step(model, progress)`` called by the training loop before every optimizer
            step, ``progress`` = steps done / total steps in [0, 1] (DyT's temperature schedule).
        summary: one line for ``--help``.
    """

    name: str
    config: Optional[type]
    apply: Callable[[nn.Module, Any, "BuildContext"], None]
    trainable: Tuple[str, ...] = ()
    order: int = 50
    peft: bool = False
    implies: Tuple[str, ...] = ()
    default_peft: Optional[str] = None
    deploy: Optional[Callable[[nn.Module], None]] = None
    exclude_from_paper_count: Tuple[str, ...] = ()
    loss: Optional[Callable] = None
    on_step: Optional[Callable[[nn.Module, float], None]] = None
    summary: str = ""


@dataclass
class BuildContext:
    """What a method's ``apply`` may need to know."""

    model_name: str
    methods: List[str]
    configs: Dict[str, Any] = field(default_factory=dict)


_REGISTRY: Dict[str, Method] = {}
# methods living in their own modules, imported on first use
_LAZY = {"pyra": "tokentune.pyra", "dyt": "tokentune.dyt", "evit": "tokentune.evit",
         "dynamicvit": "tokentune.dynamicvit", "diffrate": "tokentune.diffrate"}


def register_method(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _REGISTRY and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:
            if exc.name != _LAZY[name]:
                raise
    if name not in _REGISTRY:
        raise TokenTuneError(f"unknown method {name!r}; choose from {', '.join(available_methods())} "
                             "(combine with '+', e.g. lora+tome)")
    return _REGISTRY[name]


def available_methods() -> List[str]:
    for name, module in _LAZY.items():
        if name not in _REGISTRY:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def parse_method(spec: str) -> List[Method]:
    """``"lora+tome"`` -> the Method objects to apply, implied ones added, in application order."""
    if not isinstance(spec, str) or not spec.strip():
        raise TokenTuneError(f"method must be a non-empty string like 'lora+tome', got {spec!r}")
    names = [n.strip().lower() for n in spec.split("+") if n.strip()]
    todo, seen = list(names), []
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.append(name)
        todo.extend(get_method(name).implies)
    methods = [get_method(n) for n in seen]
    if not any(m.peft for m in methods):
        default = max(methods, key=lambda m: m.order).default_peft or "linear"
        methods.append(get_method(default))
    exclusive = [m.name for m in methods if m.name in ("full", "linear")]
    if exclusive and len([m for m in methods if m.peft]) > 1:
        raise TokenTuneError(f"'{exclusive[0]}' cannot be combined with another tuning method in {spec!r}")
    return sorted(methods, key=lambda m: m.order)


def canonical_spec(methods: Sequence[Method]) -> str:
    return "+".join(m.name for m in methods)


# ----------------------------------------------------------------------------- options
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


def check_model_options(method: str, options: Dict[str, Any]) -> None:
    """Validate a method spec and its options (one clear error) without building anything."""
    split_options(parse_method(method), options)


# ----------------------------------------------------------------------------- core methods
def _apply_nothing(model, cfg, ctx) -> None:
    pass


def _apply_lora(model, cfg: LoRAConfig, ctx) -> None:
    apply_lora(adapted_blocks(model), cfg)


def _apply_adapter(model, cfg: AdapterConfig, ctx) -> None:
    apply_adapters(adapted_blocks(model), cfg)


def resolve_merge_schedule(model: nn.Module, r, model_name: str) -> List[int]:
    """A ToMe schedule (int, list, (r, inflect), name or target string) -> one fitted r per block.

    Named and list schedules must fit the token count exactly; int and (r, inflect) schedules
    are capped per block as ToMe defines them.
    """
    blocks = adapted_blocks(model)
    strict = isinstance(r, (list, str)) or (isinstance(r, tuple) and not (len(r) == 2 and isinstance(r[1], float)))
    if isinstance(r, str):
        from .schedules import resolve_target  # "tokens:N" / "flops:X" targets
        target = resolve_target(model, r)
        r = target if target is not None else named_schedule(model_name, r, len(blocks))
    values = parse_schedule(r, len(blocks))
    return fit_schedule(values, num_input_tokens(model), model.num_prefix_tokens, strict=strict)


def _apply_tome(model, cfg: ToMeConfig, ctx) -> None:
    schedule = resolve_merge_schedule(model, cfg.r, ctx.model_name)
    for block, r in zip(adapted_blocks(model), schedule):
        block.merge = TokenMerging(r) if r > 0 else None
    model.tokentune_prop_attn = cfg.prop_attn
    model.tokentune_trace_source = cfg.trace_source
    model.tome_schedule = schedule


register_method(Method("full", None, _apply_nothing, trainable=(r".*",), order=10, peft=True,
                       summary="full fine-tuning: every parameter trains"))
register_method(Method("linear", None, _apply_nothing, order=11, peft=True,
                       summary="linear probe: only the classification head trains"))
register_method(Method("lora", LoRAConfig, _apply_lora, trainable=(r"\.lora_[AB]$",), order=12, peft=True,
                       summary="LoRA on the fused qkv projection (mergeable for deployment)"))
register_method(Method("adapter", AdapterConfig, _apply_adapter, trainable=(r"\.adapter\.",), order=13,
                       peft=True, summary="AdaptFormer-style bottleneck adapters parallel to the MLP"))
register_method(Method("tome", ToMeConfig, _apply_tome, order=20,
                       summary="ToMe token merging between attention and MLP (no parameters)"))


# ----------------------------------------------------------------------------- create_model
def mark_trainable(model: nn.Module, methods: Sequence[Method], train_head: bool = True) -> None:
    """Freeze everything, then unfreeze what the methods (and the head) train."""
    patterns = [re.compile(p) for m in methods for p in m.trainable]
    if train_head:
        patterns.append(re.compile(HEAD_PATTERN))
    for name, param in model.named_parameters():
        param.requires_grad_(any(p.search(name) for p in patterns))


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


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


def create_model(name: str, method: str = "lora", num_classes: Optional[int] = None,
                 pretrained: Union[bool, str] = False, *, train_head: bool = True,
                 head_init_std: Optional[float] = None, seed: Optional[int] = None, **options) -> nn.Module:
    """Build the timm ViT ``name`` with ``method`` applied.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224.orig_in21k``, ``deit_small_patch16_224``.
        method: method spec, e.g. ``"lora"``, ``"lora+tome"``, ``"pyra"``, ``"dyt"``, ``"full"``.
        num_classes: classes of the new head (None keeps the checkpoint's head).
        pretrained: False (random init), True (timm hub) or a local ``.npz/.pth/.safetensors`` file.
        train_head: leave the classification head trainable.
        head_init_std: re-initialise the head with trunc_normal(std) and zero bias.
        seed: seed of every random initialisation (the backbone when ``pretrained=False``, new
            layers, a new head), drawn on torch's CPU generator (models are built on the CPU);
            None takes one from the global generator (see :func:`init_seed`), which the build
            does not otherwise touch. Recorded as ``init_seed`` in ``model.tokentune_spec`` and
            ``config.json``, so :func:`tokentune.load_trained` rebuilds the same frozen weights.
        **options: method options (``lora_rank=8``, ``tome_r=16``, ``lora=LoRAConfig(...)``) and
            timm keyword arguments (``drop_path_rate=0.1``, ``img_size=...``).

    Returns:
        The model (a subclass of the timm model's own class); ``model(x)`` gives logits and
        ``model(x, return_state=True)`` also the final :class:`tokentune.TokenState`.
    """
    methods = parse_method(method)
    configs, timm_kwargs = split_options(methods, options)
    seed = init_seed(seed)
    with torch.random.fork_rng(devices=[]):     # the model depends on the seed alone
        torch.random.default_generator.manual_seed(seed)
        model = create_backbone(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
        adapt_vit(model)
        head = re.compile(HEAD_PATTERN)
        backbone_params = sum(p.numel() for n, p in model.named_parameters() if not head.search(n))
        ctx = BuildContext(model_name=name, methods=[m.name for m in methods], configs=configs)
        for m in methods:
            m.apply(model, configs.get(m.name), ctx)
        if head_init_std is not None:
            init_head(model, head_init_std)
    mark_trainable(model, methods, train_head)
    stored = dict(configs)
    if "tome" in stored and hasattr(model, "tome_schedule"):
        stored["tome"] = dataclasses.replace(stored["tome"], r=list(model.tome_schedule))
    model.tokentune_spec = {
        "model": name,
        "method": canonical_spec(methods),
        "num_classes": int(model.num_classes),
        "pretrained": pretrained if isinstance(pretrained, (bool, str)) else str(pretrained),
        "configs": _jsonable(stored),
        "timm_kwargs": _jsonable(timm_kwargs),
        "train_head": train_head,
        "backbone_params": backbone_params,
        "init_seed": seed,
    }
    return model


@torch.no_grad()
def init_head(model: nn.Module, std: float) -> None:
    """Re-initialise the classification head(s): trunc_normal(std) weights, zero bias."""
    for attr in ("head", "head_dist"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)


def methods_of(model: nn.Module) -> List[Method]:
    spec = getattr(model, "tokentune_spec", None)
    if spec is None:
        raise TokenTuneError("this model was not built by tokentune.create_model")
    return parse_method(spec["method"])
