"""DiffRate's options, the reference's searched rates, the analytic FLOPs of a rate schedule, the
file of searched rates, and how the method is applied (registered in :mod:`.search`, with its search)."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...core.vit import adapted_blocks, num_input_tokens, num_prefix
from ...errors import TokenTuneError
from ...typecheck import check_fields
from ..tome.flops import ViTDims
from .reducer import DiffRateReducer, ste_min

# Rates the reference found on ImageNet-1k (OpenGVLab/DiffRate, compression_rate.json), for
# ViT-B/16 (12 blocks) and ViT-L/16 (24 blocks) at 224 px (197 tokens), by GFLOPs (= GMACs)
# target: (prune_kept, merge_kept). deit_base:8.7 and mae_large:31.0 have the FLOPs of ToMe's
# "low" schedules (8.77 and 30.97 GMACs): PYRA's "DiffRate (low)" rows.
PRESETS = {
    "deit_base:8.7": ([197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3],
                      [197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3]),
    "deit_base:10.0": ([197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3],
                       [197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3]),
    "deit_base:11.5": ([197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3],
                       [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3]),
    "mae_base:8.7": ([197, 192, 166, 143, 119, 103, 86, 72, 54, 43, 37, 23],
                     [197, 176, 150, 127, 107, 92, 76, 58, 47, 41, 23, 23]),
    "mae_base:11.5": ([197, 196, 182, 172, 162, 147, 131, 109, 101, 94, 70, 49],
                      [197, 192, 178, 164, 150, 133, 115, 101, 96, 82, 49, 49]),
    "mae_large:31.0": ([197, 195, 188, 179, 168, 157, 146, 143, 131, 121, 111, 102, 93, 85, 76, 70, 61, 53, 47, 35, 31,
                        26, 21, 14],
                       [197, 191, 184, 172, 161, 151, 145, 135, 125, 117, 106, 96, 89, 80, 72, 64, 54, 50, 40, 27, 27,
                        23, 14, 14]),
}


@dataclass
class DiffRateConfig:
    """DiffRate options: a rate schedule found by :func:`tokentune.methods.diffrate.search_rates`
    (or one of the reference's, ``preset``); empty lists keep every token.

    Attributes:
        prune_kept: tokens (prefix tokens included) each block keeps after pruning, one per block
            (the reference's ``prune_kept_num``); empty = keep all.
        merge_kept: tokens each block keeps after merging, one per block (``merge_kept_num``).
        preset: a schedule the reference searched on ImageNet-1k for ViT-B/16 or ViT-L/16 at 224 px,
            named ``<backbone>:<GFLOPs>`` (deit_base:8.7, deit_base:10.0, deit_base:11.5,
            mae_base:8.7, mae_base:11.5, mae_large:31.0); overrides the lists.
        rates: a file of counts written by ``tokentune search diffrate`` (JSON); its counts become
            the lists (the model records them, not the file) and its model must have as many input
            tokens and blocks as this one.
    """

    prune_kept: Sequence[int] = ()
    merge_kept: Sequence[int] = ()
    preset: Optional[str] = None
    rates: Optional[str] = None

    def __post_init__(self) -> None:
        check_fields(self, "diffrate_")
        if self.preset is not None and self.preset not in PRESETS:
            raise TokenTuneError(f"unknown diffrate_preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.rates is not None:
            found = read_rates(self.rates)["options"]
            given = (list(self.prune_kept), list(self.merge_kept))
            if self.preset is not None or (any(given) and given != (found["prune_kept"], found["merge_kept"])):
                raise TokenTuneError(f"diffrate_rates={self.rates!r} gives the counts; do not also pass "
                                     "diffrate_prune_kept/diffrate_merge_kept or diffrate_preset")
            self.prune_kept, self.merge_kept = list(found["prune_kept"]), list(found["merge_kept"])


def read_rates(path: str) -> Dict[str, Any]:
    """A rates file written by ``tokentune search diffrate`` (:func:`tokentune.methods.diffrate.search.search_record`),
    checked; every problem is one line."""
    if not os.path.isfile(path):
        raise TokenTuneError(f"diffrate_rates file {path!r} does not exist; write it with 'tokentune search diffrate RUN "
                             "--target-gmacs G --out FILE'")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenTuneError(f"diffrate_rates file {path!r} is not readable JSON ({exc}); write it again with "
                             "'tokentune search diffrate'") from None
    options = record.get("options") if isinstance(record, dict) else None
    counts = [options.get(k) for k in ("prune_kept", "merge_kept")] if isinstance(options, dict) else [None, None]
    if not isinstance(record, dict) or record.get("method") != "diffrate" or not all(
            isinstance(c, list) and c and all(isinstance(v, int) and not isinstance(v, bool) for v in c) for c in counts):
        raise TokenTuneError(f"{path!r} is not a DiffRate rates file (method 'diffrate' with lists of integers "
                             "options.prune_kept and options.merge_kept); write it with 'tokentune search diffrate'")
    return record


def fit_rates(prune_kept: Sequence[int], merge_kept: Sequence[int], num_tokens: int, prefix: int,
              depth: int) -> Tuple[List[int], List[int]]:
    """Check a schedule against the model and make it what the blocks really keep (each count at
    most the one before: ``prune <= tokens in``, ``merge <= prune``)."""
    if not prune_kept and not merge_kept:
        return [num_tokens] * depth, [num_tokens] * depth
    if len(prune_kept) != depth or len(merge_kept) != depth:
        raise TokenTuneError(f"diffrate_prune_kept and diffrate_merge_kept need one count per block ({depth}), got "
                             f"{len(prune_kept)} and {len(merge_kept)}")
    low = min(list(prune_kept) + list(merge_kept))
    if low <= prefix:
        raise TokenTuneError(f"a DiffRate count of {low} keeps no patch token ({prefix} prefix tokens); every count must "
                             f"be at least {prefix + 1}")
    prunes, merges, n = [], [], num_tokens
    for pk, mk in zip(prune_kept, merge_kept):
        n = min(n, int(pk))
        prunes.append(n)
        n = min(n, int(mk))
        merges.append(n)
    return prunes, merges


Count = Union[int, float, torch.Tensor]


def rate_macs(dims: ViTDims, schedule: Sequence[Tuple[Count, Count]]) -> Count:
    """Multiply-adds per image of a ViT under per-block (prune_kept, merge_kept) counts (the
    reference's ``calculate_flop_*``: attention on the tokens entering the block, the MLP on what
    is left after pruning and merging; straight-through minimum when counts are tensors).

    Deviation: the stem counts the patches (the reference multiplies by patches + 1).
    """
    n: Count = torch.tensor(float(dims.num_tokens)) if any(torch.is_tensor(c) for pair in schedule for c in pair) \
        else dims.num_tokens
    macs: Count = (dims.stem_flops + dims.head_flops) / 2
    inner = dims.heads * dims.head_dim
    for pk, mk in schedule:
        macs = macs + n * dims.attn_linear_macs + 2 * n * n * inner
        n = ste_min(n, pk, mk) if torch.is_tensor(n) else min(n, pk, mk)
        macs = macs + n * dims.mlp_linear_macs
    return macs


def apply_diffrate(model: nn.Module, cfg: DiffRateConfig, ctx) -> DiffRateConfig:
    blocks = adapted_blocks(model)
    if getattr(model, "cls_token", None) is None:
        raise TokenTuneError("DiffRate ranks tokens by the CLS token's attention, and this model has no class token; "
                             "use a ViT with a class token (class_token=True)")
    prune_kept, merge_kept = PRESETS[cfg.preset] if cfg.preset else (cfg.prune_kept, cfg.merge_kept)
    n, p = num_input_tokens(model), num_prefix(model)
    if cfg.rates is None and not prune_kept and not merge_kept:
        warnings.warn("DiffRate without rates keeps every token: nothing is reduced. Search rates on your data first "
                      "('tokentune search diffrate RUN --target-gmacs G --out rates.json', then --diffrate-rates "
                      f"rates.json) or pass a diffrate_preset ({', '.join(PRESETS)})", UserWarning, stacklevel=2)
    if cfg.rates is not None:
        record = read_rates(cfg.rates)
        if (record.get("num_tokens"), record.get("depth")) != (n, len(blocks)):
            raise TokenTuneError(f"{cfg.rates!r} has rates for {record.get('depth')} blocks and {record.get('num_tokens')} "
                                 f"input tokens; this model has {len(blocks)} blocks and {n} tokens: search its own with "
                                 "'tokentune search diffrate'")
    if cfg.preset and (n, p, len(blocks)) != (197, 1, len(prune_kept)):
        raise TokenTuneError(f"diffrate_preset {cfg.preset!r} is for {len(prune_kept)} blocks and 197 tokens (224 px, "
                             f"CLS only); this model has {len(blocks)} blocks and {n} tokens: search its rates with "
                             "search_rates")
    prunes, merges = fit_rates(prune_kept, merge_kept, n, p, len(blocks))
    for i, (block, pk, mk) in enumerate(zip(blocks, prunes, merges)):
        block.reduce = DiffRateReducer(i, pk, mk)
    model.tokentune.prop_attn = True             # the reference's attention adds log(size) in every block
    model.tokentune.pool_by_size = True          # and its MAE patch averages by size (global_pool="avg")
    cfg = replace(cfg, prune_kept=list(prunes), merge_kept=list(merges), rates=None)
    model.tokentune.state["diffrate"] = cfg
    return cfg
