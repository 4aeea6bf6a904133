"""Applying DyT to a model, deployment, and the method's registration (with its hooks: loss,
per-step schedule, deploy, export form, calibration)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

from ...core.dispatch import dispatchers
from ...core.method import Method, register_method
from ...core.vit import adapted_blocks
from ...errors import TokenTuneError
from ..adapter import Adapter, MoEAdapter
from .config import DyTConfig, config_of, validate
from .dispatcher import TokenDispatcher
from .loss import dyt_loss
from .schedule import calibrate_activation, update_schedule


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


def trace_options(model: nn.Module) -> Tuple[Dict[str, Any], Optional[str]]:
    """Graph export runs DyT in its mask form: skipping has data-dependent shapes, which a traced
    graph cannot hold; every token is computed and multiplied by its mask (exact, no speed-up)."""
    return ({"dyt_execution": "mask"},
            "DyT is exported in its exact mask form (every token computed, then masked): skipping has "
            "data-dependent shapes that a traced graph cannot hold, so the export has no DyT speed-up")


register_method(Method(
    "dyt", DyTConfig, apply_dyt,
    trainable=(r"\.(adapter|attn_adapter|layer_adapter)\.", r"\.(attn|mlp|layer)_dispatcher\."),
    order=30, peft=True, deploy=deploy_dyt, loss=dyt_loss, on_step=update_schedule, trace_options=trace_options,
    set_activation=calibrate_activation, activation_target=lambda model: config_of(model).target_rate,
    summary="Dynamic Tuning: token dispatchers skip attention/MLP per token, adapters on every token"))
