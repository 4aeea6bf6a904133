"""The rate search: DiffRate's differentiable search of per-block prune and merge counts under a
FLOPs target, on the user's data, resumable; its options and record (``tokentune search diffrate``)
and the method's registration."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...core.method import Method, register_method
from ...core.reduce import reducers
from ...core.vit import adapted_blocks, info_of, num_input_tokens, num_prefix
from ...core.weights import load_torch_file
from ...errors import TokenTuneError
from ...fileio import atomic_torch_save
from ...typecheck import check_fields
from ...utils import unwrap_model
from ..tome.flops import ViTDims
from .method import DiffRateConfig, apply_diffrate, fit_rates, rate_macs
from .reducer import DiffRateSearchReducer


@dataclass
class SearchResult:
    """What :func:`search_rates` found.

    Attributes:
        prune_kept, merge_kept: per-block token counts (prefix included), as the blocks really
            keep them; pass them as ``diffrate_prune_kept`` / ``diffrate_merge_kept``.
        gmacs: multiply-adds per image of that schedule, in G (the papers' GFLOPs).
        target: the requested GMACs.
        history: per epoch: mean cross-entropy, mean FLOPs loss, GMACs at the end of the epoch.
    """

    prune_kept: List[int]
    merge_kept: List[int]
    gmacs: float
    target: float
    history: List[Dict[str, float]] = field(default_factory=list)


def _kept_counts(searchers: List[DiffRateSearchReducer], num_tokens: int, prefix: int, depth: int):
    prune = [num_tokens] + [int(s.prune.kept()) for s in searchers]
    merge = [num_tokens] + [int(s.merge.kept()) for s in searchers]
    return fit_rates(prune, merge, num_tokens, prefix, depth)


def _install(model: nn.Module, granularity: int) -> List[DiffRateSearchReducer]:
    blocks = adapted_blocks(model)
    if any(b.reduce is not None or b.merge is not None or b.is_dispatched() for b in blocks):
        raise TokenTuneError("search DiffRate rates on a model without token reduction (e.g. its lora or full "
                             "version), then build method='...+diffrate' with the rates found")
    if getattr(model, "cls_token", None) is None:
        raise TokenTuneError("DiffRate ranks tokens by the CLS token's attention, and this model has no class token")
    p = num_prefix(model)
    patches = num_input_tokens(model) - p
    like = dict(device=blocks[0].param_like()["device"])
    searchers = [DiffRateSearchReducer(i, patches, p, granularity).to(**like) for i in range(1, len(blocks))]
    for block, s in zip(blocks[1:], searchers):     # the first block never compresses (reference)
        block.reduce = s
    return searchers


def search_rates(model: nn.Module, data, target_gmacs: float, *, epochs: int = 3, batch_size: int = 64,
                 lr: float = 0.01, min_lr: float = 0.001, flops_weight: float = 5.0, warmup_epochs: int = 0,
                 granularity: int = 4, checkpoint: Optional[str] = None, seed: int = 0, num_workers: int = 0,
                 log: Optional[Callable[[str], None]] = print) -> SearchResult:
    """Search per-block prune and merge counts of ``model`` on ``data`` under a FLOPs target.

    The paper searched on ImageNet-1k with the off-the-shelf classifier; here it runs on whatever
    ``data`` is given (a dataset of (image, label) pairs), so the model's head must already
    classify those labels (e.g. a model trained with ``lora`` or ``linear`` on them, loaded with
    :func:`tokentune.load_trained`). The model's own weights stay frozen and unchanged; only the
    rate logits train (reference: AdamW, lr 0.01 -> 0.001 cosine per epoch, weight decay 0,
    3 epochs, batch 256 per GPU on 8 GPUs, ``L = CE + 5 (GMACs - target)^2``, granularity 4;
    ``warmup_epochs`` epochs with the FLOPs weight at 0 are the reference's ``--warm_up``). The
    model runs in training mode, as in the reference (dropout of the PEFT layers included).

    ``checkpoint``: a file the search state is written to after every epoch (rate logits,
    optimizer, epoch, RNG); if it exists, the search resumes from it (same ``data`` and options).
    ``seed`` seeds the data order and, at the start, torch's generator (dropout in training mode).
    Returns the counts the blocks will keep, ready for ``create_model(...,
    diffrate_prune_kept=..., diffrate_merge_kept=...)``; a target below the smallest schedule's
    FLOPs or above the full model's is a one-line error.
    """
    base = unwrap_model(model)
    if info_of(base) is None:
        raise TokenTuneError("search_rates needs a model built by tokentune.create_model")
    dims = ViTDims.from_model(base)
    depth = len(adapted_blocks(base))
    n, p = num_input_tokens(base), num_prefix(base)
    full = rate_macs(dims, [(n, n)] * depth) / 1e9
    least = rate_macs(dims, [(n, n)] + [(p + 1, p + 1)] * (depth - 1)) / 1e9
    if not least <= target_gmacs < full:
        raise TokenTuneError(f"a target of {target_gmacs:g} GMACs is out of reach: this model needs {full:.4g} GMACs "
                             f"without reduction and at least {least:.4g} keeping one patch token after the first "
                             f"block; ask for a target in [{least:.4g}, {full:.4g})")
    if epochs < 1 or batch_size < 1 or granularity < 1:
        raise TokenTuneError("epochs, batch_size and granularity must be at least 1")
    searchers = _install(base, granularity)
    info = base.tokentune
    saved = dict(prop_attn=info.prop_attn, pool_by_size=info.pool_by_size, training=base.training,
                 grads={name: prm.requires_grad for name, prm in base.named_parameters()})
    info.prop_attn = True
    info.pool_by_size = True
    for prm in base.parameters():
        prm.requires_grad_(False)
    arch = [prm for s in searchers for prm in s.parameters()]
    for prm in arch:
        prm.requires_grad_(True)
    optimizer = torch.optim.AdamW(arch, lr=lr, weight_decay=0.0)
    start, history = _resume_search(checkpoint, target_gmacs, arch, optimizer, seed)
    device = arch[0].device
    try:
        base.train()
        for epoch in range(start, epochs):
            for group in optimizer.param_groups:     # per-epoch cosine (timm CosineLRScheduler, t_initial=epochs)
                group["lr"] = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))
            weight = 0.0 if epoch < warmup_epochs else flops_weight
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                                 generator=torch.Generator().manual_seed(seed + epoch))
            totals = _search_epoch(model, loader, optimizer, dims, n, target_gmacs, weight, device)
            prunes, merges = _kept_counts(searchers, n, p, depth)
            done = max(totals["batches"], 1)
            history.append({"epoch": epoch, "ce": totals["ce"] / done, "flops_loss": totals["flops_loss"] / done,
                            "gmacs": float(rate_macs(dims, list(zip(prunes, merges)))) / 1e9})
            if log is not None:
                log(f"diffrate search epoch {epoch + 1}/{epochs}: ce {history[-1]['ce']:.4f}, "
                    f"GMACs {history[-1]['gmacs']:.4g} (target {target_gmacs:g}); prune {prunes}, merge {merges}")
            if checkpoint is not None:
                atomic_torch_save(checkpoint, {"target": float(target_gmacs), "epoch": epoch + 1, "history": history,
                                               "arch": [prm.detach().cpu() for prm in arch],
                                               "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()})
        prunes, merges = _kept_counts(searchers, n, p, depth)
    finally:
        for block in adapted_blocks(base):
            if isinstance(block.reduce, DiffRateSearchReducer):
                block.reduce = None
        info.prop_attn = saved["prop_attn"]
        info.pool_by_size = saved["pool_by_size"]
        for name, prm in base.named_parameters():
            prm.requires_grad_(saved["grads"][name])
        base.train(saved["training"])
    assert not any(isinstance(r, DiffRateSearchReducer) for r in reducers(base))
    return SearchResult(prune_kept=prunes, merge_kept=merges, target=float(target_gmacs), history=history,
                        gmacs=float(rate_macs(dims, list(zip(prunes, merges)))) / 1e9)


def _resume_search(checkpoint: Optional[str], target_gmacs: float, arch, optimizer, seed: int):
    """``(first epoch, history)``: from the search state in ``checkpoint`` when it exists, else a new search."""
    if checkpoint is not None and os.path.isfile(checkpoint):
        state = load_torch_file(checkpoint, "delete it to start the search over", opt_in=None)
        if state.get("target") != float(target_gmacs) or len(state.get("arch", [])) != len(arch):
            raise TokenTuneError(f"{checkpoint} is a search for another target or model; delete it or pass another path")
        with torch.no_grad():
            for prm, value in zip(arch, state["arch"]):
                prm.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        return int(state["epoch"]), list(state["history"])
    torch.manual_seed(seed)       # the model's randomness in training mode (PEFT dropout): a search is repeatable
    return 0, []


def _search_epoch(model, loader, optimizer, dims, n: int, target_gmacs: float, weight: float, device):
    """One epoch of the rate logits' training, ``L = CE + weight (GMACs - target)^2``; the summed terms."""
    totals = {"ce": 0.0, "flops_loss": 0.0, "batches": 0}
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits, state = model(images, return_state=True)
        records = [r["diffrate"] for r in state.records if "diffrate" in r]
        macs = rate_macs(dims, [(n, n)] + records)
        ce = F.cross_entropy(logits, targets)
        flops_loss = (macs / 1e9 - target_gmacs) ** 2
        loss = ce + weight * flops_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["ce"] += float(ce.detach())
        totals["flops_loss"] += float(flops_loss.detach())
        totals["batches"] += 1
    return totals


@dataclass
class SearchConfig:
    """Options of DiffRate's rate search (``tokentune search diffrate``; :func:`search_rates`).

    Attributes:
        target_gmacs: FLOPs target in GMACs per image (the papers' GFLOPs; e.g. 8.7 for ViT-B/16 at 224 px);
            give it or target_share.
        target_share: the target as a share of the model's GMACs without reduction (e.g. 0.5).
        epochs: passes over the training data (reference 3, on ImageNet-1k).
        batch_size: images per step (reference 256 per GPU on 8 GPUs).
        lr: peak learning rate of the rate logits (AdamW, cosine per epoch to min_lr; reference 0.01).
        min_lr: final learning rate (reference 0.001).
        flops_weight: weight of (GMACs - target)^2 in the loss (reference 5, for ViT-B's GMACs; the term
            scales with the square of the model's GMACs, so a small model needs a much larger weight).
        warmup_epochs: first epochs without the FLOPs term (reference --warm_up).
        granularity: step between the candidate kept counts (reference 4).
        seed: seed of the data order and of the model's randomness (dropout).
        num_workers: data-loading processes.
    """

    target_gmacs: Optional[float] = None
    target_share: Optional[float] = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01
    min_lr: float = 0.001
    flops_weight: float = 5.0
    warmup_epochs: int = 0
    granularity: int = 4
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.target_gmacs is None) == (self.target_share is None):
            raise TokenTuneError("give the FLOPs target as target_gmacs (GMACs per image) or target_share (a share of "
                                 "the unreduced model's), one of them")
        if self.target_share is not None and not 0 < self.target_share < 1:
            raise TokenTuneError(f"invalid target_share={self.target_share}: a share of the model's GMACs in (0, 1), "
                                 "e.g. 0.5")
        if self.lr <= 0 or self.min_lr < 0 or self.flops_weight < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise TokenTuneError("lr must be positive and min_lr, flops_weight, warmup_epochs, num_workers at least 0")


def unreduced_gmacs(model: nn.Module) -> float:
    """GMACs per image of ``model`` without token reduction, as the search counts them (:func:`rate_macs`)."""
    base = unwrap_model(model)
    n = num_input_tokens(base)
    return float(rate_macs(ViTDims.from_model(base), [(n, n)] * len(adapted_blocks(base)))) / 1e9


def search_record(model: nn.Module, data, cfg: SearchConfig, checkpoint: Optional[str] = None,
                  log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """The method's ``search`` hook: :func:`search_rates` with ``cfg``'s options, as a JSON record
    (``options``: the counts as :class:`DiffRateConfig` fields; what was found and measured; the
    model it was found for, which ``diffrate_rates`` checks)."""
    target = cfg.target_gmacs if cfg.target_gmacs is not None else cfg.target_share * unreduced_gmacs(model)
    found = search_rates(model, data, target, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         min_lr=cfg.min_lr, flops_weight=cfg.flops_weight, warmup_epochs=cfg.warmup_epochs,
                         granularity=cfg.granularity, checkpoint=checkpoint, seed=cfg.seed,
                         num_workers=cfg.num_workers, log=log)
    base = unwrap_model(model)
    return {"method": "diffrate", "options": {"prune_kept": found.prune_kept, "merge_kept": found.merge_kept},
            "gmacs": found.gmacs, "target_gmacs": found.target, "unreduced_gmacs": unreduced_gmacs(base),
            "num_tokens": num_input_tokens(base), "depth": len(adapted_blocks(base)),
            "search": asdict(cfg), "history": found.history}


# Not offered by ``tokentune accelerate`` (training_free stays False, no rate_option): its counts come from a
# gradient search on data ('tokentune search diffrate'), and its presets only fit ViT-B/L at 224 px.
register_method(Method(
    "diffrate", DiffRateConfig, apply_diffrate, order=23, reduces_tokens=True, default_peft="full",
    search=search_record, search_config=SearchConfig, search_option="rates",
    summary="DiffRate: per-block prune (by CLS attention) and merge (by similarity) counts, searched under a FLOPs "
            "target ('tokentune search diffrate'), then fixed (no parameters)"))
