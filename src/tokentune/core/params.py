"""Parameter counting, in peft's format and as the papers count.

peft: ``trainable params: X || all params: Y || trainable%: Z`` over the whole model.
Papers (PYRA, DyT, VTAB-1k PEFT tables): tunable parameters of the *backbone*, i.e. without the
classification head, as a share of the pretrained backbone without head (before any method
added parameters; ViT-B/16: 85,798,656). A method may exclude further
trainable parameters from the paper count (PYRA's LayerNorms, for instance).

Storage: a model with low-bit layers (modules with a ``storage_bits()`` method returning
``{parameter: bits}``, e.g. binary adapters) also reports the bytes the papers count for its
trained backbone tensors: each low-bit tensor at the bits its layer states (its codes plus the
per-layer scale numbers), every other value in 32 bits.
"""
from __future__ import annotations

import re
from typing import Dict

from torch import nn

from .factory import HEAD_PATTERN, methods_of
from .vit import spec_of


def count_parameters(model: nn.Module) -> Dict[str, float]:
    """Counts: trainable/all (peft) and trainable/total without head (papers), plus per method."""
    head = re.compile(HEAD_PATTERN)
    try:
        methods = methods_of(model)
    except Exception:  # a plain or deployed model: no method breakdown
        methods = []
    excluded = [re.compile(p) for m in methods for p in m.exclude_from_paper_count]
    low_bit = {id(p): int(bits) for m in model.modules() if callable(getattr(m, "storage_bits", None))
               for p, bits in m.storage_bits().items()}
    storage_bits = 0
    per_method: Dict[str, int] = {}
    trainable = total = backbone = paper_trainable = head_params = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        is_head = bool(head.search(name))
        if is_head:
            head_params += n
        else:
            backbone += n
        if not p.requires_grad:
            continue
        trainable += n
        if is_head:
            continue
        if not any(e.search(name) for e in excluded):
            paper_trainable += n
            storage_bits += low_bit.get(id(p), 32 * n)
        for m in methods:
            if not m.exclusive and any(re.search(pat, name) for pat in m.trainable):   # full's is everything
                per_method[m.name] = per_method.get(m.name, 0) + n
                break
    spec = spec_of(model) or {}
    backbone = spec.get("backbone_params", backbone)   # the pretrained backbone, before methods added any
    return {
        "trainable": trainable,
        "total": total,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "head": head_params,
        "backbone": backbone,
        "paper_trainable": paper_trainable,
        "paper_pct": 100.0 * paper_trainable / max(backbone, 1),
        "per_method": per_method,
        "paper_storage_bytes": storage_bits / 8 if low_bit else None,
    }


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return peft's line plus the papers' count."""
    c = count_parameters(model)
    line = (f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
            f"trainable%: {c['trainable_pct']:.4f}\n"
            f"paper count (backbone, no head): {c['paper_trainable']:,} of {c['backbone']:,} = {c['paper_pct']:.3f}%")
    if c["per_method"]:
        line += " (" + ", ".join(f"{k}: {v:,}" for k, v in c["per_method"].items()) + ")"
    if c["paper_storage_bytes"] is not None:
        line += (f"\nstorage (backbone, no head; low-bit weights at their bits + mu, sigma per layer, the rest 32-bit): "
                 f"{c['paper_storage_bytes'] / 1024:,.1f} KB")
    print(line)
    return line
