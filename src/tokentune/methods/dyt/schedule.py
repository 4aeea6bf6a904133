"""What changes in DyT over training: the Gumbel temperature, the rate loss's target, the all-active
warm-up, the dispatcher calibration at the start; and :func:`calibrate_activation` itself.

The training loop calls the method's ``on_step`` hook, :func:`update_schedule`, before every
optimizer step with ``progress`` = steps done / total steps. It sets the temperature on the
dispatchers and records the progress in ``model.tokentune.state["dyt_progress"]``, where the loss
(:func:`tokentune.methods.dyt.loss.dyt_loss`) reads it. The progress is a function of the step, so
a resumed run continues the schedules exactly.

Reference defaults: constant ``tau`` = 5, the target ``r`` from the first step, every dispatcher
bias starting at zero. The small-data options (``active_warmup``, ``rate_warmup``,
``calibrate_init``; off by default) are ours, documented in :class:`DyTConfig` and measured in
``benchmarks/dyt_ablation.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ...core.dispatch import activation_rate, dispatchers
from ...core.vit import info_of
from ...errors import TokenTuneError
from .config import DyTConfig, config_of

_PROGRESS = "dyt_progress"        # key in model.tokentune.state: the progress update_schedule recorded


# ----------------------------------------------------------------------------- temperature
def temperature_at(progress: float, cfg: DyTConfig) -> float:
    """The Gumbel temperature at ``progress`` in [0, 1] of training (``tau`` when constant)."""
    if cfg.tau_end is None:
        return float(cfg.tau)
    p = min(max(float(progress), 0.0), 1.0)
    a, b = float(cfg.tau), float(cfg.tau_end)
    if cfg.tau_schedule == "linear":
        return a + (b - a) * p
    if cfg.tau_schedule == "cosine":
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * p))
    return a * (b / a) ** p                                          # exponential


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the training temperature of every dispatcher (the inference mask does not depend on it)."""
    if tau <= 0:
        raise TokenTuneError(f"the Gumbel temperature must be positive, got {tau}")
    for d in dispatchers(model):
        d.tau = float(tau)


def update_temperature(model: nn.Module, progress: float) -> float:
    """Apply the model's temperature schedule at ``progress`` = step / total steps; returns tau.

    Call it once per step (or epoch) from the training loop; a no-op for the constant default.
    """
    tau = temperature_at(progress, config_of(model))
    set_temperature(model, tau)
    return tau


# ----------------------------------------------------------------------------- progress
def update_schedule(model: nn.Module, progress: float) -> float:
    """The method's ``on_step`` hook: record the training progress (steps done / total steps, read
    by the loss for ``active_warmup``, ``rate_warmup`` and ``calibrate_init``) and apply the
    temperature schedule; returns tau. A training loop of your own calls it before every step.
    """
    info = info_of(model)
    if info is None:
        raise TokenTuneError("this model has no DyT; build it with method='dyt'")
    info.state[_PROGRESS] = min(max(float(progress), 0.0), 1.0)
    return update_temperature(model, progress)


def training_progress(model: nn.Module) -> Optional[float]:
    """The progress :func:`update_schedule` last recorded, or None if it was never called."""
    info = info_of(model)
    return info.state.get(_PROGRESS) if info is not None else None


def target_rate_at(progress: float, cfg: DyTConfig) -> Optional[float]:
    """The rate loss's target at ``progress``; None in the all-active warm-up (nothing is dispatched).

    ``[0, active_warmup)``: None; then over ``rate_warmup`` a linear fall from 1.0 to
    ``target_rate``; then ``target_rate``.
    """
    if progress < cfg.active_warmup:
        return None
    if cfg.rate_warmup > 0:
        t = (progress - cfg.active_warmup) / cfg.rate_warmup
        if t < 1.0:
            return 1.0 + (cfg.target_rate - 1.0) * t
    return float(cfg.target_rate)


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate_activation(model: nn.Module, images: torch.Tensor, rate: float = 0.5) -> float:
    """Shift every dispatcher's bias so that it activates ``rate`` of the patch tokens of
    ``images`` (eval rule, block by block in one forward). Returns the resulting overall rate.

    Used to benchmark an untrained model at a given activation rate, or to start training there
    (``calibrate_init``). Under ``torch.distributed`` the biases are then averaged over the
    processes, so that every process keeps the same weights.
    """
    if not 0.0 <= rate <= 1.0:
        raise TokenTuneError(f"activation rate must be in [0, 1], got {rate}")
    ds = dispatchers(model)
    if not ds:
        raise TokenTuneError("this model has no token dispatchers; build it with method='dyt'")
    was_training = model.training
    model.eval()
    try:
        for d in ds:
            d.calibrate_to = rate
        model(images, return_state=True, dyt_execution="skip")         # the threshold rule, block by block
        for d in ds:
            d.calibrate_to = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for d in ds:
                dist.all_reduce(d.linear.bias)
                d.linear.bias.div_(dist.get_world_size())
        _, state = model(images, return_state=True, dyt_execution="skip")
    finally:
        for d in ds:
            d.calibrate_to = None
        model.train(was_training)
    return float(activation_rate(state))
