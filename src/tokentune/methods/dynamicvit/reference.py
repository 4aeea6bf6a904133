"""DynamicViT's official checkpoints (raoyongming/DynamicViT@1322e62: ``models/dyvit.py``, ``main.py``,
``utils.save_model``), read into a tokentune DynamicViT model.

The reference saves ``{"model", "optimizer", "epoch", "scaler", "args", "best", "best_ema"[, "model_ema"]}``;
its DeiT keeps timm's names, and its prediction modules sit in one list beside the blocks::

    score_predictor.{k}.in_conv.{0,1}.{weight,bias}       blocks.{loc_k}.reduce.predictor.in_conv.{0,1}.*
    score_predictor.{k}.out_conv.{0,2,4}.{weight,bias}    blocks.{loc_k}.reduce.predictor.out_conv.{0,2,4}.*
    everything else (timm ViT names)                      unchanged

with ``loc_k`` the k-th pruning location of the model (the reference's ``pruning_loc``, 3, 6, 9 for
DeiT). Its ViTs keep ``base_rate``, ``base_rate^2``, ``base_rate^3`` (``--base_rate``, saved in ``args``).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Union

import torch
from torch import nn

from ...core.weights import load_reference_state, read_checkpoint, rename_keys, state_dict_of
from ...errors import TokenTuneError
from ..pruning import PEFT_TENSORS
from .method import config_of
from .predictor import DynamicViTReducer


def _locations(model: nn.Module) -> List[int]:
    return [i for i, b in enumerate(model.blocks) if isinstance(getattr(b, "reduce", None), DynamicViTReducer)]


def from_reference_state_dict(state_dict: Mapping[str, torch.Tensor], locations: List[int]) -> Dict[str, torch.Tensor]:
    """Rename a reference state dict to ours, prediction module ``k`` going to block ``locations[k]``;
    a module beyond the locations keeps its name (and is reported unused)."""
    rules = [(re.compile(rf"^score_predictor\.{k}\.(in_conv|out_conv)\.(\d+)\.(weight|bias)$"),
              rf"blocks.{loc}.reduce.predictor.\1.\2.\3") for k, loc in enumerate(locations)]
    return rename_keys(state_dict, rules)


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                              trust_checkpoint: bool = False) -> List[str]:
    """Load an official DynamicViT checkpoint (path or loaded dict): backbone and prediction modules.

    Every tensor of the checkpoint must be used and every tensor of the model present, except those
    of a PEFT method combined with DynamicViT (``lora+dynamicvit``: LoRA, adapters, prompts keep their
    values; returned); one line lists the unused and the missing ones. When the file holds the run's
    training arguments, its ``base_rate`` must be the model's ``dynamicvit_keep_rate``. A path is read
    weights-only; ``trust_checkpoint=True`` unpickles fully: only for files you trust, it can run any code.
    """
    locations = _locations(model)
    if not locations:
        raise TokenTuneError("this model has no DynamicViT; build it with method='dynamicvit' (or 'lora+dynamicvit', ...)")
    if isinstance(checkpoint, (str, os.PathLike)):
        tensors, args = read_checkpoint(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)
    else:
        tensors, args = state_dict_of(checkpoint), checkpoint.get("args")
    cfg = config_of(model)
    rate = args.get("base_rate") if isinstance(args, dict) else getattr(args, "base_rate", None)
    if rate is not None and cfg.keep_rates is None and float(rate) != cfg.keep_rate:
        raise TokenTuneError(f"the DynamicViT reference checkpoint was trained with base_rate {rate}, this model keeps "
                             f"{cfg.keep_rate}; build it with dynamicvit_keep_rate={rate}")
    found = sorted({int(m.group(1)) for k in tensors for m in [re.match(r"^(?:module\.)?score_predictor\.(\d+)\.", k)] if m})
    if len(found) != len(locations):
        raise TokenTuneError(f"the DynamicViT reference checkpoint has {len(found)} prediction modules, this model "
                             f"{len(locations)} (locations {locations}); build it with dynamicvit_locations of "
                             f"{len(found)} blocks (the reference's DeiT: 3,6,9)")
    return load_reference_state(model, from_reference_state_dict(tensors, locations),
                                source="DynamicViT reference checkpoint", ours_only=PEFT_TENSORS,
                                fix="check the model name, num_classes and img_size (the reference: DeiT at 224 px)")
