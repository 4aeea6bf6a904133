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

# Every rate schedule the reference ships (OpenGVLab/DiffRate@91ae3e3, compression_rate.json), found
# on ImageNet-1k at 224 px, transcribed by hand: name "<backbone>:<GFLOPs target>" (the file's
# "ViT-T-DeiT"/"ViT-S-DeiT"/"ViT-B-DeiT"/"ViT-B-MAE"/"ViT-L-MAE"/"ViT-H-MAE" and its target_flops key)
# -> (prune_kept, merge_kept). GFLOPs there are GMACs. The ViTs have 197 input tokens (patch 16),
# ViT-H/14 has 257; the file's CAFormer-S36 rates (merging in a hierarchical MetaFormer, not a ViT)
# have no counterpart here. deit_base:8.7 and mae_large:31.0 have the FLOPs of ToMe's "low"
# schedules (8.77 and 30.97 GMACs): PYRA's "DiffRate (low)" rows.
PRESETS: Dict[str, Tuple[List[int], List[int]]] = {
    # ViT-T-DeiT
    "deit_tiny:0.6": ([197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3],
                      [197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3]),
    "deit_tiny:0.7": ([197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3],
                      [197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3]),
    "deit_tiny:0.8": ([197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3],
                      [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3]),
    "deit_tiny:0.9": ([197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3],
                      [197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3]),
    "deit_tiny:1.0": ([197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21],
                      [197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21]),
    # ViT-S-DeiT
    "deit_small:2.3": ([197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3],
                       [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3]),
    "deit_small:2.5": ([197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3],
                       [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]),
    "deit_small:2.7": ([197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3],
                       [197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3]),
    "deit_small:2.9": ([197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
                       [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]),
    "deit_small:3.1": ([197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3],
                       [197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3]),
    # ViT-B-DeiT
    "deit_base:8.7": ([197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3],
                      [197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3]),
    "deit_base:10.0": ([197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3],
                       [197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3]),
    "deit_base:10.4": ([197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3],
                       [197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3]),
    "deit_base:11.5": ([197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3],
                       [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3]),
    "deit_base:12.5": ([197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3],
                       [197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3]),
    # ViT-B-MAE
    "mae_base:8.7": ([197, 192, 166, 143, 119, 103, 86, 72, 54, 43, 37, 23],
                     [197, 176, 150, 127, 107, 92, 76, 58, 47, 41, 23, 23]),
    "mae_base:10.0": ([197, 194, 173, 154, 135, 120, 108, 92, 76, 64, 52, 40],
                      [197, 181, 160, 141, 122, 116, 95, 80, 67, 60, 40, 40]),
    "mae_base:10.4": ([197, 195, 179, 159, 140, 122, 105, 100, 89, 71, 56, 45],
                      [197, 187, 166, 145, 125, 109, 102, 97, 75, 64, 45, 45]),
    "mae_base:11.5": ([197, 196, 182, 172, 162, 147, 131, 109, 101, 94, 70, 49],
                      [197, 192, 178, 164, 150, 133, 115, 101, 96, 82, 49, 49]),
    # ViT-L-MAE
    "mae_large:31.0": ([197, 195, 188, 179, 168, 157, 146, 143, 131, 121, 111, 102, 93, 85, 76, 70, 61, 53, 47, 35,
                        31, 26, 21, 14],
                       [197, 191, 184, 172, 161, 151, 145, 135, 125, 117, 106, 96, 89, 80, 72, 64, 54, 50, 40, 27, 27,
                        23, 14, 14]),
    "mae_large:34.7": ([197, 195, 192, 189, 181, 170, 161, 160, 149, 140, 128, 118, 109, 95, 91, 82, 73, 68, 58, 54,
                        43, 38, 29, 18],
                       [197, 193, 190, 185, 173, 164, 159, 154, 142, 137, 121, 111, 103, 97, 82, 76, 67, 61, 58, 48,
                        35, 32, 18, 18]),
    "mae_large:38.5": ([197, 197, 195, 190, 187, 183, 179, 171, 164, 159, 151, 143, 137, 114, 106, 89, 88, 85, 76, 57,
                        47, 53, 32, 24],
                       [197, 196, 193, 189, 183, 180, 175, 167, 161, 158, 152, 134, 120, 110, 97, 91, 87, 83, 65, 47,
                        54, 34, 24, 24]),
    "mae_large:42.3": ([197, 197, 197, 195, 194, 193, 191, 187, 182, 180, 173, 149, 142, 134, 125, 121, 111, 106, 91,
                        87, 77, 39, 38, 32],
                       [197, 197, 196, 194, 193, 192, 187, 183, 181, 173, 154, 146, 137, 127, 123, 114, 105, 98, 87,
                        75, 43, 45, 32, 32]),
    "mae_large:46.1": ([197, 197, 197, 196, 194, 192, 191, 188, 185, 181, 170, 157, 154, 146, 143, 139, 128, 125, 111,
                        100, 92, 83, 69, 60],
                       [197, 197, 196, 195, 193, 191, 189, 187, 183, 176, 162, 155, 148, 145, 139, 133, 127, 118, 104,
                        95, 86, 71, 60, 60]),
    # ViT-H-MAE
    "mae_huge:83.7": ([257, 255, 246, 227, 200, 178, 168, 159, 155, 145, 140, 139, 128, 119, 114, 109, 107, 100, 101,
                       102, 117, 104, 103, 97, 97, 102, 95, 90, 82, 83, 74, 56],
                      [257, 252, 240, 212, 186, 172, 160, 163, 148, 142, 138, 132, 118, 114, 111, 108, 103, 102, 105,
                       106, 109, 105, 108, 99, 96, 96, 95, 86, 79, 77, 56, 56]),
    "mae_huge:93.2": ([257, 257, 257, 257, 248, 250, 240, 239, 229, 209, 160, 159, 149, 111, 109, 106, 104, 106, 101,
                       104, 85, 96, 88, 93, 94, 88, 88, 91, 81, 78, 76, 75],
                      [257, 257, 257, 249, 242, 241, 239, 229, 209, 203, 159, 150, 124, 107, 107, 101, 100, 101, 104,
                       89, 101, 88, 89, 88, 91, 86, 86, 83, 78, 78, 75, 75]),
    "mae_huge:103.4": ([257, 256, 255, 251, 245, 235, 204, 197, 194, 189, 185, 177, 169, 160, 152, 144, 146, 139, 139,
                        136, 135, 133, 131, 128, 126, 126, 124, 121, 114, 96, 82, 53],
                       [257, 256, 253, 247, 238, 211, 201, 195, 193, 185, 179, 171, 162, 154, 150, 145, 141, 138, 137,
                        135, 134, 133, 130, 127, 125, 125, 122, 114, 101, 90, 53, 53]),
    "mae_huge:124.5": ([257, 256, 252, 248, 238, 237, 220, 214, 198, 186, 189, 191, 191, 185, 188, 186, 186, 183, 183,
                        182, 182, 183, 183, 181, 186, 182, 182, 180, 178, 180, 161, 136],
                       [257, 254, 251, 244, 238, 223, 221, 203, 194, 192, 191, 190, 188, 184, 188, 185, 184, 183, 185,
                        183, 183, 185, 183, 183, 185, 183, 179, 167, 177, 133, 136, 136]),
}


def preset_names(backbone: Optional[str] = None) -> List[str]:
    """The names of :data:`PRESETS` (those of one ``backbone`` such as ``"deit_small"``), in the file's order."""
    return [k for k in PRESETS if backbone is None or k.split(":")[0] == backbone]


@dataclass
class DiffRateConfig:
    """DiffRate options: a rate schedule found by :func:`tokentune.methods.diffrate.search_rates`
    (or one of the reference's, ``preset``); empty lists keep every token.

    Attributes:
        prune_kept: tokens (prefix tokens included) each block keeps after pruning, one per block
            (the reference's ``prune_kept_num``); empty = keep all.
        merge_kept: tokens each block keeps after merging, one per block (``merge_kept_num``).
        preset: a schedule the reference searched on ImageNet-1k at 224 px, named
            ``<backbone>:<GFLOPs>`` (every one of its ``compression_rate.json``: deit_tiny 0.6-1.0,
            deit_small 2.3-3.1, deit_base 8.7-12.5, mae_base 8.7-11.5, mae_large 31.0-46.1,
            mae_huge 83.7-124.5; :data:`PRESETS`, :func:`preset_names`); overrides the lists.
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
            raise TokenTuneError(f"unknown diffrate_preset {self.preset!r}; choose from {', '.join(preset_names())}")
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
    if cfg.preset and (n, p, len(blocks)) != (prune_kept[0], 1, len(prune_kept)):
        raise TokenTuneError(f"diffrate_preset {cfg.preset!r} is for {len(prune_kept)} blocks and {prune_kept[0]} tokens "
                             f"(224 px, CLS only); this model has {len(blocks)} blocks and {n} tokens: search its rates "
                             "with search_rates")
    prunes, merges = fit_rates(prune_kept, merge_kept, n, p, len(blocks))
    for i, (block, pk, mk) in enumerate(zip(blocks, prunes, merges)):
        block.reduce = DiffRateReducer(i, pk, mk)
    model.tokentune.prop_attn = True             # the reference's attention adds log(size) in every block
    model.tokentune.pool_by_size = True          # and its MAE patch averages by size (global_pool="avg")
    cfg = replace(cfg, prune_kept=list(prunes), merge_kept=list(merges), rates=None)
    model.tokentune.state["diffrate"] = cfg
    return cfg
