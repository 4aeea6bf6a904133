"""PYRA's reference implementation (THU-MIG/PYRA): checkpoint names both ways and its VTAB-1k recipes."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from ...core.method import Recipe, register_recipe
from ...core.weights import load_weights_file, rename_keys
from ...errors import TokenTuneError
from .modulator import TRAINABLE

_TO_OURS = [
    (re.compile(r"^blocks\.(\d+)\.pyra_a$"), r"blocks.\1.merge.modulator.W_r"),
    (re.compile(r"^blocks\.(\d+)\.pyra_b$"), r"blocks.\1.merge.modulator.W_D"),
    (re.compile(r"^blocks\.(\d+)\.pyra_norm\.(weight|bias)$"), r"blocks.\1.merge.modulator.norm.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.LoRA_a\.weight$"), r"blocks.\1.attn.qkv.lora_A"),
    (re.compile(r"^blocks\.(\d+)\.attn\.LoRA_b\.weight$"), r"blocks.\1.attn.qkv.lora_B"),
]
_TO_REFERENCE = [
    (re.compile(r"^blocks\.(\d+)\.merge\.modulator\.W_r$"), r"blocks.\1.pyra_a"),
    (re.compile(r"^blocks\.(\d+)\.merge\.modulator\.W_D$"), r"blocks.\1.pyra_b"),
    (re.compile(r"^blocks\.(\d+)\.merge\.modulator\.norm\.(weight|bias)$"), r"blocks.\1.pyra_norm.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.lora_A$"), r"blocks.\1.attn.LoRA_a.weight"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.lora_B$"), r"blocks.\1.attn.LoRA_b.weight"),
]
# reference-only modules that PYRA runs leave empty; a non-empty one is another method
_UNSUPPORTED = re.compile(r"(visual_prompt|prefix_tokens|\.adapter\.|pre_logits\.)")


def from_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a THU-MIG/PYRA checkpoint (``{"model": ...}`` or a bare state dict) to our names.

    Shapes are identical on both sides (table in the module docstring); ``module.`` prefixes
    (DDP) are dropped. Visual-prompt, prefix and adapter tensors (other methods of that code
    base) are refused with a clear error.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    bad = sorted(k for k in state_dict if _UNSUPPORTED.search(k))
    if bad:
        raise TokenTuneError(f"reference checkpoint holds tensors of another method ({bad[0]}, ...); "
                             "only LoRA + ToMe + PYRA checkpoints convert")
    return rename_keys(state_dict, _TO_OURS)


def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our names -> the reference implementation's (inverse of :func:`from_reference_state_dict`).

    Only the default variant (W_r, W_D, LayerNorm) and LoRA on qkv exist in the reference; other
    PYRA variants or LoRA targets are refused.
    """
    bad = sorted(k for k in state_dict
                 if re.search(r"\.merge\.modulator\.(W|down|up)\b", k)
                 or re.search(r"\.lora_[AB]$", k) and ".attn.qkv." not in k)
    if bad:
        raise TokenTuneError(f"{bad[0]} has no counterpart in the reference implementation "
                             "(it only has PYRA's default variant and LoRA on qkv)")
    return rename_keys(state_dict, _TO_REFERENCE)


def reference_schedule(state_dict: Mapping[str, torch.Tensor]) -> List[int]:
    """The merge schedule a reference PYRA checkpoint was trained with (rows of each ``pyra_a``)."""
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    rows = {}
    for key, value in state_dict.items():
        m = re.match(r"^(?:module\.)?blocks\.(\d+)\.pyra_a$", key)
        if m:
            rows[int(m.group(1))] = int(value.shape[0])
    if not rows:
        raise TokenTuneError("no blocks.{i}.pyra_a in this checkpoint; it is not a PYRA checkpoint")
    depth = max(rows) + 1
    return [rows.get(i, 0) for i in range(depth)]


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                              strict: bool = True, *, trust_checkpoint: bool = False) -> Dict[str, List[str]]:
    """Load a reference PYRA checkpoint (path or state dict) into a tokentune PYRA model.

    With ``strict``, every PYRA/LoRA tensor of the model must be in the checkpoint and every
    checkpoint tensor must exist in the model; backbone tensors missing from the checkpoint are
    allowed (reference runs often save only trained weights). Returns ``missing``/``unexpected``.

    A path is read by :func:`tokentune.backbone.load_weights_file` with weights-only unpickling;
    a file pickling other objects than tensors, plain values and training arguments is refused
    with one line naming them. ``trust_checkpoint=True`` unpickles it fully: only for files you
    trust, it can run any code.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_weights_file(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)
    sd = from_reference_state_dict(checkpoint)
    want = model.state_dict()
    for key, value in sd.items():
        if key in want and tuple(want[key].shape) != tuple(value.shape):
            hint = ""
            if key.endswith(".W_r"):
                hint = (f"; the checkpoint was trained with tome_r={reference_schedule(checkpoint)}: "
                        "build the model with that schedule")
            raise TokenTuneError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape "
                                 f"{tuple(want[key].shape)}{hint}")
    unexpected = sorted(k for k in sd if k not in want)
    trained = re.compile(rf"{TRAINABLE}|\.lora_[AB]$")
    missing = sorted(k for k in want if k not in sd and trained.search(k))
    if strict and (unexpected or missing):
        first = (unexpected or missing)[0]
        what = "not in the model" if unexpected else "missing from the checkpoint"
        raise TokenTuneError(f"reference checkpoint does not fit: {first} is {what} "
                             f"({len(unexpected)} unexpected, {len(missing)} missing); check model name, "
                             "LoRA rank and merge schedule, or pass strict=False")
    model.load_state_dict(sd, strict=False)
    return {"missing": missing, "unexpected": unexpected}


# ----------------------------------------------------------------------------- recipes
_VTAB_TRAIN = dict(
    epochs=100, batch_size=32, grad_accum=1, lr=1e-3, min_lr=1e-5, warmup_epochs=10, warmup_lr=1e-6,
    schedule_step="epoch", weight_decay=1e-4, no_decay_norm_bias=True, opt_eps=1e-8, betas=(0.9, 0.999),
    param_groups={}, clip_grad=None, label_smoothing=0.0, amp="off", seed=0, drop_last=True, eval_every=10,
    train_split="train800val200", test_split="test", normalization="imagenet", image_size=224,
    interpolation="bicubic",
)
_VTAB_MODEL = dict(lora_rank=8, lora_alpha=None, lora_dropout=0.1, lora_targets=("qkv",), tome_r="high",
                   tome_prop_attn=True, pyra_variant="pyra", pyra_activation=True, pyra_wr_init="uniform",
                   drop_path_rate=0.1, head_init_std=0.02)

register_recipe(Recipe(
    "pyra-vtab", "pyra", model_options=dict(_VTAB_MODEL), train_options=dict(_VTAB_TRAIN),
    summary="PYRA VTAB-1k reference recipe for ViT-B/16 and DeiT-B (LoRA rank 8, 'high' schedule; "
            "tome_r='low' for ~1.7x)",
    published={"source": "PYRA (ECCV 2024), VTAB-1k, ViT-B/16 'high'; best top-1 over evaluations",
               "mean_of_tasks": 72.06}))
register_recipe(Recipe(
    "pyra-vtab-large", "pyra", model_options=dict(_VTAB_MODEL, lora_rank=12), train_options=dict(_VTAB_TRAIN),
    summary="PYRA VTAB-1k reference recipe for ViT-L/16 (LoRA rank 12, 'high' schedule; tome_r='low' for ~1.7x)",
    published={"source": "PYRA (ECCV 2024), VTAB-1k, ViT-L/16 'high'; best top-1 over evaluations",
               "mean_of_tasks": 75.66}))
