"""DyT's options (:class:`DyTConfig`, defaults: the reference VTAB-1k setting), their checks, and
the config a model was built with (:func:`config_of`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

from torch import nn

from ...core.vit import info_of
from ...errors import TokenTuneError
from ...typecheck import check_fields

VARIANTS = ("mlp", "attn", "attn_mlp", "layer")
EXECUTIONS = ("skip", "mask", "capacity")
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
            the paper's 0.16M parameters, 64 its larger-data setting). The limit on small data:
            on the demo's digits 64 beat 16 on every seed and split (+7.9 points; recipe
            ``dyt-small-data``).
        adapter_scale: adapter output multiplier (reference: 1.0 on VTAB-1k, 0.1 elsewhere).
        adapter_dropout: dropout on the adapter's hidden activation in training (reference 0.1).
        experts: adapter experts; 1 = the reference's plain adapter, >1 = the MoE-adapter
            (per-image routing from the mean token, experts merged in weight space; paper: 4).
        tau: Gumbel-sigmoid temperature in training (reference 5, constant).
        tau_end: temperature at the end of training for a decay schedule (None = constant
            ``tau``); applied by :func:`update_schedule`, which the training loop calls.
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
            reference training model's evaluation); ``"capacity"`` computes a fixed number of
            tokens per image and dispatcher, its top ``capacity`` by dispatcher logit, of which
            those above the threshold get their update (static shapes: no host sync, compiles
            without graph breaks, exports to ``torch.export``/ONNX with the speed-up; equal to
            ``"skip"`` whenever no image has more active tokens than the capacity).
        capacity: tokens per image of the ``"capacity"`` execution: a capacity factor ``f``
            (``ceil(f * target_rate * M)`` of a block's ``M`` patch tokens, at most ``M``; 1.0 =
            the trained rate's budget, ``1 / target_rate`` = every token) or one token count per
            dispatcher in block order (as :func:`tokentune.methods.dyt.calibrate_capacity` sets them).
        active_warmup: fraction of the training steps, from the start, in which every token is
            active: the loss is the complete model's cross-entropy alone and the dispatchers do
            not train (0: none, the reference). On the demo's digits (20 epochs) 0.25 cost 3.6
            points (``benchmarks/dyt_ablation.py``, BENCHMARKS.md): not for short budgets.
        rate_warmup: fraction of the training steps, after ``active_warmup``, over which the
            rate loss's target falls linearly from 1.0 to ``target_rate`` (0: ``target_rate``
            from the first step, the reference). On the demo's digits 0.5 cost 4.0 points on
            average (1 of 3 seeds better).
        calibrate_init: at the first training step, shift every dispatcher's bias with
            :func:`~tokentune.methods.dyt.schedule.calibrate_activation` on that step's batch so that
            the inference rule activates the scheduled target rate (reference: zero bias). No
            effect on the demo's digits (+0.0 ± 1.2 points over 3 seeds).
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
    capacity: Union[None, float, List[int]] = None
    active_warmup: float = 0.0
    rate_warmup: float = 0.0
    calibrate_init: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "dyt_")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise TokenTuneError(f"invalid dyt_adapter_dropout={self.adapter_dropout}: a dropout probability is in [0, 1)")
        if not (0.0 <= self.active_warmup < 1.0 and 0.0 <= self.rate_warmup <= 1.0
                and self.active_warmup + self.rate_warmup <= 1.0):
            raise TokenTuneError(f"invalid dyt_active_warmup={self.active_warmup}, dyt_rate_warmup={self.rate_warmup}: "
                                 "they are fractions of training, active_warmup in [0, 1), their sum at most 1")

    @property
    def scheduled(self) -> bool:
        """Whether the training loss depends on the training progress (warm-ups, calibration)."""
        return self.active_warmup > 0 or self.rate_warmup > 0 or self.calibrate_init


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
    if cfg.inference not in EXECUTIONS:
        raise TokenTuneError(f"dyt inference must be one of {', '.join(EXECUTIONS)}, got {cfg.inference!r}")
    check_capacity(cfg, num_dispatchers(cfg, depth))
    if cfg.inference == "capacity" and cfg.capacity is None:
        raise TokenTuneError(_NEEDS_CAPACITY)


_NEEDS_CAPACITY = ("the 'capacity' execution needs dyt_capacity: a capacity factor (e.g. 1.25 = 25% more tokens than "
                   "the target rate) or per-dispatcher token counts from tokentune.methods.dyt.calibrate_capacity")


def num_dispatchers(cfg: DyTConfig, depth: int) -> int:
    """How many token dispatchers a model of ``depth`` blocks gets (Attn-MLP: two per block)."""
    return (depth - cfg.keep_layers) * (2 if cfg.variant == "attn_mlp" else 1)


def check_capacity(cfg: DyTConfig, dispatchers: int) -> None:
    """One clear error for a capacity that cannot apply to a model with ``dispatchers`` dispatchers."""
    cap = cfg.capacity
    if cap is None:
        return
    if isinstance(cap, (int, float)):
        if not cap > 0:
            raise TokenTuneError(f"dyt capacity factor must be > 0, got {cap}")
        return
    if len(cap) != dispatchers or min(cap, default=0) < 0:
        raise TokenTuneError(f"dyt capacity lists one token count >= 0 per dispatcher: this model has {dispatchers}, "
                             f"got {list(cap)}; recalibrate with tokentune.methods.dyt.calibrate_capacity")


def config_of(model: nn.Module) -> DyTConfig:
    """The :class:`DyTConfig` a DyT model was built with."""
    info = info_of(model)                        # through compile / DDP wrappers
    cfg = info.state.get("dyt") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no DyT; build it with method='dyt'")
    return cfg
