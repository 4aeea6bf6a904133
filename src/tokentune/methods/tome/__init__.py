"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

* :mod:`.matching`: the algorithm as pure functions (matching, size-weighted merge, source map);
* :mod:`.schedules`: merge schedules (named, lists, ``(r, inflect)``, token and FLOPs targets);
* :mod:`.flops`: the analytic FLOPs model the FLOPs targets use;
* :mod:`.method`: ``ToMeConfig``, the ``TokenMerging`` module and the method's registration;
* :mod:`.speedup`: a schedule for a speed-up measured on this machine.
"""
from .flops import ViTDims, block_flops, flops_ratio, vit_flops
from .matching import Matching, bipartite_soft_matching, max_merge, merge, merge_source, merge_weighted
from .method import TokenMerging, ToMeConfig, apply_tome, resolve_merge_schedule, resolve_rate, schedule_of
from .schedules import (
                        NAMED_SCHEDULES,
                        PROFILES,
                        Schedule,
                        fit_schedule,
                        min_final_tokens,
                        named_schedule,
                        parse_schedule,
                        parse_target,
                        resolve_target,
                        schedule_for_flops,
                        schedule_for_keep_ratio,
                        schedule_for_tokens,
                        token_counts,
)
from .speedup import SpeedupSearch, SpeedupTrial, register_modulator, schedule_for_speedup

__all__ = [
    "Matching", "NAMED_SCHEDULES", "PROFILES", "Schedule", "ToMeConfig", "TokenMerging", "ViTDims", "apply_tome",
    "bipartite_soft_matching", "block_flops", "fit_schedule", "flops_ratio", "max_merge", "merge", "merge_source",
    "merge_weighted", "min_final_tokens", "named_schedule", "parse_schedule", "parse_target",
    "resolve_merge_schedule", "resolve_rate", "resolve_target", "schedule_for_flops", "schedule_for_keep_ratio",
    "schedule_for_tokens", "schedule_of", "token_counts", "vit_flops", "SpeedupSearch", "SpeedupTrial",
    "register_modulator", "schedule_for_speedup",
]
