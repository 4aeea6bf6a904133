"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024).

* :mod:`.matching`: the multi-criteria weights, the bidirectional matching and the merges, as
  pure functions;
* :mod:`.method`: ``MCTFConfig``, the reducer a merging block runs (one-step-ahead attention),
  FLOPs and schedule targets, the training loss (teacher with a random r, consistency) and the
  method's registration.

Adapted from mlvlab/MCTF @ 2004da0c (MIT licence); the deviations are listed in docs/baselines.md.
"""
from .matching import POOLINGS, match, merge_count, pool_weights, scores
from .method import MCTFConfig, MCTFMerge, apply_mctf, config_of, mctf_flops, mctf_loss, resolve_rate, teacher_rate, token_counts

__all__ = ["MCTFConfig", "MCTFMerge", "POOLINGS", "apply_mctf", "config_of", "match", "mctf_flops", "mctf_loss",
           "merge_count", "pool_weights", "resolve_rate", "scores", "teacher_rate", "token_counts"]
