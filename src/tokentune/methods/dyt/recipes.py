"""Our DyT recipe for small data (the reference's VTAB-1k recipe is in :mod:`.reference`).

``dyt-small-data`` keeps every reference default (loss with the complete model's CE and the KL,
MLP Dispatch, Gumbel noise at a constant tau = 5, zero dispatcher biases, no warm-up) and gives the
adapters the paper's larger-data width, 64. Evidence (``benchmarks/dyt_ablation.py``, BENCHMARKS.md,
"DyT ablation on small real data"): on the offline demo's digits (448 training images, a width-64
ViT) DyT r=0.5 with adapter 64 beat DyT with adapter 16 on all 6 seed x split pairs (+7.9 points on
average) and the plain adapter 16 on all 6 (+7.9, at 85% of its multiply-adds); the small-data
warm-ups in :class:`DyTConfig` cost 3.6-4.0 points there, so the recipe leaves them off. Measured
on that tiny model only: at ViT-B's width 768 the reference chose 16 for VTAB-1k. It sets model
options only; the training options stay the user's.
"""
from __future__ import annotations

from ...core.method import Recipe, register_recipe

SMALL_DATA = "dyt-small-data"

register_recipe(Recipe(
    name=SMALL_DATA, method="dyt", model_options={"dyt_bottleneck": 64},
    summary="DyT on small data: reference defaults with adapter bottleneck 64 (measured on the demo's digits, "
            "BENCHMARKS.md); warm-ups off"))
