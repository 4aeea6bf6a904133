"""What the token-pruning methods (EViT, DynamicViT) share: where they prune by default and the
checks of their keep rates and locations.

Both papers prune in the 4th, 7th and 10th block of a 12-block ViT (indices 3, 6, 9: EViT's
``drop_loc``, DynamicViT's ``pruning_loc``); DynamicViT's LV-ViT models use 4, 8, 12 of 16 and
5, 10, 15 of 20 blocks, i.e. a quarter, half and three quarters of the depth. That is the
default here for every depth (:func:`default_locations`); ViT-L (24 blocks) gets 6, 12, 18.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

from ..errors import TokenTuneError

# Tensors a PEFT method adds to a token-reduction baseline (lora+evit, adapter+dynamicvit, vpt+diffrate):
# the baselines' official checkpoints have none, so loading one leaves them as they are.
PEFT_TENSORS = re.compile(r"\.lora_[AB]$|\.(adapter|attn_adapter|layer_adapter|prompt)\.")


def default_locations(depth: int) -> List[int]:
    """Blocks at a quarter, half and three quarters of the depth (3, 6, 9 for 12 blocks)."""
    return sorted({max(depth // 4, 1), depth // 2, (3 * depth) // 4} - {0})


def check_locations(name: str, locations: Optional[Sequence[int]], depth: int) -> List[int]:
    """The pruning blocks (default or given), checked against the depth (one-line errors)."""
    locs = default_locations(depth) if locations is None else [int(i) for i in locations]
    if not locs:
        raise TokenTuneError(f"{name}_locations is empty; give the blocks that prune (e.g. 3,6,9 for a 12-block ViT)")
    bad = [i for i in locs if not 0 <= i < depth]
    if bad:
        raise TokenTuneError(f"{name}_locations has block {bad[0]} but the model has {depth} blocks (0..{depth - 1}); "
                             f"use blocks 0..{depth - 1}")
    if sorted(set(locs)) != locs:
        raise TokenTuneError(f"{name}_locations must be increasing and without repeats, got {locs}")
    return locs


def check_keep_rate(name: str, rate: float) -> None:
    """A keep rate is a share of tokens in (0, 1]."""
    if not 0.0 < rate <= 1.0:
        raise TokenTuneError(f"invalid {name}_keep_rate={rate}: the share of tokens kept must be in (0, 1] (e.g. 0.7)")
