"""FPET: Faster Parameter-Efficient Tuning with Token Redundancy Reduction (Kim et al., CVPR 2025).

PEFT (AdaptFormer adapters or LoRA) plus one token-reduction module at block ``r_layer``: the
merge metric (the head-averaged keys, detached) is refined by a small 1-bit adapter, the patch
tokens are split on a checkerboard, and every token of one half merges into its most similar
token of the other half through a straight-through estimator, so the matching trains end to end.

* :mod:`.matching`: the checkerboard split, the straight-through matching, the dense merge;
* :mod:`.method`: the config (``fpet_*`` options), the merge module, apply, deploy, registration;
* :mod:`.recipes`: the reference's VTAB-1k recipes (``fpet-vtab``, ``fpet-vtab-lora``, 1-bit ones).

Reference: kyk120/fpet@17a45e76 (no licence file: read, not copied). Deviations: docs/baselines.md.
"""
from . import recipes  # noqa: F401 - registers the VTAB-1k recipes
from .matching import checkerboard, diff_matching, merge_dense
from .method import FPETConfig, FPETMerge, apply_fpet, deploy_fpet, merges_of

__all__ = ["FPETConfig", "FPETMerge", "apply_fpet", "checkerboard", "deploy_fpet", "diff_matching", "merge_dense",
           "merges_of"]
