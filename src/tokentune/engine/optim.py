"""The optimizer and the learning-rate schedule: AdamW over parameter groups, warm-up + cosine,
per step or per epoch, and the checks of every training option."""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..errors import TokenTuneError
from ..precision import AMP_MODES
from .config import TrainConfig
from .data import INTERPOLATIONS, NORMALIZATIONS


# ----------------------------------------------------------------------------- config checks
def validate_config(cfg: TrainConfig) -> None:
    """One clear error for any invalid training option."""
    def bad(name, value, want):
        raise TokenTuneError(f"invalid {name}={value!r}: {want}")

    cfg = cfg.resolved()
    if int(cfg.epochs) < 1:
        bad("epochs", cfg.epochs, "need at least 1")
    if int(cfg.batch_size) < 1:
        bad("batch_size", cfg.batch_size, "need at least 1")
    if int(cfg.grad_accum) < 1:
        bad("grad_accum", cfg.grad_accum, "need at least 1")
    if not cfg.lr > 0:
        bad("lr", cfg.lr, "the peak learning rate must be > 0")
    for name in ("min_lr", "warmup_lr", "weight_decay", "opt_eps"):
        if getattr(cfg, name) < 0:
            bad(name, getattr(cfg, name), "must be >= 0")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs:
        bad("warmup_epochs", cfg.warmup_epochs, f"must be >= 0 and smaller than epochs ({cfg.epochs}); "
            "lower --warmup-epochs")
    if cfg.schedule_step not in ("iter", "epoch"):
        bad("schedule_step", cfg.schedule_step, "choose iter or epoch")
    betas = tuple(cfg.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        bad("betas", cfg.betas, "give two values in [0, 1), e.g. 0.9,0.999")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        bad("clip_grad", cfg.clip_grad, "must be > 0 (or None for no clipping)")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        bad("label_smoothing", cfg.label_smoothing, "must be in [0, 1)")
    if cfg.amp not in AMP_MODES:
        bad("amp", cfg.amp, f"choose from {', '.join(AMP_MODES)}")
    if int(cfg.eval_every) < 0:
        bad("eval_every", cfg.eval_every, "must be >= 0 (0: evaluate after the last epoch only)")
    if int(cfg.num_workers) < 0:
        bad("num_workers", cfg.num_workers, "must be >= 0")
    if cfg.normalization not in NORMALIZATIONS:
        bad("normalization", cfg.normalization, f"choose from {', '.join(NORMALIZATIONS)}")
    if cfg.interpolation not in INTERPOLATIONS:
        bad("interpolation", cfg.interpolation, f"choose from {', '.join(INTERPOLATIONS)}")
    if cfg.image_size is not None and int(cfg.image_size) < 1:
        bad("image_size", cfg.image_size, "must be positive")
    if cfg.optimizer not in ("adamw", "sgd") and not _timm_optimizer_known(cfg.optimizer):
        bad("optimizer", cfg.optimizer, "choose adamw, sgd or an optimizer name of timm.optim.list_optimizers()")
    if not 0.0 <= cfg.momentum < 1.0:
        bad("momentum", cfg.momentum, "must be in [0, 1)")
    if cfg.layer_decay is not None and not 0.0 < cfg.layer_decay <= 1.0:
        bad("layer_decay", cfg.layer_decay, "must be in (0, 1] (e.g. 0.65), or None for no layer-wise decay")
    if cfg.lr_schedule != "cosine" and cfg.lr_schedule not in TIMM_SCHEDULES:
        bad("lr_schedule", cfg.lr_schedule, f"choose cosine or one of {', '.join(TIMM_SCHEDULES)}")
    if not cfg.decay_epochs > 0 or not cfg.decay_rate > 0:
        bad("decay_epochs/decay_rate", (cfg.decay_epochs, cfg.decay_rate), "both must be > 0")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        bad("ema_decay", cfg.ema_decay, "must be in (0, 1), e.g. 0.9998, or None for no EMA")
    if cfg.augment not in ("none", "timm"):
        bad("augment", cfg.augment, "choose none (the VTAB-1k protocol) or timm (full-size datasets)")
    if not 0.0 <= cfg.reprob <= 1.0:
        bad("reprob", cfg.reprob, "a probability is in [0, 1]")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        bad("mixup/cutmix", (cfg.mixup, cfg.cutmix), "alphas must be >= 0 (0: off)")
    unknown = [name for name in cfg.loggers if name not in ("tensorboard", "wandb")]
    if unknown:
        bad("loggers", list(cfg.loggers), "choose from tensorboard, wandb (log.jsonl and metrics.csv are always written)")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and (int(cfg.batch_size) % 2 or not cfg.drop_last):
        bad("batch_size", cfg.batch_size, "mixup/cutmix mix each batch with its reverse: use an even batch size and "
            "drop_last=True")
    if int(cfg.log_every) < 1:
        bad("log_every", cfg.log_every, "need at least 1")
    if not isinstance(cfg.param_groups, dict):
        bad("param_groups", cfg.param_groups, 'give a dict {regex: {"lr": .., "weight_decay": ..}}')
    for pattern, overrides in cfg.param_groups.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            bad("param_groups", pattern, f"not a regular expression ({exc})")
        if not isinstance(overrides, dict) or not overrides or set(overrides) - {"lr", "weight_decay"}:
            bad("param_groups", {pattern: overrides}, 'each pattern maps to {"lr": .., "weight_decay": ..}')
        if not all(isinstance(v, (int, float)) and v >= 0 for v in overrides.values()):
            bad("param_groups", {pattern: overrides}, "lr and weight_decay must be numbers >= 0")


# ----------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters.

    * ``no_decay_norm_bias``: no weight decay on 1-D parameters (norm weights, biases,
      LayerScale gammas) and on what the model lists in ``no_weight_decay()`` (timm: position
      embedding, CLS/register tokens), as timm's optimizer factory;
    * ``layer_decay``: the lr of a parameter of layer ``i`` (:func:`layer_id`) of a depth-``L`` ViT
      is scaled by ``layer_decay ** (L + 1 - i)`` (BEiT, MAE; timm's ``param_groups_layer_decay``);
    * ``param_groups``: ``{regex: {"lr": .., "weight_decay": ..}}``, matched with ``re.search``
      against parameter names, first match wins; a given ``weight_decay`` applies even to 1-D
      parameters, a given ``lr`` scales the whole schedule of the group by ``lr / cfg.lr`` (it
      replaces the layer-wise value).

    Every group carries ``lr_scale`` (its lr relative to ``cfg.lr``) and ``names``.
    """
    patterns = [(re.compile(p), o) for p, o in cfg.param_groups.items()]
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = len(getattr(model, "blocks", ()))
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = float(cfg.lr), float(cfg.weight_decay)
        if cfg.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias") or name in no_decay):
            wd = 0.0
        if cfg.layer_decay is not None:
            lr *= cfg.layer_decay ** (depth + 1 - layer_id(name, depth))
        for i, (pattern, overrides) in enumerate(patterns):
            if pattern.search(name):
                used.add(i)
                lr = float(overrides.get("lr", lr))
                wd = float(overrides.get("weight_decay", wd))
                break
        group = groups.setdefault((lr, wd), {"params": [], "names": [], "lr": lr, "weight_decay": wd,
                                             "lr_scale": lr / float(cfg.lr)})
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise TokenTuneError("the model has no trainable parameters; build it with a method that trains something "
                             "(e.g. method='lora') or keep train_head=True")
    unused = [p.pattern for i, (p, _) in enumerate(patterns) if i not in used]
    if unused:
        raise TokenTuneError(f"param_groups pattern {unused[0]!r} matches no trainable parameter; fix the regex "
                             f"(trainable names look like {next(iter(groups.values()))['names'][0]!r})")
    return list(groups.values())


def layer_id(name: str, depth: int) -> int:
    """Layer of a ViT parameter for layer-wise lr decay: 0 for the embeddings (patch embedding,
    position embedding, CLS/register tokens), ``i + 1`` for ``blocks.i``, ``depth + 1`` for the rest
    (final norm, pooling, head) — the assignment of BEiT/MAE and timm's ``param_groups_layer_decay``."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token", "norm_pre")):
        return 0
    return depth + 1


def _timm_optimizer_known(name: str) -> bool:
    from timm.optim import list_optimizers

    return name.lower() in list_optimizers()


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` over :func:`param_groups`: torch's AdamW (betas, epsilon) or
    SGD (momentum), or timm's ``create_optimizer_v2`` for its other optimizers."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.opt_eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    from timm.optim import create_optimizer_v2

    extra = {"betas": tuple(cfg.betas), "eps": cfg.opt_eps}
    try:
        return create_optimizer_v2(groups, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **extra)
    except TypeError:          # an optimizer without betas/eps
        return create_optimizer_v2(groups, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)


# ----------------------------------------------------------------------------- schedule
def _timm_cosine(cfg: TrainConfig, t: float) -> float:
    """timm's ``CosineLRScheduler`` (t_initial=epochs, warmup_t=warmup_epochs, no warmup prefix, one cycle)."""
    if t < cfg.warmup_epochs:
        return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / cfg.warmup_epochs
    if t >= cfg.epochs:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t / cfg.epochs))


def learning_rate(cfg: TrainConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The base learning rate for optimizer step ``step`` of ``epoch`` (both 0-based).

    * ``schedule_step="iter"`` (DyT/MAE): ``t = epoch + step / steps_per_epoch``; linear warm-up
      from ``warmup_lr`` to ``lr`` over ``warmup_epochs``, then a half-cosine from ``lr`` to
      ``min_lr`` over the remaining epochs, updated every optimizer step.
    * ``schedule_step="epoch"`` (PYRA reference): constant within an epoch. The reference steps
      timm's cosine scheduler with the index of the epoch that just finished, so epoch ``e``
      trains at the scheduler's value for ``max(e - 1, 0)``: epochs 0 and 1 at ``warmup_lr``,
      then linear warm-up, then ``min_lr + (lr - min_lr)(1 + cos(pi t / epochs)) / 2``.
    * ``lr_schedule="timm:<name>"``: timm's scheduler of that name (:func:`_timm_schedule_lr`).
    """
    cfg = cfg.resolved()
    if cfg.lr_schedule != "cosine":
        return _timm_schedule_lr(cfg, epoch, step, steps_per_epoch)
    if cfg.schedule_step == "epoch":
        return _timm_cosine(cfg, max(epoch - 1, 0))
    t = epoch + step / max(steps_per_epoch, 1)
    warm, total = float(cfg.warmup_epochs), float(cfg.epochs)
    if t < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * t / warm
    progress = min((t - warm) / (total - warm), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


TIMM_SCHEDULES = ("timm:cosine", "timm:step", "timm:poly", "timm:tanh")


@functools.lru_cache(maxsize=8)
def _timm_scheduler(sched: str, lr: float, epochs: int, warmup_epochs: float, warmup_lr: float, min_lr: float,
                    decay_epochs: float, decay_rate: float, on_epochs: bool, steps_per_epoch: int):
    """timm's scheduler on a stand-in optimizer: only its pure ``_get_lr(t)`` is used."""
    from timm.scheduler import create_scheduler_v2

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler, _ = create_scheduler_v2(
        dummy, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs, decay_rate=decay_rate, min_lr=min_lr,
        warmup_lr=warmup_lr, warmup_epochs=int(math.ceil(warmup_epochs)), warmup_prefix=False, cooldown_epochs=0,
        step_on_epochs=on_epochs, updates_per_epoch=steps_per_epoch)
    return scheduler


def _timm_schedule_lr(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The lr timm's scheduler gives at epoch ``epoch`` (``schedule_step="epoch"``, as timm's train
    script steps it: epoch ``e`` trains at the value for ``e``) or at optimizer update
    ``epoch * steps_per_epoch + step`` (``"iter"``); a pure function of the position, so a resumed
    run continues the same schedule. The warm-up is rounded up to whole epochs (timm counts it so)."""
    scheduler = _timm_scheduler(cfg.lr_schedule.split(":", 1)[1], float(cfg.lr), int(cfg.epochs),
                                float(cfg.warmup_epochs), float(cfg.warmup_lr), float(cfg.min_lr),
                                float(cfg.decay_epochs), float(cfg.decay_rate), cfg.schedule_step == "epoch",
                                max(steps_per_epoch, 1))
    t = epoch if cfg.schedule_step == "epoch" else epoch * max(steps_per_epoch, 1) + step
    return float(scheduler._get_lr(t)[0])


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
