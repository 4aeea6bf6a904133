"""Deployment: fold everything foldable and return an inference model.

* Each method gets its deploy hook: LoRA is merged into the frozen weights (``W + s B A``), so
  the deployed model runs exactly the backbone's matrix multiplications; DyT switches to real
  token skipping; PYRA keeps its modulation, which is part of the deployed computation.
* If no plug-in is left (e.g. plain ``lora``), the result is the plain timm model of the
  backbone's own class, like peft's ``merge_and_unload``.

The deployed model is in eval mode with gradients off, and gives the same outputs as the
trained model in eval mode.
"""
from __future__ import annotations

import copy
import inspect
import logging
import typing
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..errors import TokenTuneError
from ..parsing import convert, describe
from ..timing import measure_throughput
from ..utils import one_line
from .factory import methods_of
from .method import Method
from .quantize import check_quantize, quantize_dynamic_int8
from .vit import TokenTuneMixin, adapted_blocks, input_size, restore_timm

log = logging.getLogger("tokentune")
COMPILE_CHOICES = (False, True, "auto")


def _deploy_options(methods: List[Method], options: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{"dyt_execution": ...}`` -> ``{"dyt": {"execution": ...}}``: each option goes to the deploy
    hook of the method it is prefixed with, which must take it as a keyword-only parameter. Text
    values (from a command line) are parsed by the parameter's type hint (``"1.25"`` -> 1.25,
    ``"32,30"`` -> [32, 30])."""
    accepted: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        if m.deploy is not None:
            hints = typing.get_type_hints(m.deploy)
            params = inspect.signature(m.deploy).parameters.values()
            accepted[m.name] = {p.name: hints.get(p.name, Any) for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY}
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in options.items():
        owner = next((n for n in sorted(accepted, key=len, reverse=True)
                      if key.startswith(n + "_") and key[len(n) + 1:] in accepted[n]), None)
        if owner is None:
            valid = [f"{n}_{o}" for n, opts in accepted.items() for o in opts]
            raise TokenTuneError(f"unknown deploy option {key!r} for this model; "
                                 f"{'valid: ' + ', '.join(valid) if valid else 'its methods take none'}")
        name = key[len(owner) + 1:]
        if isinstance(value, str):
            try:
                value = convert(accepted[owner][name], value)
            except (ValueError, TypeError) as exc:
                raise TokenTuneError(f"deploy option {key}={value!r}: {exc} "
                                     f"(expected {describe(accepted[owner][name])})") from None
        out.setdefault(owner, {})[name] = value
    return out


def deploy(model: nn.Module, inplace: bool = False, compile: Union[bool, str] = False,
           example: Optional[torch.Tensor] = None, quantize: Optional[str] = None, **options) -> nn.Module:
    """The inference version of ``model`` (a deep copy unless ``inplace``).

    Every method's ``deploy`` hook runs (LoRA merges into the weights, DyT switches to real
    skipping, ...); a model left without plug-ins and token state becomes the plain timm model.
    ``options`` are the methods' deployment options, prefixed with the method's name (the
    keyword-only parameters of its hook): DyT's ``dyt_execution="capacity"`` with
    ``dyt_capacity=1.25`` computes a fixed number of tokens per image (static shapes).

    ``compile=True`` returns ``torch.compile`` of it (the first call compiles, which takes a
    while). It pays off with token merging: ToMe's many small per-block operations are fused, so
    the merged model gets closer to the speed its FLOPs allow (see BENCHMARKS.md); token counts
    are fixed by the schedule, so new images do not recompile. DyT's threshold rule breaks the
    graph at every dispatcher (its token counts depend on the data); its capacity execution
    compiles into one graph. ``compile="auto"`` compiles, then times the compiled and the eager
    model side by side on ``example`` (default: one random image at the model's input size; pass
    a batch of the size you serve) on this machine and returns the faster one (eager if
    compiling fails); the choice is logged on the ``tokentune`` logger.

    ``quantize="int8-dynamic"`` gives every Linear layer int8 weights and per-batch int8 inputs
    (CPU, fp32 models; :mod:`tokentune.core.quantize`): its outputs are close to, not equal to,
    the fp32 model's.
    """
    check_quantize(quantize)
    if compile not in COMPILE_CHOICES:
        raise TokenTuneError(f"deploy(compile={compile!r}): choose False, True or 'auto'")
    methods = methods_of(model) if isinstance(model, TokenTuneMixin) else []
    hook_options = _deploy_options(methods, options)          # checked before any copy is made
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if isinstance(model, TokenTuneMixin):
        for method in methods:
            if method.deploy is not None:
                method.deploy(model, **hook_options.get(method.name, {}))
        info = model.tokentune
        plain = not (info.prop_attn or info.trace_source or "task_head" in model._modules)
        if plain and not any(b.plugins() for b in adapted_blocks(model)):
            restore_timm(model)
        else:
            info.deployed = True
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize == "int8-dynamic":
        model = quantize_dynamic_int8(model)
    if compile == "auto":
        return faster_of_compiled(model, example)
    return torch.compile(model) if compile else model


def faster_of_compiled(model: nn.Module, example: Optional[torch.Tensor] = None, rounds: int = 5) -> nn.Module:
    """``model`` or ``torch.compile(model)``, whichever runs ``example`` faster here (interleaved
    rounds after compiling; eager when compiling fails, e.g. without a C++ compiler)."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    if example is None:
        h, w = input_size(model)
        example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    example = example.to(device=device, dtype=p.dtype if p is not None else None)
    compiled = torch.compile(model)
    try:
        stats = measure_throughput({"eager": model, "compiled": compiled}, images=example, rounds=rounds,
                                   warmup=2, device=device)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: serve the eager model
        log.info("deploy(compile='auto'): compiling failed (%s); using the eager model", one_line(exc, 160))
        return model
    ratio = stats["compiled"].median / stats["eager"].median
    choice = "compiled" if ratio > 1.0 else "eager"
    log.info("deploy(compile='auto'): batch %d, compiled %.2f img/s vs eager %.2f img/s (%.2fx): using the %s model",
             example.shape[0], stats["compiled"].median, stats["eager"].median, ratio, choice)
    return compiled if ratio > 1.0 else model
