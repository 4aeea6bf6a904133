"""DyT's training loss (the method's ``loss`` hook; reference: models/losses.py, engine_finetune.py)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.dispatch import activation_rate
from ...core.state import TokenState
from ...errors import TokenTuneError
from .config import DyTConfig, config_of
from .schedule import calibrate_activation, target_rate_at, training_progress


def rate_loss(state: TokenState, target: float) -> torch.Tensor:
    """``(mean activation - target)^2`` (DyT's L_rate; 0 without dispatchers)."""
    rate = activation_rate(state)
    if rate is None:
        return torch.zeros(())
    return (rate - target) ** 2


def _progress(model: nn.Module, cfg: DyTConfig) -> float:
    """The training progress for the small-data options (1.0, i.e. none of them active, by default)."""
    if not cfg.scheduled:
        return 1.0
    progress = training_progress(model)
    if progress is None:
        raise TokenTuneError("dyt_active_warmup, dyt_rate_warmup and dyt_calibrate_init follow the training progress: "
                             "call tokentune.dyt.update_schedule(model, step / total_steps) before every step "
                             "(tokentune.train does)")
    return progress


def dyt_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DyT's training loss (the method's ``loss`` hook).

    One forward call: with complete-model terms enabled the batch is duplicated and its second
    half runs with every token active (``dyt_complete`` rows), so DDP sees a single forward and
    every parameter takes part. ``criterion`` gives both cross-entropies (the reference: plain CE;
    a task's loss module, e.g. per-pixel cross-entropy, for a task model). ``images`` may be any
    task input (a task head expands the per-sample ``dyt_complete`` rows to the images it runs).

    With the small-data options: in the ``active_warmup`` the loss is the complete model's
    cross-entropy alone (logged as ``ce``, rate 1); the rate target follows
    :func:`~tokentune.methods.dyt.schedule.target_rate_at`; ``calibrate_init`` calibrates the
    dispatchers on the batch of the first step.
    """
    cfg = config_of(model)
    progress = _progress(model, cfg)
    target = target_rate_at(progress, cfg)
    if cfg.calibrate_init and progress == 0.0:
        calibrate_activation(model, images, target_rate_at(cfg.active_warmup, cfg))
    if target is None:                                       # all-active warm-up: the complete model only
        ce = criterion(model(images, dyt_complete=True), targets)
        return ce, {"ce": float(ce.detach()), "rate": 1.0}
    B = images.shape[0]
    complete = cfg.complete_weight > 0 or cfg.distill_weight > 0
    if complete:
        rows = torch.zeros(2 * B, dtype=torch.bool, device=images.device)
        rows[B:] = True
        logits, state = model(torch.cat([images, images]), return_state=True, dyt_complete=rows)
        dynamic, full = logits[:B], logits[B:]
    else:
        dynamic, state = model(images, return_state=True)
    ce = criterion(dynamic, targets)
    loss = ce
    logs: Dict[str, float] = {"ce": float(ce.detach())}
    rate = activation_rate(state)
    if rate is not None:
        l_rate = (rate - target) ** 2
        loss = loss + cfg.rate_weight * l_rate
        logs.update(rate=float(rate.detach()), rate_loss=float(l_rate.detach()))
    if complete:
        if cfg.complete_weight > 0:
            ce_full = criterion(full, targets)
            loss = loss + cfg.complete_weight * ce_full
            logs["ce_complete"] = float(ce_full.detach())
        if cfg.distill_weight > 0:
            # classes on dim 1 (image logits [B, K], a task's per-pixel logits [B, K, H, W]); summed over
            # classes, averaged over samples and positions (= "batchmean" for image logits)
            positions = dynamic.numel() // dynamic.shape[1]
            kl = F.kl_div(F.log_softmax(dynamic, dim=1), F.log_softmax(full.detach(), dim=1),
                          reduction="sum", log_target=True) / positions
            loss = loss + cfg.distill_weight * kl
            logs["kl"] = float(kl.detach())
    return loss, logs
