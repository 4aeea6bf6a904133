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
from typing import Any, Dict, List

import torch
from torch import nn

from ..errors import TokenTuneError
from .factory import methods_of
from .method import Method
from .vit import TokenTuneMixin, adapted_blocks, restore_timm


def _deploy_options(methods: List[Method], options: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{"dyt_execution": ...}`` -> ``{"dyt": {"execution": ...}}``: each option goes to the deploy
    hook of the method it is prefixed with, which must take it as a keyword."""
    accepted = {}
    for m in methods:
        if m.deploy is not None:
            params = inspect.signature(m.deploy).parameters.values()
            accepted[m.name] = [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in options.items():
        owner = next((n for n in sorted(accepted, key=len, reverse=True)
                      if key.startswith(n + "_") and key[len(n) + 1:] in accepted[n]), None)
        if owner is None:
            valid = [f"{n}_{o}" for n, opts in accepted.items() for o in opts]
            raise TokenTuneError(f"unknown deploy option {key!r} for this model; "
                                 f"{'valid: ' + ', '.join(valid) if valid else 'its methods take none'}")
        out.setdefault(owner, {})[key[len(owner) + 1:]] = value
    return out


def deploy(model: nn.Module, inplace: bool = False, compile: bool = False, **options) -> nn.Module:
    """The inference version of ``model`` (a deep copy unless ``inplace``).

    Every method's ``deploy`` hook runs (LoRA merges into the weights, DyT switches to real
    skipping, ...); a model left without plug-ins and token state becomes the plain timm model.
    ``options`` are the methods' deployment options, prefixed with the method's name (the
    keyword-only parameters of its hook): DyT's ``dyt_execution="capacity"`` with
    ``dyt_capacity=1.25`` computes a fixed number of tokens per image (static shapes).

    ``compile=True`` returns ``torch.compile`` of it (the first call compiles, which takes a
    while). It pays off with token merging: ToMe's many small per-block operations are fused, so
    the merged model gets close to the speed its FLOPs allow (see BENCHMARKS.md); token counts are
    fixed by the schedule, so new images do not recompile. DyT's skipping path breaks the graph at
    every dispatcher (its token counts depend on the data).
    """
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
        if not (info.prop_attn or info.trace_source) and not any(b.plugins() for b in adapted_blocks(model)):
            restore_timm(model)
        else:
            info.deployed = True
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.compile(model) if compile else model
