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

import torch
from torch import nn

from .factory import methods_of
from .vit import TokenTuneMixin, adapted_blocks, restore_timm


def deploy(model: nn.Module, inplace: bool = False, compile: bool = False) -> nn.Module:
    """The inference version of ``model`` (a deep copy unless ``inplace``).

    Every method's ``deploy`` hook runs (LoRA merges into the weights, DyT switches to real
    skipping, ...); a model left without plug-ins and token state becomes the plain timm model.

    ``compile=True`` returns ``torch.compile`` of it (the first call compiles, which takes a
    while). It pays off with token merging: ToMe's many small per-block operations are fused, so
    the merged model gets close to the speed its FLOPs allow (see BENCHMARKS.md); token counts are
    fixed by the schedule, so new images do not recompile. DyT's skipping path breaks the graph at
    every dispatcher (its token counts depend on the data).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if isinstance(model, TokenTuneMixin):
        for method in methods_of(model):
            if method.deploy is not None:
                method.deploy(model)
        info = model.tokentune
        plain = not (info.prop_attn or info.trace_source or "task_head" in model._modules)
        if plain and not any(b.plugins() for b in adapted_blocks(model)):
            restore_timm(model)
        else:
            info.deployed = True
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.compile(model) if compile else model
