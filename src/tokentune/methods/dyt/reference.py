"""DyT's reference implementation (NUS-HPC-AI-Lab/Dynamic-Tuning): checkpoint names both ways
(table in the package docstring) and its VTAB-1k recipe."""
from __future__ import annotations

import os
import re
from typing import Dict, Union

import torch
from torch import nn

from ...core.method import Recipe, register_recipe
from ...core.weights import load_state_into, load_weights_file, rename_keys
from ...errors import TokenTuneError

_FROM_REFERENCE = [
    (re.compile(r"^blocks\.(\d+)\.adaptmlp\.(down_proj|up_proj)\.(weight|bias)$"), r"blocks.\1.adapter.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp_token_select\.mlp_head\.(weight|bias)$"), r"blocks.\1.mlp_dispatcher.linear.\2"),
]
_TO_REFERENCE = [
    (re.compile(r"^blocks\.(\d+)\.adapter\.(down_proj|up_proj)\.(weight|bias)$"), r"blocks.\1.adaptmlp.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp_dispatcher\.linear\.(weight|bias)$"), r"blocks.\1.mlp_token_select.mlp_head.\2"),
]
_NOT_IN_REFERENCE = re.compile(r"\.(attn_dispatcher|layer_dispatcher|attn_adapter|layer_adapter)\.|"
                               r"\.(down_weight|down_bias|up_weight|up_bias)$|\.router\.")


def from_reference_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A DyT reference state dict (or a checkpoint with a ``model`` key) -> tokentune names."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("pre_logits.", "module.pre_logits."))}
    for key in state_dict:
        if (".adaptmlp." in key or ".mlp_token_select." in key) and not any(p.match(key) for p, _ in _FROM_REFERENCE):
            raise TokenTuneError(f"reference parameter {key!r} has no tokentune counterpart "
                                 "(only the plain adapter without LayerNorm is supported)")
    return rename_keys(state_dict, _FROM_REFERENCE)


def to_reference_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """tokentune names -> the DyT reference's (MLP Dispatch with plain adapters only)."""
    for key in state_dict:
        if _NOT_IN_REFERENCE.search(key):
            raise TokenTuneError(f"{key!r} has no counterpart in the DyT reference implementation "
                                 "(it ships MLP Dispatch with a plain adapter only)")
    return rename_keys(state_dict, _TO_REFERENCE)


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Dict[str, torch.Tensor]], *,
                              trust_checkpoint: bool = False) -> None:
    """Load a DyT reference checkpoint (path or state dict) into a ``method="dyt"`` model.

    A path is read by :func:`tokentune.backbone.load_weights_file`: weights-only unpickling, which
    reads the reference's ``{"model", "optimizer", "epoch", "scaler", "args"}`` files (their
    ``argparse.Namespace`` of training arguments is allow-listed) without running code from them.
    A file pickling any other object is refused with one line naming it;
    ``trust_checkpoint=True`` unpickles it fully: only for files you trust, it can run any code.

    Every tensor of the checkpoint must fit the model and every DyT parameter of the model must
    be present; backbone tensors missing from the checkpoint keep their values.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_weights_file(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)
    tensors = from_reference_state_dict(checkpoint)
    load_state_into(model, tensors, source="DyT reference checkpoint", require_all_trainable=False)
    missing = [n for n, _ in model.named_parameters()
               if re.search(r"\.(adapter|mlp_dispatcher)\.", n) and n not in tensors]
    if missing:
        raise TokenTuneError(f"DyT reference checkpoint lacks {missing[0]!r} (and {len(missing) - 1} more); "
                             "build the model with the reference's bottleneck and keep_layers")


# The reference VTAB-1k run (train_vtab.sh, main_vtab.py, engine_finetune.py): ffn_num 16, scale 1,
# AdamW(lr 1e-3, wd 1e-4 on every trainable tensor), batch 64, 100 epochs, MAE-style per-iteration
# schedule (linear warm-up from 0 over 10 epochs, half-cycle cosine to 1e-5), fp16 autocast (here
# "auto": mixed precision on GPU), no clipping, no drop-path, no smoothing, evaluation every epoch,
# Inception mean/std 0.5, bicubic 224 resize, head re-initialised with trunc_normal(0.01).
_VTAB_MODEL = dict(
    dyt_variant="mlp", dyt_target_rate=0.5, dyt_bottleneck=16, dyt_adapter_scale=1.0, dyt_adapter_dropout=0.1,
    dyt_experts=1, dyt_tau=5.0, dyt_tau_end=None, dyt_threshold=0.5, dyt_gumbel_noise=True, dyt_keep_layers=0,
    dyt_rate_weight=2.0, dyt_complete_weight=1.0, dyt_distill_weight=1.0, dyt_inference="skip",
    drop_path_rate=0.0, head_init_std=0.01,
)
_VTAB_TRAIN = dict(
    epochs=100, batch_size=64, grad_accum=1, lr=1e-3, min_lr=1e-5, warmup_epochs=10, warmup_lr=0.0,
    schedule_step="iter", weight_decay=1e-4, no_decay_norm_bias=False, opt_eps=1e-8, betas=(0.9, 0.999),
    param_groups={}, clip_grad=None, label_smoothing=0.0, amp="auto", seed=0, drop_last=False, eval_every=1,
    train_split="train800val200", test_split="test", normalization="inception", image_size=224,
    interpolation="bicubic",
)

register_recipe(Recipe(
    name="dyt-vtab", method="dyt", model_options=dict(_VTAB_MODEL), train_options=dict(_VTAB_TRAIN),
    summary="DyT VTAB-1k reference recipe for vit_base_patch16_224.orig_in21k (MLP Dispatch r=0.5, "
            "adapter 16/scale 1, CE + 2 rate + complete CE + KL)",
    published={"source": "Dynamic Tuning (NeurIPS 2024), VTAB-1k, ViT-B/16, r=0.5", "mean_of_groups": 77.14}))
