"""Training options (one dataclass) and named recipes (model + training options of a paper).

:class:`TrainConfig` lists every option of :func:`tokentune.train.train`; the CLI exposes each
field as ``--field-name``. A :class:`Recipe` bundles the model options and training options a
paper's reference implementation used, so ``tokentune train --recipe pyra-vtab`` reproduces it;
explicit options still override a recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import TokenTuneError


@dataclass
class TrainConfig:
    """Training options.

    Attributes:
        epochs: passes over the training split.
        batch_size: images per optimizer step per process (before accumulation).
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate (after warm-up).
        min_lr: learning rate at the end of the cosine schedule.
        warmup_epochs: linear warm-up length in epochs.
        warmup_lr: learning rate at the start of warm-up.
        schedule_step: ``"iter"`` (update every step) or ``"epoch"`` (once per epoch, as timm's
            scheduler in the PYRA reference).
        weight_decay: AdamW weight decay.
        no_decay_norm_bias: no weight decay on 1-D parameters (norms, biases, LayerScale).
        opt_eps: AdamW epsilon.
        betas: AdamW betas.
        param_groups: per-parameter-group overrides, ``{regex: {"lr": .., "weight_decay": ..}}``
            matched against parameter names (first match wins), e.g. ``{r"\\.pyra\\.": {"lr": 1e-4}}``.
        clip_grad: max gradient norm (None = no clipping).
        label_smoothing: cross-entropy label smoothing.
        amp: ``"auto"`` (bf16/fp16 autocast on GPU, fp32 on CPU), ``"off"``, ``"bf16"``, ``"fp16"``.
        grad_checkpointing: recompute blocks in backward to save memory.
        seed: random seed (data order, dropout, initialisation of new layers).
        drop_last: drop the last incomplete training batch.
        eval_every: evaluate on the test split every N epochs (and after the last epoch).
        num_workers: data-loading worker processes.
        train_split: split file used for training (VTAB-1k: ``train800val200``).
        test_split: split file used for evaluation (VTAB-1k: ``test``).
        normalization: ``"auto"`` (what the pretrained weights expect), ``"imagenet"`` or
            ``"inception"`` (mean = std = 0.5).
        image_size: input resolution (None = the model's).
        interpolation: resize interpolation.
    """

    epochs: int = 100
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10
    warmup_lr: float = 1e-6
    schedule_step: str = "iter"
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = True
    opt_eps: float = 1e-8
    betas: tuple = (0.9, 0.999)
    param_groups: Dict[str, Dict[str, float]] = field(default_factory=dict)
    clip_grad: Optional[float] = None
    label_smoothing: float = 0.0
    amp: str = "auto"
    grad_checkpointing: bool = False
    seed: int = 0
    drop_last: bool = True
    eval_every: int = 10
    num_workers: int = 2
    train_split: str = "train800val200"
    test_split: str = "test"
    normalization: str = "auto"
    image_size: Optional[int] = None
    interpolation: str = "bicubic"


@dataclass
class Recipe:
    """A named bundle of model options (``create_model`` keywords) and :class:`TrainConfig` fields."""

    name: str
    method: str
    model_options: Dict[str, Any] = field(default_factory=dict)
    train_options: Dict[str, Any] = field(default_factory=dict)
    summary: str = ""


_RECIPES: Dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    from .methods import available_methods

    available_methods()   # importing the method modules registers their recipes
    if name not in _RECIPES:
        raise TokenTuneError(f"unknown recipe {name!r}; choose from {', '.join(sorted(_RECIPES)) or 'none'}")
    return _RECIPES[name]


def available_recipes() -> Dict[str, Recipe]:
    from .methods import available_methods

    available_methods()
    return dict(_RECIPES)
