"""DiffRate: differentiable compression rate (Chen et al., ICCV 2023, arXiv 2305.17997).

Reimplemented from the paper and the published behaviour of its official code (OpenGVLab/DiffRate:
``DiffRate/ddp.py``, ``merge.py``, ``patch/deit.py``, ``engine.py``; no code of it is used).
Every block, between attention and MLP (:class:`DiffRateReducer`)::

    sort    the non-prefix tokens by CLS attention (mean over heads), descending
    prune   keep the first prune_kept tokens (prefix tokens included)
    merge   every token after the first merge_kept joins its most similar (cosine of the token
            features) token among them, prefix tokens never being destinations:
            x_d <- mean(x_d, its sources)  (unweighted, the reference's scatter_reduce "mean")
            s_d <- s_d + sum_i s_i * sim_i  (sizes scaled by the similarity; proportional attention
                                             adds log s to the attention logits in every block)

Search (:func:`search_rates`, paper Sec. 3): each block after the first gets two "differentiable
discrete proxies" (:class:`RateProxy`): softmax weights over candidate kept counts
``n, n - g, ...``; the kept count is the straight-through ceil of their expectation, and the
tokens beyond it are masked out of later attention (the token state's ``policy``, DynamicViT's
masked softmax) with the straight-through gradient of each position's keep probability; merged
tokens stay in the sequence, masked. The FLOPs of the schedule (a differentiable function of the
counts, :func:`rate_macs`) enter ``L = CE + 5 (GMACs - target)^2``; only the rate logits train.
The found counts are then an ordinary fixed schedule (``method="...+diffrate"`` with
``diffrate_prune_kept``/``diffrate_merge_kept``) for training and inference: the reference's
fine-tuning and evaluation path, the same computation in both (so ``deploy`` has nothing to do).

Differences from the reference, all documented: the search runs on the user's data (the paper
searched ImageNet-1k with the off-the-shelf classifier; on a new task the head must be trained
first), resumes from a checkpoint at epoch boundaries, runs in fp32; several prefix tokens
(registers, VPT prompts) are all protected (the reference knows only CLS); the stem's FLOPs count
the patches, not patches + 1. ``diffrate_preset`` gives every rate schedule the reference publishes
(its ``compression_rate.json``: DeiT-T/S/B, MAE ViT-B/L/H; not its CAFormer rates), and
:func:`load_reference_checkpoint` reads its checkpoint files (backbone, and the rate proxies' counts
checked against the model's; :mod:`.reference`).
"""
from .method import PRESETS, DiffRateConfig, apply_diffrate, fit_rates, preset_names, rate_macs, read_rates
from .reducer import DiffRateReducer, DiffRateSearchReducer, RateProxy, match, merge, sort_by_cls_attention, ste_min
from .reference import load_reference_checkpoint, reference_rates
from .search import SearchConfig, SearchResult, search_rates, search_record, unreduced_gmacs

__all__ = [
    "DiffRateConfig", "DiffRateReducer", "DiffRateSearchReducer", "PRESETS", "RateProxy", "SearchConfig", "SearchResult",
    "apply_diffrate", "fit_rates", "load_reference_checkpoint", "match", "merge", "preset_names", "rate_macs", "read_rates",
    "reference_rates", "search_rates", "search_record",
    "sort_by_cls_attention", "ste_min", "unreduced_gmacs",
]
