"""What a method is (:class:`Method`: its config, how it changes the model, its hooks), the method
and recipe registries, and method specs (``"lora+tome"``).

A method registers itself when its module is imported (``register_method(Method(...))`` at module
level); ``import tokentune`` imports every built-in method (:mod:`tokentune.methods`), and methods
of other packages register through the ``tokentune.methods`` entry-point group, loaded the first
time the registry is asked for a name it does not know. Tools talk to methods only through the
hooks below, whose defaults do nothing, so no tool needs to know a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import TokenTuneError


@dataclass
class BuildContext:
    """What a method's ``apply`` may need to know."""

    model_name: str
    methods: List[str]
    configs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    """A registered method.

    Attributes:
        name: spec name.
        config: its config dataclass (None if it has no options).
        apply: ``apply(model, cfg, ctx) -> cfg or None`` changes the adapted model in place; it may
            return the config as it should be recorded (e.g. a schedule resolved for this backbone).
        trainable: regexes of parameter names the method trains.
        order: application order (tuning 10-19, token reduction 20-29, built on top 30+).
        peft: whether it decides how the backbone is tuned (full/linear/lora/adapter/dyt).
        implies: methods it needs (``dyt`` needs none; a method listed here is always added).
        needs_one_of: the method works on top of one of these; the first is added when the spec
            names none of them (PYRA modulates ToMe's merge or EViT's fused token: ``("tome", "evit")``).
        reduces_tokens: it removes tokens (merging, pruning, skipping): two such methods in one
            spec must compose, i.e. one lists the other in ``composes_with``.
        composes_with: token reducers it works together with (``dyt``: ``("tome",)``).
        default_peft: tuning method added when the spec names none.
        exclusive: cannot be combined with another tuning method (``full``, ``linear``).
        exclude_from_paper_count: regexes of trainable names the papers do not count.
        summary: one line for ``--help``.
        deploy: ``deploy(model, **options)`` folds or switches the method for inference, in place;
            its keyword-only parameters are the method's deployment options, which
            :func:`tokentune.deploy` takes prefixed with the method's name (``dyt_execution=``).
        loss: ``loss(model, images, targets, criterion) -> (loss, logs)`` replacing the plain
            ``criterion(model(images), targets)`` in training; ``logs`` is a dict of floats for
            progress output. At most one method per model has one.
        on_step: ``on_step(model, progress)`` before every optimizer step, ``progress`` = steps done
            / total steps in [0, 1] (DyT's temperature schedule).
        trace_options: ``trace_options(model) -> (forward options, note)`` for graph export
            (ONNX, ``torch.export``): options that make the forward traceable (DyT: its mask form)
            and a one-line note on what that costs (None when nothing changes).
        set_activation: ``set_activation(model, images, rate) -> rate reached`` puts untrained
            token dispatchers at an activation rate on ``images`` (benchmarks of untrained models).
        activation_target: ``activation_target(model) -> rate or None``, the rate the method trains
            its dispatchers towards (the benchmarks' default for :attr:`set_activation`).
        save_formats: other libraries' formats the method's trained tensors can be written in,
            ``{format: save(model, directory)}`` (LoRA: ``"peft"``); :func:`tokentune.export_format`
            and ``tokentune export --format`` ask for them.
        search: ``search(model, data, cfg, checkpoint=None, log=print) -> record`` finds the method's
            options on data before training (DiffRate: prune and merge counts under a FLOPs
            target): ``model`` is a trained model whose head knows ``data``'s labels, ``cfg`` a
            :attr:`search_config`, ``checkpoint`` a file that makes the search resumable; the
            record (JSON) holds ``"options"`` (fields of the method's config) and what was measured.
            ``tokentune search METHOD`` writes it to a file and the demo's search rows use it.
        search_config: the dataclass of :attr:`search`'s options (documented in ``Attributes:``).
        search_option: the field of the method's config that reads a record file back
            (``tokentune train --<method>-<field> FILE``).
        training_free: the method works on an already trained model without any training (ToMe:
            merging needs no learned weights); ``tokentune accelerate`` offers it as a candidate and
            ``tokentune eval --add-method`` adds it to a finished run.
        rate_option: the field of the method's config that sets how much it reduces, accepting the
            schedule targets ``"flops:X"`` and ``"tokens:N"`` (ToMe: ``"r"``, i.e. ``tome_r``); the
            schedule searches (``tokentune accelerate``) set it. None when the method has no rate.
        rate_profiles: the schedule profiles (``"constant"``, ``"decreasing"``, ``"geometric"``, see
            :mod:`tokentune.methods.tome.schedules`) the rate option's targets accept as a third part
            (``"flops:X:geometric"``); empty (the default): the plain targets only, e.g. a rate that is one
            share at fixed blocks (EViT), where a profile has no meaning.
        load_formats: other libraries' formats the method reads a trained model from,
            ``{format: load(directory) -> model}`` (LoRA: ``"peft"``, an adapter directory on a timm
            base); the counterpart of :attr:`save_formats`, asked by tools that open any saved model.
    """

    name: str
    config: Optional[type]
    apply: Callable[[nn.Module, Any, BuildContext], Any]
    trainable: Tuple[str, ...] = ()
    order: int = 50
    peft: bool = False
    implies: Tuple[str, ...] = ()
    needs_one_of: Tuple[str, ...] = ()
    reduces_tokens: bool = False
    composes_with: Tuple[str, ...] = ()
    default_peft: Optional[str] = None
    exclusive: bool = False
    exclude_from_paper_count: Tuple[str, ...] = ()
    summary: str = ""
    deploy: Optional[Callable[[nn.Module], None]] = None
    loss: Optional[Callable] = None
    on_step: Optional[Callable[[nn.Module, float], None]] = None
    trace_options: Optional[Callable[[nn.Module], Tuple[Dict[str, Any], Optional[str]]]] = None
    set_activation: Optional[Callable[[nn.Module, torch.Tensor, float], float]] = None
    activation_target: Optional[Callable[[nn.Module], Optional[float]]] = None
    save_formats: Dict[str, Callable[[nn.Module, str], Any]] = field(default_factory=dict)
    search: Optional[Callable[..., Dict[str, Any]]] = None
    search_config: Optional[type] = None
    search_option: Optional[str] = None
    training_free: bool = False
    rate_option: Optional[str] = None
    rate_profiles: Tuple[str, ...] = ()
    load_formats: Dict[str, Callable[..., nn.Module]] = field(default_factory=dict)


_REGISTRY: Dict[str, Method] = {}
_ENTRY_POINTS_LOADED = False
ENTRY_POINT_GROUP = "tokentune.methods"


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a method of the same name is replaced)."""
    _REGISTRY[method.name] = method
    return method


def _load_entry_points() -> None:
    """Import the methods other packages declare under the ``tokentune.methods`` entry points."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise TokenTuneError(f"the method plug-in {ep.name!r} ({ep.value}) failed to import: "
                                 f"{type(exc).__name__}: {exc}; fix or uninstall that package") from exc


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise TokenTuneError(f"unknown method {name!r}; choose from {', '.join(available_methods())} "
                             "(combine with '+', e.g. lora+tome)")
    return _REGISTRY[name]


def available_methods() -> List[str]:
    """Registered method names, in application order."""
    _load_entry_points()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def parse_method(spec: str) -> List[Method]:
    """``"lora+tome"`` -> the Method objects to apply, implied ones added, in application order."""
    if not isinstance(spec, str) or not spec.strip():
        raise TokenTuneError(f"method must be a non-empty string like 'lora+tome', got {spec!r}")
    names = [n.strip().lower() for n in spec.split("+") if n.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TokenTuneError(f"method {repeated[0]!r} appears more than once in {spec!r}; name each method once "
                             f"(e.g. {'+'.join(dict.fromkeys(names))!r})")
    todo, seen = list(names), []
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.append(name)
        method = get_method(name)
        todo.extend(method.implies)
        if method.needs_one_of and not any(n in seen + todo + names for n in method.needs_one_of):
            todo.append(method.needs_one_of[0])
    methods = [get_method(n) for n in seen]
    check_reducers(methods, spec)
    if not any(m.peft for m in methods):
        default = max(methods, key=lambda m: m.order).default_peft or "linear"
        methods.append(get_method(default))
    exclusive = [m.name for m in methods if m.exclusive]
    if exclusive and len([m for m in methods if m.peft]) > 1:
        raise TokenTuneError(f"'{exclusive[0]}' cannot be combined with another tuning method in {spec!r}")
    return sorted(methods, key=lambda m: m.order)


def check_reducers(methods: Sequence[Method], spec: str) -> None:
    """One clear line when two token reducers of a spec cannot compose."""
    reducers = [m for m in methods if m.reduces_tokens]
    for i, a in enumerate(reducers):
        for b in reducers[i + 1:]:
            if b.name not in a.composes_with and a.name not in b.composes_with:
                pairs = sorted({"+".join(sorted((m.name, o))) for m in _REGISTRY.values() for o in m.composes_with})
                raise TokenTuneError(
                    f"'{a.name}' and '{b.name}' both reduce tokens and cannot be combined (in {spec!r}); keep one of "
                    f"them (token reducers that compose: {', '.join(pairs) or 'none'})")


def canonical_spec(methods: Sequence[Method]) -> str:
    return "+".join(m.name for m in methods)


# ----------------------------------------------------------------------------- recipes
@dataclass
class Recipe:
    """A named bundle of model options (``create_model`` keywords) and training options
    (:class:`tokentune.TrainConfig` fields) of a paper's reference run.

    ``published`` holds what the recipe's paper reports for it, so that a sweep's table shows it
    beside ours: ``{"source": "...", "mean_of_tasks": 72.06}`` (keys: ``mean_of_tasks``,
    ``mean_of_groups``, a VTAB group or a task name; ``source`` says where from and how it was
    measured)."""

    name: str
    method: str
    model_options: Dict[str, Any] = field(default_factory=dict)
    train_options: Dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    published: Dict[str, Any] = field(default_factory=dict)


_RECIPES: Dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    _load_entry_points()
    if name not in _RECIPES:
        raise TokenTuneError(f"unknown recipe {name!r}; choose from {', '.join(sorted(_RECIPES)) or 'none'}")
    return _RECIPES[name]


def available_recipes() -> Dict[str, Recipe]:
    _load_entry_points()
    return dict(_RECIPES)
