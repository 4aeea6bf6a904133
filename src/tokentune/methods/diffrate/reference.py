"""DiffRate's official checkpoints (OpenGVLab/DiffRate@91ae3e3: ``main.py``, ``DiffRate/ddp.py``,
``DiffRate/patch/deit.py``, ``models_mae.py``), read into a tokentune DiffRate model.

The reference saves ``{"model", "optimizer", "lr_scheduler", "epoch", "scaler", "args"}``. Its DeiT
and MAE ViTs keep timm's names (MAE: ``fc_norm`` and no ``norm``, timm's ``global_pool="avg"``);
each block adds two rate proxies, ``blocks.{i}.prune_ddp`` and ``blocks.{i}.merge_ddp``, with the
tensors ``kept_token_candidate`` (candidate kept patch counts ``n, n - g, ...``) and
``selected_probability`` (their logits). A proxy keeps ``ceil(candidates . softmax(logits)) + 1``
tokens (its ``update_kept_token_number``, the class token counted): these counts are the rate
schedule the checkpoint was searched or trained with, and must be the model's
(:func:`reference_rates`). They are read, not loaded: the fixed schedule of a tokentune DiffRate
model has no parameters.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

from ...core.vit import info_of, num_input_tokens, num_prefix
from ...core.weights import load_reference_state, read_checkpoint, rename_keys, state_dict_of
from ...errors import TokenTuneError
from ..pruning import PEFT_TENSORS
from .method import fit_rates

_PROXY = re.compile(r"^(?:module\.)?blocks\.(\d+)\.(prune|merge)_ddp\.(kept_token_candidate|selected_probability)$")


def reference_rates(state_dict: Mapping[str, Any]) -> Tuple[List[int], List[int]]:
    """The (prune_kept, merge_kept) counts of a reference checkpoint's rate proxies, one per block
    (empty lists when it has none)."""
    state_dict = state_dict_of(state_dict) if "model" in state_dict or "state_dict" in state_dict else state_dict
    proxies: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _PROXY.match(key)
        if m:
            proxies.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    depth = 1 + max((i for i, _ in proxies), default=-1)
    counts: Dict[str, List[int]] = {"prune": [], "merge": []}
    for i in range(depth):
        for kind in ("prune", "merge"):
            proxy = proxies.get((i, kind), {})
            if set(proxy) != {"kept_token_candidate", "selected_probability"}:
                raise TokenTuneError(f"the DiffRate reference checkpoint lacks blocks.{i}.{kind}_ddp's kept_token_candidate "
                                     "or selected_probability; it is damaged or not a DiffRate checkpoint")
            weights = proxy["selected_probability"].float().softmax(dim=-1)
            counts[kind].append(math.ceil(float(proxy["kept_token_candidate"].float() @ weights)) + 1)
    return counts["prune"], counts["merge"]


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                              trust_checkpoint: bool = False) -> List[str]:
    """Load an official DiffRate checkpoint (path or loaded dict) into a tokentune DiffRate model.

    The backbone's tensors are loaded (every one must be used and every tensor of the model present,
    except those of a PEFT method combined with DiffRate: LoRA, adapters, prompts keep their values;
    returned); the rate proxies' counts (:func:`reference_rates`) must be the model's schedule, else
    one line gives the options to build it with. A path is read weights-only;
    ``trust_checkpoint=True`` unpickles fully: only for files you trust, it can run any code.
    """
    info = info_of(model)
    cfg = info.state.get("diffrate") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no DiffRate; build it with method='diffrate' (or 'lora+diffrate', ...)")
    if isinstance(checkpoint, (str, os.PathLike)):
        tensors = read_checkpoint(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)[0]
    else:
        tensors = state_dict_of(checkpoint)
    prune, merge = reference_rates(tensors)
    if prune:
        depth = len(model.blocks)
        want = fit_rates(prune, merge, num_input_tokens(model), num_prefix(model), depth) if len(prune) == depth else None
        if want != (list(cfg.prune_kept), list(cfg.merge_kept)):
            raise TokenTuneError(f"the DiffRate reference checkpoint keeps prune_kept={prune}, merge_kept={merge}, this "
                                 f"model {list(cfg.prune_kept)}, {list(cfg.merge_kept)}; build it with "
                                 f"diffrate_prune_kept={','.join(map(str, prune))} "
                                 f"diffrate_merge_kept={','.join(map(str, merge))}")
    tensors = rename_keys({k: v for k, v in tensors.items() if not _PROXY.match(k)}, [])
    return load_reference_state(model, tensors, source="DiffRate reference checkpoint", ours_only=PEFT_TENSORS,
                                fix="check the model name, num_classes, img_size and global_pool (the reference: "
                                    "DeiT, or MAE with global_pool='avg', at 224 px)")
