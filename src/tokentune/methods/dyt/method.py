"""Applying DyT to a model, deployment, and the method's registration (with its hooks: loss,
per-step schedule, deploy, export form, calibration)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ...core.dispatch import dispatch_records, dispatchers
from ...core.factory import record_config
from ...core.method import Method, register_method
from ...core.vit import adapted_blocks
from ...errors import TokenTuneError
from ...utils import unwrap_model
from ..adapter import Adapter, MoEAdapter
from .config import EXECUTIONS, DyTConfig, check_capacity, config_of, validate
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
        dim, like = block.width(), block.param_like()
        for adapter_slot, dispatcher_slot, kind in slots:
            setattr(block, adapter_slot, _make_adapter(dim, cfg).to(**like))
            if i >= cfg.keep_layers:
                setattr(block, dispatcher_slot, TokenDispatcher(dim, i, kind, cfg.tau, cfg.threshold,
                                                                cfg.gumbel_noise, cfg.inference).to(**like))
    model.tokentune.state["dyt"] = cfg
    _set_capacity(model, cfg)


def _in_order(model: nn.Module) -> List[TokenDispatcher]:
    """The dispatchers in the order they run (block by block; attention before the MLP), the
    order of per-dispatcher capacities."""
    return sorted(dispatchers(model), key=lambda d: (d.layer, d.kind == "mlp"))


def _set_capacity(model: nn.Module, cfg: DyTConfig) -> None:
    """Give every dispatcher its execution and capacity from ``cfg``."""
    ds = _in_order(model)
    check_capacity(cfg, len(ds))
    counts = cfg.capacity if isinstance(cfg.capacity, (list, tuple)) else [None] * len(ds)
    factor = float(cfg.capacity) if isinstance(cfg.capacity, (int, float)) else None
    for d, count in zip(ds, counts):
        d.inference, d.target_rate = cfg.inference, float(cfg.target_rate)
        d.capacity_tokens, d.capacity_factor = (None if count is None else int(count)), factor


def _update_config(model: nn.Module, **changes) -> DyTConfig:
    """Change DyT's recorded options (model state and build spec, so exports rebuild them) and apply them."""
    core = unwrap_model(model)
    cfg = dataclasses.replace(config_of(core), **changes)
    _set_capacity(core, cfg)
    core.tokentune.state["dyt"] = cfg
    record_config(core, "dyt", cfg)
    return cfg


def deploy_dyt(model: nn.Module, *, execution: Optional[str] = None,
               capacity: Union[None, float, List[int]] = None) -> None:
    """Deployment: every dispatcher skips inactive tokens for real in eval mode.

    ``tokentune.deploy(model, dyt_execution=..., dyt_capacity=...)`` passes the options:

    * ``execution``: ``"skip"`` (the default unless the model was built with
      ``dyt_inference="capacity"``): the threshold rule, data-dependent shapes;
      ``"capacity"``: a fixed number of tokens per image and dispatcher (static shapes: compiles
      without graph breaks, exports with the speed-up); ``"mask"``: every token computed, masked.
    * ``capacity``: the capacity factor or per-dispatcher token counts (``DyTConfig.capacity``).
    """
    cfg = config_of(model)
    if execution is None:
        execution = "capacity" if cfg.inference == "capacity" else "skip"
    if execution not in EXECUTIONS:
        raise TokenTuneError(f"unknown dyt_execution {execution!r}; choose from {', '.join(EXECUTIONS)}")
    capacity = cfg.capacity if capacity is None else capacity
    if execution == "capacity" and capacity is None:
        raise TokenTuneError("deploying with dyt_execution='capacity' needs dyt_capacity: a capacity factor (e.g. "
                             "dyt_capacity=1.25) or per-dispatcher token counts from tokentune.methods.dyt.calibrate_capacity")
    _update_config(model, inference=execution, capacity=capacity)


@torch.no_grad()
def calibrate_capacity(model: nn.Module, data: Union[torch.Tensor, Iterable], quantile: float = 1.0,
                       max_batches: Optional[int] = None) -> List[int]:
    """Set the capacity of every dispatcher from data and switch the model to the capacity execution.

    Runs the threshold rule (``dyt_execution="skip"``) on ``data`` (an image batch, a DataLoader or
    any iterable of batches or ``(images, targets, ...)``) and gives each dispatcher, as its
    capacity, the ``quantile`` of the per-image counts of its active patch tokens (1.0: the most
    any image activated, so the capacity execution equals the threshold rule on every one of
    these images; lower values trade exactness on the busiest images for speed). The counts are
    recorded in the model's DyT config (``capacity``; ``inference="capacity"``), so
    :func:`tokentune.deploy` and exports keep them. Returns the counts, one per dispatcher.
    """
    if not 0.0 <= quantile <= 1.0:
        raise TokenTuneError(f"capacity quantile must be in [0, 1], got {quantile}")
    core = unwrap_model(model)
    ds = _in_order(core)
    if not ds:
        raise TokenTuneError("this model has no token dispatchers; build it with method='dyt'")
    batches = [data] if isinstance(data, torch.Tensor) else data
    device = next(core.parameters()).device
    counts: Dict[Tuple[int, str], List[torch.Tensor]] = {(d.layer, d.kind): [] for d in ds}
    was_training = core.training
    core.eval()
    try:
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            _, state = core(images.to(device), return_state=True, dyt_execution="skip")
            for record in dispatch_records(state):
                counts[(record.layer, record.kind)].append(record.patch_mask().sum(dim=1).float().cpu())
    finally:
        core.train(was_training)
    if not counts[(ds[0].layer, ds[0].kind)]:
        raise TokenTuneError("no images to calibrate the capacity on; pass a batch or a non-empty DataLoader")
    tokens = [int(math.ceil(float(torch.cat(counts[(d.layer, d.kind)]).quantile(quantile)) - 1e-6)) for d in ds]
    _update_config(core, inference="capacity", capacity=tokens)
    return tokens


def trace_options(model: nn.Module) -> Tuple[Dict[str, Any], Optional[str]]:
    """Graph export: the capacity execution traces as it is (static shapes, the speed-up inside
    the graph); the threshold rule's skipping has data-dependent shapes, which a traced graph
    cannot hold, so it runs in its mask form (every token computed, then masked: exact, no speed-up)."""
    if config_of(model).inference == "capacity":
        return {}, None
    return ({"dyt_execution": "mask"},
            "DyT is exported in its exact mask form (every token computed, then masked): skipping by the threshold "
            "rule has data-dependent shapes that a traced graph cannot hold, so the export has no DyT speed-up "
            "(deploy with dyt_execution='capacity' for static shapes with the speed-up)")


register_method(Method(
    "dyt", DyTConfig, apply_dyt,
    trainable=(r"\.(adapter|attn_adapter|layer_adapter)\.", r"\.(attn|mlp|layer)_dispatcher\."),
    order=30, peft=True, reduces_tokens=True, composes_with=("tome",), deploy=deploy_dyt, loss=dyt_loss,
    on_step=update_schedule, trace_options=trace_options,
    set_activation=calibrate_activation, activation_target=lambda model: config_of(model).target_rate,
    summary="Dynamic Tuning: token dispatchers skip attention/MLP per token, adapters on every token"))
