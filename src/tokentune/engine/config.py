"""Training options: one dataclass, :class:`TrainConfig`.

:class:`TrainConfig` lists every option of :func:`tokentune.train`; the CLI exposes each field as
``--field-name``. Named recipes (a paper's model and training options, ``--recipe pyra-vtab``)
are registered by the methods (:class:`tokentune.core.method.Recipe`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..core.method import Recipe, available_recipes, get_recipe, register_recipe  # noqa: F401 - re-exported
from ..typecheck import check_fields


@dataclass
class TrainConfig:
    """Training options.

    Attributes:
        epochs: passes over the training split.
        batch_size: images per forward pass and process; one optimizer step sees
            batch_size x grad_accum x processes images (the learning rate is not rescaled).
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate (after warm-up).
        min_lr: learning rate at the end of the cosine schedule.
        warmup_epochs: linear warm-up length in epochs (may be fractional with schedule_step iter);
            None: a tenth of ``epochs`` (10 of the references' 100), so short runs need no option.
        warmup_lr: learning rate at the start of warm-up.
        schedule_step: ``"iter"``: warm-up then half-cosine to min_lr, updated every optimizer
            step (DyT/MAE); ``"epoch"``: timm's cosine scheduler stepped once per epoch exactly as
            the PYRA reference steps it (epoch e uses the value for e - 1).
        weight_decay: AdamW weight decay.
        no_decay_norm_bias: no weight decay on 1-D parameters (norms, biases, LayerScale) and on
            the position embedding and prefix tokens (timm's ``no_weight_decay()``).
        opt_eps: AdamW epsilon.
        betas: AdamW betas.
        param_groups: per-parameter-group overrides ``{regex: {"lr": .., "weight_decay": ..}}``,
            searched in parameter names (first match wins; a pattern matching nothing is an
            error). A group's lr scales its whole schedule by lr / (the peak lr); its
            weight_decay applies even to 1-D parameters. E.g. ``{"pyra": {"lr": 1e-4}}``.
        clip_grad: max gradient norm (None = no clipping).
        label_smoothing: cross-entropy label smoothing.
        amp: ``"auto"`` (bf16 autocast on GPUs that support it, else fp16; fp32 on CPU), ``"off"``,
            ``"bf16"``, ``"fp16"`` (fp16 uses a gradient scaler).
        grad_checkpointing: recompute blocks in backward to save memory.
        seed: random seed (data order, dropout, initialisation of new layers and of a random backbone).
        drop_last: drop the last incomplete training batch.
        eval_every: evaluate on the test split after the first epoch and then every N epochs
            (epochs 1, N+1, 2N+1, ..., as the references) and after the last; 0: only after the last.
        num_workers: data-loading worker processes.
        train_split: split used for training (VTAB-1k: ``train800val200``; image folders: the
            sub-folder, falling back to ``train``).
        test_split: split used for evaluation (VTAB-1k: ``test``; image folders fall back to ``val``).
        normalization: ``"auto"`` (the mean/std the pretrained weights expect: 0.5/0.5 for
            Google's ViTs), ``"imagenet"`` or ``"inception"`` (mean = std = 0.5).
        image_size: input resolution, images are resized to it without cropping (None = the
            model's; the CLI builds the model at this size).
        interpolation: resize filter: bicubic (the references), bilinear, nearest, lanczos, box
            or hamming.
        optimizer: ``"adamw"`` (the references), ``"sgd"`` (with ``momentum``; the VPT-protocol
            baselines), or any optimizer name timm's ``create_optimizer_v2`` knows (``lamb``,
            ``lion``, ``adan``, ``nadamw``, ...; they take ``opt_eps``, ``betas`` and ``momentum``
            where they have them).
        momentum: SGD momentum (and that of timm optimizers that have one).
        layer_decay: layer-wise learning-rate decay (BEiT/MAE): block ``i`` of ``L`` trains at
            ``lr * layer_decay ** (L - i)``, the embeddings at ``layer_decay ** (L + 1)``, the
            final norm and head at ``lr``; None: off.
        lr_schedule: ``"cosine"`` (warm-up + cosine, see ``schedule_step``) or one of timm's
            schedulers as ``"timm:cosine"``, ``"timm:step"`` (``decay_rate`` every
            ``decay_epochs``), ``"timm:poly"``, ``"timm:tanh"`` (with this config's warm-up, lr,
            min_lr and epochs; per step or per epoch by ``schedule_step``).
        decay_epochs: epochs between decays of ``timm:step``.
        decay_rate: factor of each decay of ``timm:step`` (and the power of ``timm:poly``).
        ema_decay: keep an exponential moving average of the trained weights,
            ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (e.g. 0.9998);
            evaluation and the saved ``model.safetensors`` use it, ``resume.pt`` keeps both. None: off.
        augment: ``"none"`` (resize only: the VTAB-1k protocol of the papers) or ``"timm"``: timm's
            training transform for full-size datasets (random-resized crop, horizontal flip,
            ``auto_augment``, random erasing ``reprob``), which :func:`tokentune.train` sets as the
            training split's ``transform``; the test split keeps the plain resize.
        auto_augment: timm's auto-augment policy with ``augment="timm"`` (``rand-m9-mstd0.5-inc1``:
            DeiT's RandAugment; ``none`` for no policy).
        reprob: random-erasing probability with ``augment="timm"``.
        mixup: mixup alpha (timm's ``Mixup``; 0: off); targets become soft, label smoothing
            moves into them.
        cutmix: cutmix alpha (0: off); with both, each batch uses one of them at random.
        loggers: where metrics go besides the run directory's ``log.jsonl`` and ``metrics.csv``
            (always written): ``tensorboard`` (``pip install 'tokentune[tensorboard]'``, logs in
            ``<run>/tensorboard``), ``wandb`` (``pip install 'tokentune[wandb]'``; ``WANDB_MODE``,
            ``WANDB_PROJECT`` as usual).
        log_every: write the training loss and lr every N optimizer steps.
    """

    epochs: int = 100
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: Optional[float] = None
    warmup_lr: float = 1e-6
    schedule_step: str = "iter"
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = True
    opt_eps: float = 1e-8
    betas: Tuple[float, float] = (0.9, 0.999)
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
    optimizer: str = "adamw"
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    lr_schedule: str = "cosine"
    decay_epochs: float = 30.0
    decay_rate: float = 0.1
    ema_decay: Optional[float] = None
    augment: str = "none"
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.0
    cutmix: float = 0.0
    loggers: Tuple[str, ...] = ()
    log_every: int = 10

    def __post_init__(self) -> None:
        check_fields(self)

    def resolved(self) -> "TrainConfig":
        """This config with defaults that depend on other fields filled in (``warmup_epochs``)."""
        if self.warmup_epochs is not None:
            return self
        return dataclasses.replace(self, warmup_epochs=0.1 * self.epochs)
