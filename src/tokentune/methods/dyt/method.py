"""Applying DyT to a model, deployment, the temperature schedule, calibration, and the method's
registration (with its hooks: loss, per-step temperature, deploy, export form, calibration)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ...core.dispatch import activation_rate, dispatchers
from ...core.method import Method, register_method
from ...core.vit import adapted_blocks, info_of
from ...errors import TokenTuneError
from ..adapter import Adapter, MoEAdapter
from .config import DyTConfig, validate
from .dispatcher import TokenDispatcher
from .loss import dyt_loss


def _make_adapter(dim: int, cfg: DyTConfig) -> nn.Module:
    if cfg.experts == 1:
        return Adapter(dim, cfg.bottleneck, cfg.adapter_scale, cfg.adapter_dropout)
    return MoEAdapter(dim, cfg.bottleneck, cfg.experts, cfg.adapter_scale, cfg.adapter_dropout)


def apply_dyt(model: nn.Module, cfg: DyTConfig, ctx=None) -> None:
    """Give every block its adapter(s) and, from ``keep_layers`` on, its dispatcher(s)."""
    blocks = adapted_blocks(model)
    validate(cfg, len(blocks))
    if any(b.adapter is not None for b in blocks):
        raise TokenTuneError("dyt brings its own adapters; remove 'adapter' from the method spec (e.g. method='dyt')")
    if cfg.variant != "mlp" and any(b.merge is not None for b in blocks):
        raise TokenTuneError(f"ToMe merging works with MLP Dispatch only (tokens that skip attention have no keys "
                             f"to match); use dyt_variant='mlp' or drop 'tome' (got variant {cfg.variant!r})")
    # (slot of the adapter, slot of the dispatcher, what it dispatches) of each variant
    slots = {"mlp": [("adapter", "mlp_dispatcher", "mlp")],
             "attn": [("attn_adapter", "attn_dispatcher", "attn")],
             "attn_mlp": [("adapter", "mlp_dispatcher", "mlp"), ("attn_adapter", "attn_dispatcher", "attn")],
             "layer": [("layer_adapter", "layer_dispatcher", "layer")]}[cfg.variant]
    for i, block in enumerate(blocks):
        dim = block.norm2.normalized_shape[0] if hasattr(block.norm2, "normalized_shape") else block.mlp.fc1.in_features
        like = dict(device=block.mlp.fc1.weight.device, dtype=block.mlp.fc1.weight.dtype)
        for adapter_slot, dispatcher_slot, kind in slots:
            setattr(block, adapter_slot, _make_adapter(dim, cfg).to(**like))
            if i >= cfg.keep_layers:
                setattr(block, dispatcher_slot, TokenDispatcher(dim, i, kind, cfg.tau, cfg.threshold,
                                                                cfg.gumbel_noise, cfg.inference).to(**like))
    model.tokentune.state["dyt"] = cfg


def deploy_dyt(model: nn.Module) -> None:
    """Deployment: every dispatcher skips inactive tokens for real in eval mode."""
    for d in dispatchers(model):
        d.inference = "skip"


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
    cfg = _config(model)
    tau = temperature_at(progress, cfg)
    set_temperature(model, tau)
    return tau


def _config(model: nn.Module) -> DyTConfig:
    info = info_of(model)                        # through compile / DDP wrappers
    cfg = info.state.get("dyt") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no DyT; build it with method='dyt'")
    return cfg


@torch.no_grad()
def calibrate_activation(model: nn.Module, images: torch.Tensor, rate: float = 0.5) -> float:
    """Shift every dispatcher's bias so that it activates ``rate`` of the patch tokens of
    ``images`` (eval rule, block by block in one forward). Returns the resulting overall rate.

    Used to benchmark an untrained model at a given activation rate, or to start training there.
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
        model(images, return_state=True)
        for d in ds:
            d.calibrate_to = None
        _, state = model(images, return_state=True)
    finally:
        for d in ds:
            d.calibrate_to = None
        model.train(was_training)
    return float(activation_rate(state))


def trace_options(model: nn.Module) -> Tuple[Dict[str, Any], Optional[str]]:
    """Graph export runs DyT in its mask form: skipping has data-dependent shapes, which a traced
    graph cannot hold; every token is computed and multiplied by its mask (exact, no speed-up)."""
    return ({"dyt_execution": "mask"},
            "DyT is exported in its exact mask form (every token computed, then masked): skipping has "
            "data-dependent shapes that a traced graph cannot hold, so the export has no DyT speed-up")


register_method(Method(
    "dyt", DyTConfig, apply_dyt,
    trainable=(r"\.(adapter|attn_adapter|layer_adapter)\.", r"\.(attn|mlp|layer)_dispatcher\."),
    order=30, peft=True, reduces_tokens=True, composes_with=("tome",), deploy=deploy_dyt, loss=dyt_loss,
    on_step=update_temperature, trace_options=trace_options,
    set_activation=calibrate_activation, activation_target=lambda model: _config(model).target_rate,
    summary="Dynamic Tuning: token dispatchers skip attention/MLP per token, adapters on every token"))
