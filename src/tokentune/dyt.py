"""DyT: Dynamic Tuning (Zhao et al., NeurIPS 2024, arXiv 2403.11808).

A *token dispatcher* per block decides, per token, whether the token takes part in a
skippable computation (attention, the MLP, or the whole block); an adapter processes every token
in parallel with it, so skipped tokens are still adapted::

    X' = X + M * Block(X) + Adapter(X)        forward with the hard mask M,
                                              backward with the soft mask S (straight-through)

Dispatcher (:class:`TokenDispatcher`): ``g = Linear(D -> 1)`` on the patch tokens (prefix tokens,
i.e. CLS and registers, are always active and get no gradient). Training:
``S = sigmoid((g + G1 - G2) / tau)`` with ``G1, G2 ~ Gumbel(0, 1)``, ``M = 1[S > 0.5]``, gate
``M - stopgrad(S) + S``. Inference: ``M = 1[sigmoid(g) > 0.5]``, no noise (tau does not matter).

Variants (``DyTConfig.variant``), all built on :class:`tokentune.model.AdaptedBlock`::

    "mlp"       x1 = x + attn(x)                        x2 = x1 + M * mlp(x1) + adapter(x1)   (default, reference)
    "attn"      x1 = x + M * attn_M(x) + attn_adapter(x)  x2 = x1 + mlp(x1)
    "attn_mlp"  x1 = x + Ma * attn_Ma(x) + attn_adapter(x)  x2 = x1 + Mm * mlp(x1) + adapter(x1)
    "layer"     x1 = x + M * attn_M(x)                  x2 = x1 + M * mlp(x1) + layer_adapter(x)

``attn_M`` means attention among the active tokens only: inactive tokens are neither queries nor
keys/values. Readings where the paper gives only a figure (documented choices):

* Every skippable unit gets the full DyT treatment of Fig. 2 (its own dispatcher *and* its own
  adapter in parallel with it): Attn Dispatch puts the adapter parallel to attention (on the block
  input), Attn-MLP Dispatch has two dispatchers and two adapters, Layer Dispatch has one
  dispatcher and one adapter parallel to the whole block (on the block input).
* In training, attention dispatch hides inactive keys with a hard additive mask and gates the
  updates with the straight-through mask; the dispatcher learns through the gate (the paper's
  ``Block(X) * S`` backward), not through the key mask.
* The rate loss averages the activation of every dispatcher (two per block for Attn-MLP).

Execution. Training multiplies the skippable update by the gate (every token is computed).
Inference (eval mode, ``inference="skip"``, the default; :func:`tokentune.deploy` forces it)
really skips: the MLP runs once on the active rows of the whole batch (flatten to ``(B*N, C)``,
``index_select``, norm2 + MLP, ``index_copy`` of ``x + update`` back); attention gathers the
active tokens of every image, pads to the largest count in the batch with a key mask, and writes
back the same way. Both paths give the same outputs (to float precision), so FLOPs and time
follow the activation rate. Per-forward options, ``model(x, **options)``:

* ``dyt_complete=True``: the *complete model*, every token active (same weights); a bool
  tensor [B] makes only those rows complete (the loss uses one forward on ``cat([x, x])``).
* ``dyt_execution="mask"`` / ``"skip"``: override the inference path for this forward.

Temperature: constant ``tau`` by default; with ``tau_end`` the training loop calls
:func:`update_temperature` (``model``, progress in [0, 1]) before each step (the method's
``on_step`` hook, so ``tokentune train`` does it), or a user calls
:func:`set_temperature` / :func:`temperature_at` directly. :func:`calibrate_activation` sets the
dispatcher biases to reach a given rate on a batch (benchmarks of untrained models).
:func:`activation_stats` gives per-layer and overall rates over a dataset and per-image masks.

DyT + ToMe (``method="dyt+tome"``, MLP Dispatch only): ToMe merges between attention and the
MLP as usual, then the dispatcher sees the *merged* tokens and the MLP runs on the active merged
tokens; the adapter processes all merged tokens. Attention runs on every token, so the ToMe keys,
token sizes and proportional attention are exactly ToMe's; skipping never changes sizes. The
activation rate of a block is taken over its (merged) patch tokens. ToMe has no parameters, so
a DyT model trained without merging can be rebuilt with ``dyt+tome`` and loaded as is. Attention
dispatch cannot merge (skipped tokens have no keys to match).

Losses (:func:`dyt_loss`, the method's ``loss`` hook; reference: models/losses.py and
engine_finetune.py)::

    L = CE(dynamic) + rate_weight * (mean M - r)^2 + complete_weight * CE(complete)
        + distill_weight * KL(softmax(complete).detach() || softmax(dynamic))

with ``mean M`` over dispatchers, patch tokens and images (defaults 2, 1, 1; KL "batchmean").

Parameter names (reference NUS-HPC-AI-Lab/Dynamic-Tuning -> tokentune, ``i`` the block)::

    blocks.{i}.adaptmlp.down_proj.{weight,bias}          blocks.{i}.adapter.down_proj.{weight,bias}
    blocks.{i}.adaptmlp.up_proj.{weight,bias}            blocks.{i}.adapter.up_proj.{weight,bias}
    blocks.{i}.mlp_token_select.mlp_head.{weight,bias}   blocks.{i}.mlp_dispatcher.linear.{weight,bias}
    pre_logits.fc.*                                      (dropped; unused by the reference too)
    everything else (timm ViT names)                     unchanged

Ours only (no reference): ``blocks.{i}.attn_dispatcher.linear.*``, ``blocks.{i}.layer_dispatcher.
linear.*``, ``blocks.{i}.attn_adapter.*``, ``blocks.{i}.layer_adapter.*``, and the MoE adapter
``blocks.{i}.<adapter>.{down_weight,down_bias,up_weight,up_bias,router.weight,router.bias}``.
:func:`from_reference_state_dict` / :func:`to_reference_state_dict` convert between the two.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, MoEAdapter
from .backbone import load_weights_file
from .checkpoint import rename_keys
from .config import Recipe, register_recipe
from .errors import TokenTuneError
from .methods import Method, register_method
from .model import Dispatch, TokenState, adapted_blocks
from .typecheck import check_fields

VARIANTS = ("mlp", "attn", "attn_mlp", "layer")
TAU_SCHEDULES = ("linear", "cosine", "exponential")


# ----------------------------------------------------------------------------- config
@dataclass
class DyTConfig:
    """Dynamic Tuning options (defaults: the reference VTAB-1k setting).

    Attributes:
        variant: where tokens are dispatched: ``"mlp"`` (MLP Dispatch, the paper's default and
            the reference code), ``"attn"``, ``"attn_mlp"`` or ``"layer"``.
        target_rate: target activation rate ``r`` of the rate loss (reference:
            ``token_target_ratio``, 0.5).
        bottleneck: adapter hidden width (reference ``ffn_num``: 16 in the VTAB script; 8 gives
            the paper's 0.16M parameters, 64 its larger-data setting).
        adapter_scale: adapter output multiplier (reference: 1.0 on VTAB-1k, 0.1 elsewhere).
        adapter_dropout: dropout on the adapter's hidden activation in training (reference 0.1).
        experts: adapter experts; 1 = the reference's plain adapter, >1 = the MoE-adapter
            (per-image routing from the mean token, experts merged in weight space; paper: 4).
        tau: Gumbel-sigmoid temperature in training (reference 5, constant).
        tau_end: temperature at the end of training for a decay schedule (None = constant
            ``tau``); applied by :func:`update_temperature`, which the training loop calls.
        tau_schedule: shape of the decay from ``tau`` to ``tau_end``: ``"linear"``,
            ``"cosine"`` or ``"exponential"``.
        threshold: a token is active when its (noisy, in training) sigmoid exceeds this (0.5).
        gumbel_noise: add the logistic (G1 - G2) noise in training (reference: yes).
        keep_layers: the first ``keep_layers`` blocks have adapters but no dispatcher (all
            tokens active there; reference ``keep_layers``, 0).
        rate_weight: weight of the rate loss (reference ``token_loss_ratio``, 2).
        complete_weight: weight of the complete model's cross-entropy (reference 1; 0 with
            ``distill_weight`` 0 skips the complete-model pass).
        distill_weight: weight of KL(complete || dynamic) on the logits (reference 1).
        inference: in eval mode, ``"skip"`` leaves inactive tokens out of the skipped
            computation (real speed-up); ``"mask"`` multiplies by the mask like training (the
            reference training model's evaluation).
    """

    variant: str = "mlp"
    target_rate: float = 0.5
    bottleneck: int = 16
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1
    experts: int = 1
    tau: float = 5.0
    tau_end: Optional[float] = None
    tau_schedule: str = "linear"
    threshold: float = 0.5
    gumbel_noise: bool = True
    keep_layers: int = 0
    rate_weight: float = 2.0
    complete_weight: float = 1.0
    distill_weight: float = 1.0
    inference: str = "skip"

    def __post_init__(self) -> None:
        check_fields(self, "dyt_")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise TokenTuneError(f"invalid dyt_adapter_dropout={self.adapter_dropout}: a dropout probability is in [0, 1)")


def validate(cfg: DyTConfig, depth: int) -> None:
    """One clear error for any option out of range (``depth``: the model's block count)."""
    if cfg.variant not in VARIANTS:
        raise TokenTuneError(f"unknown dyt variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
    if not 0.0 <= cfg.target_rate <= 1.0:
        raise TokenTuneError(f"dyt target_rate must be in [0, 1], got {cfg.target_rate}")
    if cfg.bottleneck <= 0 or cfg.experts <= 0:
        raise TokenTuneError(f"dyt bottleneck and experts must be positive, got {cfg.bottleneck} and {cfg.experts}")
    if cfg.tau <= 0 or (cfg.tau_end is not None and cfg.tau_end <= 0):
        raise TokenTuneError(f"dyt temperatures must be positive, got tau={cfg.tau}, tau_end={cfg.tau_end}")
    if cfg.tau_schedule not in TAU_SCHEDULES:
        raise TokenTuneError(f"unknown dyt tau_schedule {cfg.tau_schedule!r}; choose from {', '.join(TAU_SCHEDULES)}")
    if not 0.0 < cfg.threshold < 1.0:
        raise TokenTuneError(f"dyt threshold must be in (0, 1), got {cfg.threshold}")
    if not 0 <= cfg.keep_layers <= depth:
        raise TokenTuneError(f"dyt keep_layers={cfg.keep_layers} but the model has {depth} blocks; use 0..{depth}")
    if min(cfg.rate_weight, cfg.complete_weight, cfg.distill_weight) < 0:
        raise TokenTuneError("dyt loss weights must be >= 0")
    if cfg.inference not in ("skip", "mask"):
        raise TokenTuneError(f"dyt inference must be 'skip' or 'mask', got {cfg.inference!r}")


# ----------------------------------------------------------------------------- dispatcher
@dataclass
class DispatchRecord:
    """What one dispatcher decided in one forward (kept in ``TokenState.records`` under ``dyt``).

    Attributes:
        layer: block index.
        kind: ``"attn"``, ``"mlp"`` or ``"layer"``.
        mask: [B, N] the gate in training (straight-through: values 0/1, soft gradient) or the
            hard mask as float in eval; prefix tokens included (always 1).
        num_prefix: prefix tokens at the front of ``mask``.
        complete: [B] bool rows that ran the complete model (excluded from rates), or None.
        source: ToMe's [B, N, N0] token -> input-token map at this block when traced, else None.
    """

    layer: int
    kind: str
    mask: torch.Tensor
    num_prefix: int
    complete: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    def patch_mask(self, dynamic_only: bool = True) -> torch.Tensor:
        """[B', N - num_prefix] the mask on the patch tokens (of the dynamic rows)."""
        mask = self.mask[:, self.num_prefix:]
        if dynamic_only and self.complete is not None:
            mask = mask[~self.complete]
        return mask


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples: -log(E), E ~ Exp(1). A sigmoid is a two-way softmax, so its
    Gumbel-softmax noise is the difference of two Gumbels (a logistic sample)."""
    return -torch.empty_like(like, memory_format=torch.legacy_contiguous_format).exponential_().log()


class TokenDispatcher(nn.Module):
    """DyT token dispatcher: ``Linear(D -> 1)`` on the patch tokens, Gumbel-sigmoid + STE.

    Args:
        dim: token width.
        layer: index of its block (for records and statistics).
        kind: what it dispatches: ``"attn"``, ``"mlp"`` or ``"layer"``.
        tau: training temperature.
        threshold: activation threshold on the sigmoid.
        gumbel_noise: add logistic noise in training.
        inference: ``"skip"`` or ``"mask"`` (eval-mode execution path).
    """

    def __init__(self, dim: int, layer: int, kind: str, tau: float = 5.0, threshold: float = 0.5,
                 gumbel_noise: bool = True, inference: str = "skip") -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.layer, self.kind = int(layer), kind
        self.tau, self.threshold = float(tau), float(threshold)
        self.gumbel_noise, self.inference = bool(gumbel_noise), inference
        self.calibrate_to: Optional[float] = None
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, tau={self.tau:g}, threshold={self.threshold:g}"

    def forward(self, x: torch.Tensor, state: TokenState) -> Tuple[Optional[Dispatch], TokenState]:
        complete = state.options.get("dyt_complete", False)
        if complete is True:
            return None, state                          # the complete model: nothing is skipped
        if complete is False or complete is None:
            complete = None
        p = state.num_prefix
        logits = self.linear(x)[:, p:]                  # [B, N - p, 1]; slicing x first would copy it
        if self.calibrate_to is not None:
            logits = self._calibrate(logits, complete)
        if self.training:
            noisy = logits + _gumbel(logits) - _gumbel(logits) if self.gumbel_noise else logits
            soft = (noisy / self.tau).sigmoid()
            hard = torch.zeros_like(soft).masked_fill(soft > self.threshold, 1.0)
            gate = (hard - soft.detach() + soft).squeeze(-1)        # STE: forward hard, backward soft
            active = hard.squeeze(-1) > 0
        else:
            active = (logits.sigmoid() > self.threshold).squeeze(-1)
            gate = None
        B = x.shape[0]
        active = torch.cat([active.new_ones(B, p), active], dim=1)
        if gate is not None:
            gate = torch.cat([gate.new_ones(B, p), gate], dim=1)
        if complete is not None:
            complete = complete.to(device=x.device, dtype=torch.bool)
            active = active | complete[:, None]
            if gate is not None:
                gate = torch.where(complete[:, None], torch.ones_like(gate), gate)
        skip = not self.training and state.options.get("dyt_execution", self.inference) == "skip"
        mask = gate if gate is not None else active.to(x.dtype)
        record = DispatchRecord(self.layer, self.kind, mask, p, complete, state.source)
        return Dispatch(active, gate, skip), state.record(dyt=record)

    @torch.no_grad()
    def _calibrate(self, logits: torch.Tensor, complete: Optional[torch.Tensor]) -> torch.Tensor:
        """Shift the bias so that ``calibrate_to`` of these patch tokens are active (eval rule)."""
        values = logits[~complete] if complete is not None else logits
        q = values.flatten().float().sort().values
        n = q.numel()
        inactive = int(round((1.0 - self.calibrate_to) * n))
        t = math.log(self.threshold / (1.0 - self.threshold))       # sigmoid(g) > thr <=> g > t
        if inactive <= 0:
            shift = t - float(q[0]) + 1.0
        elif inactive >= n:
            shift = t - float(q[-1]) - 1.0
        else:
            shift = t - 0.5 * (float(q[inactive - 1]) + float(q[inactive]))
        self.linear.bias.add_(shift)
        return logits + shift


def dispatchers(model: nn.Module) -> List[TokenDispatcher]:
    """Every :class:`TokenDispatcher` of the model, in block order."""
    model = getattr(model, "module", model)
    return [m for m in model.modules() if isinstance(m, TokenDispatcher)]


# ----------------------------------------------------------------------------- apply / deploy
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
    for i, block in enumerate(blocks):
        dim = block.norm2.normalized_shape[0] if hasattr(block.norm2, "normalized_shape") else block.mlp.fc1.in_features
        ref = block.mlp.fc1.weight
        dispatched = i >= cfg.keep_layers

        def dispatcher(kind):
            return TokenDispatcher(dim, i, kind, cfg.tau, cfg.threshold, cfg.gumbel_noise, cfg.inference).to(
                device=ref.device, dtype=ref.dtype)

        def adapter():
            return _make_adapter(dim, cfg).to(device=ref.device, dtype=ref.dtype)

        if cfg.variant in ("mlp", "attn_mlp"):
            block.adapter = adapter()
            if dispatched:
                block.mlp_dispatcher = dispatcher("mlp")
        if cfg.variant in ("attn", "attn_mlp"):
            block.attn_adapter = adapter()
            if dispatched:
                block.attn_dispatcher = dispatcher("attn")
        if cfg.variant == "layer":
            block.layer_adapter = adapter()
            if dispatched:
                block.layer_dispatcher = dispatcher("layer")
    model.dyt_config = cfg


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


# ----------------------------------------------------------------------------- losses
def _config(model: nn.Module) -> DyTConfig:
    core = getattr(model, "module", model)       # DDP / DataParallel wrappers
    cfg = getattr(core, "dyt_config", None)
    if cfg is None:
        raise TokenTuneError("this model has no DyT; build it with method='dyt'")
    return cfg


def dispatch_records(state: TokenState) -> List[DispatchRecord]:
    """The :class:`DispatchRecord` s of a forward, in block order."""
    return [r["dyt"] for r in state.records if "dyt" in r]


def activation_rate(state: TokenState) -> Optional[torch.Tensor]:
    """Mean activation over dispatchers, patch tokens and (dynamic) images; None if no dispatcher.

    Each dispatcher's mean is taken over its own tokens, then the dispatchers are averaged:
    with a constant token count this is the reference's mean over [B, layers, tokens]; with ToMe
    every block counts once whatever its number of merged tokens.
    """
    masks = [r.patch_mask() for r in dispatch_records(state)]
    rates = [m.mean() for m in masks if m.numel() > 0]
    return torch.stack(rates).mean() if rates else None


def rate_loss(state: TokenState, target: float) -> torch.Tensor:
    """``(mean activation - target)^2`` (DyT's L_rate; 0 without dispatchers)."""
    rate = activation_rate(state)
    if rate is None:
        return torch.zeros(())
    return (rate - target) ** 2


def dyt_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DyT's training loss (the method's ``loss`` hook).

    One forward call: with complete-model terms enabled the batch is duplicated and its second
    half runs with every token active (``dyt_complete`` rows), so DDP sees a single forward and
    every parameter takes part. ``criterion`` gives both cross-entropies (the reference: plain CE).
    """
    cfg = _config(model)
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
        l_rate = (rate - cfg.target_rate) ** 2
        loss = loss + cfg.rate_weight * l_rate
        logs.update(rate=float(rate.detach()), rate_loss=float(l_rate.detach()))
    if complete:
        if cfg.complete_weight > 0:
            ce_full = criterion(full, targets)
            loss = loss + cfg.complete_weight * ce_full
            logs["ce_complete"] = float(ce_full.detach())
        if cfg.distill_weight > 0:
            kl = F.kl_div(F.log_softmax(dynamic, dim=-1), F.log_softmax(full.detach(), dim=-1),
                          reduction="batchmean", log_target=True)
            loss = loss + cfg.distill_weight * kl
            logs["kl"] = float(kl.detach())
    return loss, logs


# ----------------------------------------------------------------------------- calibration
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


# ----------------------------------------------------------------------------- statistics
@dataclass
class ActivationStats:
    """Activation rates of a DyT model over a dataset.

    Attributes:
        names: one per dispatcher, ``"blocks.{i}.{kind}"``.
        per_layer: activation rate of each dispatcher over all patch tokens of all images.
        overall: mean of ``per_layer`` (the paper's "Overall" of Fig. 5).
        num_images: images seen.
        masks: [num_images, dispatchers, num_patches] bool per-image masks on the patch grid
            (through ToMe's source map when merging), if requested.
        grid: patch grid (rows, cols) for reshaping ``masks``.
    """

    names: List[str]
    per_layer: List[float]
    overall: float
    num_images: int
    masks: Optional[torch.Tensor] = None
    grid: Optional[Tuple[int, int]] = None

    def summary(self) -> str:
        lines = [f"overall activation {100 * self.overall:.1f}% over {self.num_images} images"]
        lines += [f"  {n}: {100 * r:.1f}%" for n, r in zip(self.names, self.per_layer)]
        return "\n".join(lines)


def _patch_positions(record: DispatchRecord) -> torch.Tensor:
    """[B, num_patches] bool: each input patch takes the decision of the token it belongs to."""
    mask = record.mask.detach()
    if record.complete is not None:
        mask = mask.masked_fill(record.complete[:, None], 1.0)
    if record.source is None:
        return mask[:, record.num_prefix:] > 0.5
    per_input = torch.bmm(mask[:, None, :].to(record.source.dtype), record.source)[:, 0]
    return per_input[:, record.num_prefix:] > 0.5


@torch.no_grad()
def activation_stats(model: nn.Module, data: Iterable, device: Union[str, torch.device, None] = None,
                     keep_masks: bool = False, max_batches: Optional[int] = None) -> ActivationStats:
    """Per-dispatcher and overall activation rates (patch tokens only) over ``data``.

    Args:
        model: a DyT model (evaluated in eval mode; its mode is restored).
        data: a DataLoader or any iterable of image batches or ``(images, targets, ...)``.
        device: where to run (default: the model's device).
        keep_masks: also return every image's masks on the patch grid (for visualisation).
        max_batches: stop after this many batches.
    """
    core = getattr(model, "module", model)
    if not dispatchers(core):
        raise TokenTuneError("this model has no token dispatchers; build it with method='dyt'")
    device = torch.device(device) if device is not None else next(core.parameters()).device
    merging = any(b.merge is not None for b in adapted_blocks(core))
    old_trace, old_mode = core.tokentune_trace_source, core.training
    if keep_masks and merging:
        core.tokentune_trace_source = True
    core.eval()
    sums: List[torch.Tensor] = []
    counts: List[int] = []
    names: List[str] = []
    masks: List[torch.Tensor] = []
    images_seen = 0
    try:
        for step, batch in enumerate(data):
            if max_batches is not None and step >= max_batches:
                break
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            _, state = core(images.to(device), return_state=True)
            records = dispatch_records(state)
            if not sums:
                names = [f"blocks.{r.layer}.{r.kind}" for r in records]
                sums = [torch.zeros((), dtype=torch.float64) for _ in records]
                counts = [0] * len(records)
            for j, r in enumerate(records):
                m = r.patch_mask()
                sums[j] += m.double().sum().cpu()
                counts[j] += m.numel()
            if keep_masks:
                masks.append(torch.stack([_patch_positions(r) for r in records], dim=1).cpu())
            images_seen += images.shape[0]
    finally:
        core.tokentune_trace_source = old_trace
        core.train(old_mode)
    per_layer = [float(s) / max(c, 1) for s, c in zip(sums, counts)]
    grid = tuple(int(g) for g in core.patch_embed.grid_size) if hasattr(core.patch_embed, "grid_size") else None
    return ActivationStats(names, per_layer, sum(per_layer) / max(len(per_layer), 1), images_seen,
                           torch.cat(masks) if masks else None, grid)


# ----------------------------------------------------------------------------- reference checkpoints
_FROM_REFERENCE = [
    (re.compile(r"^blocks\.(\d+)\.adaptmlp\.(down_proj|up_proj)\.(weight|bias)$"), r"blocks.\1.adapter.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp_token_select\.mlp_head\.(weight|bias)$"), r"blocks.\1.mlp_dispatcher.linear.\2"),
]
_TO_REFERENCE = [
    (re.compile(r"^blocks\.(\d+)\.adapter\.(down_proj|up_proj)\.(weight|bias)$"), r"blocks.\1.adaptmlp.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp_dispatcher\.linear\.(weight|bias)$"), r"blocks.\1.mlp_token_select.mlp_head.\2"),
]
_NOT_IN_REFERENCE = re.compile(r"\.(attn_dispatcher|layer_dispatcher|attn_adapter|layer_adapter)\.|"
                               r"\.(down_weight|down_bias|up_weight|up_bias)$|\.router\.")


def from_reference_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A DyT reference state dict (or a checkpoint with a ``model`` key) -> tokentune names."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("pre_logits.", "module.pre_logits."))}
    for key in state_dict:
        if (".adaptmlp." in key or ".mlp_token_select." in key) and not any(p.match(key) for p, _ in _FROM_REFERENCE):
            raise TokenTuneError(f"reference parameter {key!r} has no tokentune counterpart "
                                 "(only the plain adapter without LayerNorm is supported)")
    return rename_keys(state_dict, _FROM_REFERENCE)


def to_reference_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """tokentune names -> the DyT reference's (MLP Dispatch with plain adapters only)."""
    for key in state_dict:
        if _NOT_IN_REFERENCE.search(key):
            raise TokenTuneError(f"{key!r} has no counterpart in the DyT reference implementation "
                                 "(it ships MLP Dispatch with a plain adapter only)")
    return rename_keys(state_dict, _TO_REFERENCE)


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Dict[str, torch.Tensor]], *,
                              trust_checkpoint: bool = False) -> None:
    """Load a DyT reference checkpoint (path or state dict) into a ``method="dyt"`` model.

    A path is read by :func:`tokentune.backbone.load_weights_file`: weights-only unpickling, which
    reads the reference's ``{"model", "optimizer", "epoch", "scaler", "args"}`` files (their
    ``argparse.Namespace`` of training arguments is allow-listed) without running code from them.
    A file pickling any other object is refused with one line naming it;
    ``trust_checkpoint=True`` unpickles it fully: only for files you trust, it can run any code.

    Every tensor of the checkpoint must fit the model and every DyT parameter of the model must
    be present; backbone tensors missing from the checkpoint keep their values.
    """
    from .checkpoint import load_state_into

    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_weights_file(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)
    tensors = from_reference_state_dict(checkpoint)
    load_state_into(model, tensors, source="DyT reference checkpoint", require_all_trainable=False)
    missing = [n for n, _ in model.named_parameters()
               if re.search(r"\.(adapter|mlp_dispatcher)\.", n) and n not in tensors]
    if missing:
        raise TokenTuneError(f"DyT reference checkpoint lacks {missing[0]!r} (and {len(missing) - 1} more); "
                             "build the model with the reference's bottleneck and keep_layers")


# ----------------------------------------------------------------------------- registration
register_method(Method(
    "dyt", DyTConfig, apply_dyt,
    trainable=(r"\.(adapter|attn_adapter|layer_adapter)\.", r"\.(attn|mlp|layer)_dispatcher\."),
    order=30, peft=True, deploy=deploy_dyt, loss=dyt_loss, on_step=update_temperature,
    summary="Dynamic Tuning: token dispatchers skip attention/MLP per token, adapters on every token"))

# The reference VTAB-1k run (train_vtab.sh, main_vtab.py, engine_finetune.py): ffn_num 16, scale 1,
# AdamW(lr 1e-3, wd 1e-4 on every trainable tensor), batch 64, 100 epochs, MAE-style per-iteration
# schedule (linear warm-up from 0 over 10 epochs, half-cycle cosine to 1e-5), fp16 autocast (here
# "auto": mixed precision on GPU), no clipping, no drop-path, no smoothing, evaluation every epoch,
# Inception mean/std 0.5, bicubic 224 resize, head re-initialised with trunc_normal(0.01).
_VTAB_MODEL = dict(
    dyt_variant="mlp", dyt_target_rate=0.5, dyt_bottleneck=16, dyt_adapter_scale=1.0, dyt_adapter_dropout=0.1,
    dyt_experts=1, dyt_tau=5.0, dyt_tau_end=None, dyt_threshold=0.5, dyt_gumbel_noise=True, dyt_keep_layers=0,
    dyt_rate_weight=2.0, dyt_complete_weight=1.0, dyt_distill_weight=1.0, dyt_inference="skip",
    drop_path_rate=0.0, head_init_std=0.01,
)
_VTAB_TRAIN = dict(
    epochs=100, batch_size=64, grad_accum=1, lr=1e-3, min_lr=1e-5, warmup_epochs=10, warmup_lr=0.0,
    schedule_step="iter", weight_decay=1e-4, no_decay_norm_bias=False, opt_eps=1e-8, betas=(0.9, 0.999),
    param_groups={}, clip_grad=None, label_smoothing=0.0, amp="auto", seed=0, drop_last=False, eval_every=1,
    train_split="train800val200", test_split="test", normalization="inception", image_size=224,
    interpolation="bicubic",
)

register_recipe(Recipe(
    name="dyt-vtab", method="dyt", model_options=dict(_VTAB_MODEL), train_options=dict(_VTAB_TRAIN),
    summary="DyT VTAB-1k reference recipe for vit_base_patch16_224.orig_in21k (MLP Dispatch r=0.5, "
            "adapter 16/scale 1, CE + 2 rate + complete CE + KL)"))
