"""Training: AdamW with parameter groups, warm-up + cosine schedule, AMP, gradient accumulation,
checkpoints after every epoch, exact resume, and data parallelism under ``torchrun``.

::

    from tokentune import create_model
    from tokentune.config import TrainConfig
    from tokentune.data import build_datasets, vtab_task
    from tokentune.train import train

    model = create_model("vit_base_patch16_224.orig_in21k", method="lora", pretrained="ViT-B_16.npz",
                         num_classes=vtab_task("cifar").num_classes)
    cfg = TrainConfig(epochs=100, batch_size=64, lr=1e-3)
    train_ds, test_ds = build_datasets(model, cfg, data_root="vtab-1k", dataset="cifar")
    result = train(model, train_ds, test_ds, cfg, out_dir="runs/cifar-lora")
    print(result.top1)               # top-1 after the last epoch

What a run directory holds is described in :mod:`tokentune.rundir` (only the main process
writes). After every epoch (and when stopped) the loop writes a checkpoint as a whole:
``model.safetensors`` + ``config.json`` (the trained parameters and how to rebuild the model,
:func:`tokentune.load_trained`), ``metrics.json``, ``results.json`` once finished, and last the
marker ``resume.pt`` (optimizer, AMP scaler, epoch, step, RNG states per process, sampler
position, metrics). ``train(..., resume=True)`` continues from the marker and ends with the same
weights as an uninterrupted run, wherever the previous run was killed.

``train()`` reads as its steps: open the run directory, set up (optimizer, loader), start or
resume (:class:`Progress`), then per epoch :func:`_train_epoch` (optimizer steps),
:func:`_finish_epoch` (evaluation) and :func:`_save`.

The training loss is ``criterion(model(images), targets)``, or the ``loss`` hook of a method
(DyT's rate and distillation losses), called as ``loss(model, images, targets, criterion)``.

A model built for a task (:mod:`tokentune.core.task`: segmentation, video) brings its own loss
module (``Task.criterion``), evaluation and headline metric (``Task.evaluate``, ``Task.metric``,
e.g. mIoU); batches are ``(inputs, targets)`` pairs either way. Image classification is the
default: cross-entropy, top-1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.factory import methods_of
from ..core.task import task_of
from ..core.vit import spec_of
from ..core.weights import load_state_into
from ..errors import TokenTuneError, error_line
from ..precision import amp_dtype, autocast
from ..utils import jsonable
from . import distributed as D
from .augment import augment_training_split, batch_mixer
from .checkpoint import trained_state_dict
from .config import TrainConfig
from .distributed import progress_enabled
from .ema import TrainedEMA
from .evaluate import evaluate, read_results, run_results
from .loggers import LoggingCallback, training_loggers
from .optim import build_optimizer, learning_rate, param_groups, set_learning_rate, validate_config  # noqa: F401
from .resume import (
    Progress,
    adopt_saved_defaults,
    check_resume_compatible,
    fresh_partial,
    rng_state,
    seed_all,
    set_rng_state,
    spec_key,
    spec_key_of,
)
from .rundir import RESUME_FORMAT, RESUME_NAME, WEIGHTS_NAME, RunDir
from .seeding import SeededSampler, SeededSamples
from .sources import StreamDataset, as_training_data, stream_loader


class StopTraining(Exception):
    """Raise from a callback to stop after the current optimizer step; the state is saved for resume."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        top1: test top-1 (%) after the last epoch (None if no evaluation ran or the task reports
            another metric).
        best_top1_over_epochs: the best test top-1 of the evaluations during training.
        best_epoch: the epoch (1-based) of the best value of :attr:`metric`.
        history: one dict per finished epoch (epoch, train_loss, lr, top1, time_s, hook logs).
        epochs_done: finished epochs.
        global_step: optimizer steps done.
        finished: all epochs done (False when stopped by ``max_steps``, a callback or a signal).
        train_time_s: training time without evaluation, over all resumed segments.
        results: the ``results.json`` record (finished runs).
        stop_reason: why an unfinished run stopped: ``max_steps``, ``callback`` or ``signal``.
        metric: the metric the run reports (``top1``; a task's, e.g. ``miou``).
        score: that metric after the last epoch (= ``top1`` for classification).
        best_score_over_epochs: its best value over the evaluations (optimistic, as labelled).
    """

    top1: Optional[float] = None
    best_top1_over_epochs: Optional[float] = None
    best_epoch: Optional[int] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    epochs_done: int = 0
    global_step: int = 0
    finished: bool = False
    train_time_s: float = 0.0
    results: Optional[Dict[str, Any]] = None
    stop_reason: Optional[str] = None
    metric: str = "top1"
    score: Optional[float] = None
    best_score_over_epochs: Optional[float] = None


# ----------------------------------------------------------------------------- loss
def loss_function(model: nn.Module) -> Callable:
    """``f(images, targets, criterion) -> (loss, logs)``: a method's loss hook or plain cross-entropy."""
    try:
        hooks = [m for m in methods_of(model) if m.loss is not None]
    except TokenTuneError:   # a model not built by create_model
        hooks = []
    if len(hooks) > 1:
        raise TokenTuneError(f"methods {', '.join(m.name for m in hooks)} each define a training loss; "
                             "combine at most one of them")
    if hooks:
        hook = hooks[0].loss
        return lambda images, targets, criterion: hook(model, images, targets, criterion)
    return lambda images, targets, criterion: (criterion(model(images), targets), {})


def criterion_of(model: nn.Module, cfg: TrainConfig, label_smoothing: Optional[float] = None) -> nn.Module:
    """The loss module: the task's (``Task.criterion``) or cross-entropy with ``label_smoothing``
    (default: the config's)."""
    task = task_of(model)
    if task is not None and task.criterion is not None:
        return task.criterion(cfg)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing if label_smoothing is None else label_smoothing)


def evaluator_of(model: nn.Module) -> Tuple[Callable[..., Dict[str, Any]], str]:
    """``(evaluate function, the metric it reports)``: the task's, or top-1 classification."""
    task = task_of(model)
    if task is not None and task.evaluate is not None:
        return task.evaluate, task.metric
    return evaluate, "top1"


def step_hooks(model: nn.Module) -> List[Callable[[nn.Module, float], None]]:
    """The methods' per-step hooks (``Method.on_step``), e.g. DyT's temperature schedule."""
    try:
        return [m.on_step for m in methods_of(model) if m.on_step is not None]
    except TokenTuneError:
        return []


# ----------------------------------------------------------------------------- signals
class _EvaluationStopped(Exception):
    """A stop request during an epoch's evaluation (single process): the evaluation is abandoned."""


class _StopFlag:
    """SIGTERM/SIGINT -> stop after the current step (a second SIGINT interrupts at once)."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self.interrupt = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.previous = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.interrupt:
            raise _EvaluationStopped

    @contextlib.contextmanager
    def interrupting(self, enabled: bool = True):
        """Inside, a stop request interrupts at once (an evaluation, which changes no training state)."""
        self.interrupt = bool(enabled and self.enabled)
        try:
            if self.interrupt and self.requested:
                raise _EvaluationStopped
            yield
        finally:
            self.interrupt = False

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class _Session:
    """The objects one call of :func:`train` works with."""

    model: nn.Module
    cfg: TrainConfig
    dev: torch.device
    inf: Any
    optimizer: torch.optim.Optimizer
    scaler: Any
    criterion: nn.Module
    compute_loss: Callable
    on_step: List[Callable[[nn.Module, float], None]]
    sampler: Any
    loader: Any
    batches: int
    steps_per_epoch: int
    run: Optional[RunDir]
    records: Dict[str, Any]
    say: Callable[[str], None]
    mixer: Any = None                       # timm's Mixup (cfg.mixup/cutmix), see engine.augment
    ema: Optional[TrainedEMA] = None        # the moving average of the trained weights (cfg.ema_decay)

    def trained_tensors(self) -> Dict[str, torch.Tensor]:
        """What ``model.safetensors`` holds: the trained tensors, averaged when EMA is on."""
        if self.ema is None:
            return trained_state_dict(self.model)
        return {n: t.contiguous() for n, t in self.ema.state_dict().items()}

    @property
    def trainable(self) -> List[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def total_steps(self) -> int:
        return max(self.cfg.epochs * self.steps_per_epoch, 1)


# ----------------------------------------------------------------------------- setup
def _open_run_dir(out_dir: Optional[str], resume, model: nn.Module, is_main: bool) -> Optional[RunDir]:
    """The run directory, checked before any work: writable, not holding another run unless resuming."""
    if out_dir is None:
        return None
    if spec_of(model) is None:
        raise TokenTuneError("saving a run needs a model built by tokentune.create_model; pass out_dir=None "
                             "to train another model without checkpoints")
    run = RunDir(out_dir)
    existing = run.run_files()
    if existing and not resume:
        raise TokenTuneError(f"{run.path} already holds a run ({existing[0]}); continue it with resume=True "
                             "(--resume) or choose another output directory")
    if is_main:
        run.prepare()
    return run


def _setup(model: nn.Module, train_data, cfg: TrainConfig, dev: torch.device, inf, run: Optional[RunDir],
           records: Dict[str, Any], say) -> _Session:
    """Model on the device, optimizer, AMP scaler, loss, sampler and loader."""
    model.to(dev)
    if cfg.grad_checkpointing and not hasattr(model, "set_grad_checkpointing"):
        raise TokenTuneError(f"{type(model).__name__} does not support gradient checkpointing; set grad_checkpointing=False")
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(bool(cfg.grad_checkpointing))
    dtype = amp_dtype(cfg.amp, dev)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    sampler, loader, per_process = training_loader(train_data, cfg, inf.rank, inf.world_size, dev.type == "cuda")
    batches = per_process // cfg.batch_size if cfg.drop_last else -(-per_process // cfg.batch_size)
    if batches == 0:
        raise TokenTuneError(f"the training split has {per_process} images per process, fewer than one batch of "
                             f"{cfg.batch_size} (drop_last); lower --batch-size or set --drop-last false")
    augment_training_split(train_data, model, cfg, say)
    mixer = batch_mixer(cfg, getattr(model, "num_classes", 0))
    return _Session(model=model, cfg=cfg, dev=dev, inf=inf, optimizer=optimizer, scaler=scaler, mixer=mixer,
                    # with mixup the smoothing is in the soft targets
                    criterion=criterion_of(model, cfg, label_smoothing=0.0 if mixer else cfg.label_smoothing),
                    compute_loss=loss_function(model), on_step=step_hooks(model), sampler=sampler, loader=loader,
                    batches=batches, steps_per_epoch=-(-batches // cfg.grad_accum), run=run, records=records, say=say)


def training_loader(train_data, cfg: TrainConfig, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """``(sampler, loader, samples per process)`` of the training split; ``sampler.set_epoch(epoch, start)``
    chooses the epoch and where in it to start. Every sample is transformed with the global generators
    seeded from ``(cfg.seed, epoch, sample index)`` (:mod:`tokentune.engine.seeding`), so the
    augmentation is the same whatever ``cfg.num_workers`` and after a resume."""
    generator = torch.Generator().manual_seed(cfg.seed)      # own generator: the global RNG is not consumed
    if isinstance(train_data, StreamDataset):                # an iterable source (engine.sources): epochs of it
        sampler, loader = stream_loader(train_data, cfg.batch_size, cfg.num_workers, cfg.drop_last, pin_memory,
                                        rank, world_size, generator, seed=cfg.seed)
        return sampler, loader, train_data.per_process()
    sampler = SeededSampler(D.EpochSampler(len(train_data), seed=cfg.seed, shuffle=True, rank=rank,
                                           world_size=world_size), cfg.seed)
    loader = torch.utils.data.DataLoader(
        SeededSamples(train_data), batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        drop_last=cfg.drop_last, pin_memory=pin_memory, persistent_workers=cfg.num_workers > 0, generator=generator)
    return sampler, loader, len(sampler)


def _resume_state(s: _Session, p: Progress, finished: bool) -> Dict[str, Any]:
    """What ``resume.pt`` holds (collective: every process contributes its RNG state)."""
    cfg = s.cfg
    return {
        "format": RESUME_FORMAT, "epoch": p.epoch, "batches_done": p.batches_done, "global_step": p.global_step,
        "steps_per_epoch": s.steps_per_epoch,
        "sampler": {"seed": cfg.seed, "epoch": p.epoch, "start": p.batches_done * cfg.batch_size},
        "train_time_s": p.train_time_s, "history": p.history, "partial": p.partial, "finished": finished,
        "train_config": jsonable(dataclasses.asdict(cfg)), "model_spec": spec_key(s.model),
        "world_size": s.inf.world_size, "rng": D.all_gather_object(rng_state(s.dev)),
        # kept in a finished run too, so that it can be extended with more epochs
        "optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict(),
        "trainable": trained_state_dict(s.model),
        **({"ema": s.ema.state_dict()} if s.ema is not None else {}),
    }


def _save(s: _Session, p: Progress, finished: bool = False, results: Optional[Dict[str, Any]] = None) -> None:
    """Write the checkpoint of ``p`` as a whole (data files first, the resume marker last)."""
    state = _resume_state(s, p, finished)            # every process takes part
    if s.run is not None and s.inf.is_main:
        config = dict(spec_of(s.model), **s.records, epochs_done=len(p.history))
        s.run.write_checkpoint(tensors=s.trained_tensors(), config=config, history=p.history,
                               resume_state=state, results=results)
    D.barrier()


def _start(s: _Session, resume, state: Optional[Dict[str, Any]]) -> Tuple[Progress, bool]:
    """A fresh :class:`Progress`, or the one ``state`` (``resume.pt``) or, with ``resume="weights"``,
    the saved weights continue; also whether that run has already finished all its epochs."""
    run, cfg, inf = s.run, s.cfg, s.inf
    if run is None or not resume:
        seed_all(cfg.seed + inf.rank)
        D.broadcast_module(s.model)
        return Progress(), False
    if resume == "weights":
        return _restart_from_weights(s), False
    if state is None:
        if os.path.exists(run.weights):
            raise TokenTuneError(f"{run.path} holds trained weights but no {RESUME_NAME} to resume exactly from; "
                                 "continue from those weights with --restart-from-weights (resume='weights'), "
                                 "or choose a new output directory")
        s.say(f"no resume state in {run.path}: starting a new run")
        seed_all(cfg.seed + inf.rank)
        D.broadcast_module(s.model)
        return Progress(), False
    history = list(state["history"])
    check_resume_compatible(state["train_config"], state.get("model_spec"), cfg, s.model, run.resume,
                             len(history), state["batches_done"] > 0)
    p = Progress(epoch=state["epoch"], batches_done=state["batches_done"], global_step=state["global_step"],
                 train_time_s=float(state["train_time_s"]), history=history, partial=state["partial"])
    if "trainable" in state and not _weights_readable(run.weights):
        _restore_weights(s, state, history)
    if state.get("finished") and cfg.epochs <= len(history):
        s.say(f"{run.path} has finished all {len(history)} epochs; nothing to resume")
        return p, True
    if "optimizer" not in state:
        raise TokenTuneError(f"{run.resume} holds no optimizer state (a finished run saved by an older version); "
                             "extend it with --restart-from-weights")
    load_state_into(s.model, state["trainable"], source=run.resume)
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    if state["world_size"] == inf.world_size:
        set_rng_state(state["rng"][inf.rank], s.dev)
    else:
        if p.batches_done:
            raise TokenTuneError(f"{run.resume} was saved inside an epoch by {state['world_size']} process(es); "
                                 f"resume it with the same number of processes (now {inf.world_size})")
        s.say(f"resuming with {inf.world_size} process(es) instead of {state['world_size']}: "
              "the continuation is valid but not bit-identical to an uninterrupted run")
        seed_all(cfg.seed + inf.rank + 1000 * p.epoch)
    if cfg.epochs != state["train_config"]["epochs"]:
        s.say(f"changing the run's length from {state['train_config']['epochs']} to {cfg.epochs} epochs: the learning "
              "rate schedule continues as if the run had been started with the new length")
    s.say(f"resuming {run.path} at epoch {p.epoch + 1}/{cfg.epochs}"
          + (f", step {p.batches_done // cfg.grad_accum}/{s.steps_per_epoch}" if p.batches_done else ""))
    return p, False


def _weights_readable(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            for name in fh.keys():
                fh.get_tensor(name)
        return True
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: all mean "rewrite it"
        return False


def _restore_weights(s: _Session, state: Dict[str, Any], history: List[Dict[str, Any]]) -> None:
    """Rewrite a missing or damaged ``model.safetensors`` from the trained tensors in ``resume.pt``."""
    load_state_into(s.model, state["trainable"], source=s.run.resume)
    if s.inf.is_main:
        config = dict(spec_of(s.model), **s.records, epochs_done=len(history))
        s.run.write_model(state.get("ema") or trained_state_dict(s.model), config)
    s.say(f"{WEIGHTS_NAME} was missing or damaged: rewritten from {RESUME_NAME} (the weights after epoch {len(history)})")


def _restart_from_weights(s: _Session) -> Progress:
    """Continue a run from its ``model.safetensors`` (the last finished epoch) when ``resume.pt`` is
    lost or corrupt: weights and history come back, optimizer and random state start afresh."""
    from safetensors.torch import load_file

    run, cfg, inf = s.run, s.cfg, s.inf
    if not os.path.isfile(run.weights):
        raise TokenTuneError(f"{run.path} holds no {WEIGHTS_NAME} to restart from; start a new run (without resume)")
    config = run.read_config()
    saved_cfg = config.get("train_config") or {}
    epochs_done = int(config.get("epochs_done") or 0)
    check_resume_compatible(saved_cfg, spec_key_of(config), cfg, s.model, run.weights, epochs_done, False)
    try:
        tensors = load_file(run.weights)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise TokenTuneError(f"cannot read {run.weights} ({' '.join(str(exc).split())[:160]}); it is corrupt: start a "
                             "new run") from None
    load_state_into(s.model, tensors, source=run.weights)
    history = run.read_metrics()[:epochs_done]
    seed_all(cfg.seed + inf.rank + 1000 * epochs_done)
    D.broadcast_module(s.model)
    s.say(f"restarting {run.path} from the weights after epoch {epochs_done}: optimizer and random state start "
          "afresh, so the result is not bit-identical to an uninterrupted run")
    return Progress(epoch=epochs_done, global_step=epochs_done * s.steps_per_epoch,
                    train_time_s=sum(float(h.get("time_s") or 0.0) for h in history), history=history)


# ----------------------------------------------------------------------------- one epoch
def _train_epoch(s: _Session, p: Progress, stop_flag: "_StopFlag", callbacks, max_steps: Optional[int],
                 progress: Optional[bool]) -> Optional[str]:
    """Train ``p.epoch`` from ``p.batches_done`` to its end or to a stop request; returns the request
    (``signal``, ``callback``, ``max_steps``; it may come with the epoch's last step) or None."""
    from tqdm.auto import tqdm

    cfg, epoch = s.cfg, p.epoch
    s.sampler.set_epoch(epoch, start=p.batches_done * cfg.batch_size)
    s.model.train()
    tic = time.perf_counter()
    bar = tqdm(total=s.batches, initial=p.batches_done, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not progress_enabled(progress), dynamic_ncols=True)
    batch_iter = iter(s.loader)
    stop = None
    try:
        while p.batches_done < s.batches:
            stop = _optimizer_step(s, p, batch_iter, bar, callbacks, stop_flag, max_steps)
            if stop and p.batches_done < s.batches:
                break
    finally:
        bar.close()
        p.partial["time"] += time.perf_counter() - tic
    return stop


def _optimizer_step(s: _Session, p: Progress, batch_iter, bar, callbacks, stop_flag, max_steps) -> Optional[str]:
    """One optimizer step over ``grad_accum`` micro-batches; returns a stop request or None."""
    cfg, epoch = s.cfg, p.epoch
    group = min(cfg.grad_accum, s.batches - p.batches_done)
    step = p.batches_done // cfg.grad_accum
    lr = learning_rate(cfg, epoch, step, s.steps_per_epoch)
    set_learning_rate(s.optimizer, lr)
    for hook in s.on_step:
        hook(s.model, p.global_step / s.total_steps)
    dtype = amp_dtype(cfg.amp, s.dev)
    stats = torch.zeros(4, dtype=torch.float64)   # loss sum, images, non-finite, stop
    bad_value = value = cause = None
    for _ in range(group):
        try:
            images, targets = next(batch_iter)
        except TokenTuneError as exc:
            raise TokenTuneError(error_line(exc)) from None
        images = images.to(s.dev, non_blocking=True)
        targets = torch.as_tensor(targets).to(s.dev, non_blocking=True)
        if s.mixer is not None:
            images, targets = s.mixer(images, targets)
        with autocast(s.dev, dtype):
            loss, logs = s.compute_loss(images, targets, s.criterion)
        value = float(loss.detach().float())
        if not math.isfinite(value):
            stats[2], bad_value = 1, value
            cause = _data_cause(images, targets, s.criterion, p.global_step)
            break
        s.scaler.scale(loss / group).backward()
        stats[0] += value * targets.shape[0]
        stats[1] += targets.shape[0]
        for k, v in logs.items():
            p.partial["logs"][k] = p.partial["logs"].get(k, 0.0) + float(v) * targets.shape[0]
        bar.update(1)
    try:
        for cb in callbacks:
            cb("step", {"epoch": epoch, "step": step, "global_step": p.global_step + 1, "model": s.model,
                        "loss": value, "lr": lr})
    except StopTraining:
        stats[3] = max(float(stats[3]), 1)
    if stop_flag.requested:
        stats[3] = 2
    if s.inf.enabled:
        stats = D.all_reduce_sum(stats.to(s.dev)).cpu()
    if stats[2] > 0:
        s.optimizer.zero_grad(set_to_none=True)
        _diverged(s, p, step, lr, bad_value, cause)
    D.average_gradients(s.trainable)
    if cfg.clip_grad is not None:
        s.scaler.unscale_(s.optimizer)
        nn.utils.clip_grad_norm_(s.trainable, cfg.clip_grad)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if s.ema is not None:
        s.ema.update(s.model)
    s.optimizer.zero_grad(set_to_none=True)
    p.global_step += 1
    p.batches_done += group
    p.partial["loss_sum"] += float(stats[0])
    p.partial["images"] += int(stats[1])
    if bar.n % 10 == 0 or p.batches_done == s.batches:
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
    if stats[3] > 0:
        return "signal" if stats[3] >= 2 else "callback"
    if max_steps is not None and p.global_step >= max_steps:
        return "max_steps"
    return None


def _data_cause(images: torch.Tensor, targets: torch.Tensor, criterion, global_step: int) -> Optional[str]:
    """Why a loss is non-finite when the learning rate cannot be the cause, or None."""
    if images.is_floating_point() and not torch.isfinite(images).all():
        return "the batch's images hold NaN or inf values: check the data"
    ignore = getattr(criterion, "ignore_index", None)
    if ignore is not None and not targets.is_floating_point() and bool((targets == ignore).all()):
        return f"every target of the batch is the ignore index {ignore} (nothing to learn from): check the data"
    if global_step == 0:
        return ("it happened before the first update, so the learning rate is not the cause: check the data and the "
                "pretrained weights")
    return None


def _diverged(s: _Session, p: Progress, step: int, lr: float, bad_value: Optional[float],
              cause: Optional[str] = None) -> None:
    kept = (f"the checkpoint after epoch {len(p.history)} is kept in {s.run.path}" if s.run and p.history
            else "no checkpoint was written yet")
    if cause is not None:
        raise TokenTuneError(f"the loss is {bad_value} at epoch {p.epoch + 1}, step {step + 1}/{s.steps_per_epoch} "
                             f"(global step {p.global_step + 1}): {cause} ({kept})")
    raise TokenTuneError(
        f"training diverged: the loss became "
        f"{bad_value if bad_value is not None else 'non-finite on another process'} at epoch {p.epoch + 1}, "
        f"step {step + 1}/{s.steps_per_epoch} (global step {p.global_step + 1}) with lr "
        f"{learning_rate(s.cfg, p.epoch, step, s.steps_per_epoch):.3g}; lower --lr (e.g. {s.cfg.lr / 10:g}) or set "
        f"--clip-grad 1.0 ({kept})")


def _finish_epoch(s: _Session, p: Progress, test_data, eval_bs: int, progress: Optional[bool],
                  stop_flag: Optional[_StopFlag] = None) -> Dict[str, Any]:
    """Close the epoch: its record (with the test evaluation when due), appended to the history.

    A stop request during the evaluation (one process; ranks evaluate together) raises
    :class:`_EvaluationStopped` and leaves ``p`` at the end of the epoch's training."""
    cfg, epoch, part = s.cfg, p.epoch, p.partial
    p.train_time_s += part["time"]
    lr = learning_rate(cfg, epoch, (s.batches - 1) // cfg.grad_accum, s.steps_per_epoch)
    evaluate_fn, metric = evaluator_of(s.model)
    record = {"epoch": epoch + 1, "train_loss": part["loss_sum"] / max(part["images"], 1),
              "lr": lr, "time_s": round(part["time"], 3), metric: None}
    record.update({k: v / max(part["images"], 1) for k, v in part["logs"].items()})
    due = cfg.eval_every > 0 and epoch % cfg.eval_every == 0
    if test_data is not None and (due or epoch == cfg.epochs - 1):
        interrupting = stop_flag.interrupting(s.inf.world_size == 1) if stop_flag else contextlib.nullcontext()
        with interrupting, s.ema.applied(s.model) if s.ema is not None else contextlib.nullcontext():
            metrics = evaluate_fn(s.model, test_data, batch_size=eval_bs, device=s.dev, amp=cfg.amp,
                                  num_workers=cfg.num_workers, progress=progress, desc="test")
        record[metric] = metrics[metric]
        record["test_loss"] = metrics["loss"]
    p.history.append(record)
    p.epoch, p.batches_done, p.partial = epoch + 1, 0, fresh_partial()
    return record


# ----------------------------------------------------------------------------- train
def train(model: nn.Module, train_data, test_data=None, cfg: Optional[TrainConfig] = None,
          out_dir: Optional[str] = None, *, resume: Union[bool, str] = False, device: Optional[str] = None,
          max_steps: Optional[int] = None, callbacks: Sequence[Callable[[str, Dict[str, Any]], None]] = (),
          progress: Optional[bool] = None, eval_batch_size: Optional[int] = None,
          run_info: Optional[Dict[str, Any]] = None, handle_signals: bool = False,
          log: Optional[Callable[[str], None]] = print) -> TrainResult:
    """Train ``model`` on ``train_data`` and evaluate on ``test_data``.

    Args:
        model: built by :func:`tokentune.create_model` (only its trainable parameters train).
        train_data: a dataset of ``(image tensor, label)`` (e.g. :func:`tokentune.data.vtab_dataset`
            with transforms set; any source through :mod:`tokentune.engine.sources`: torchvision and
            Hugging Face datasets as :class:`~tokentune.engine.sources.ImageSource`, iterables and
            webdataset shards as :class:`~tokentune.engine.sources.StreamDataset`, whose epochs and
            resume are described there).
        test_data: evaluated after the 1st epoch, every ``cfg.eval_every`` epochs after it, and
            after the last (the references' convention); None: no evaluation.
        cfg: :class:`tokentune.config.TrainConfig`.
        out_dir: run directory for checkpoints and results (None: nothing is written).
        resume: ``True``: continue the run in ``out_dir`` exactly from its ``resume.pt`` (a fresh
            start if the directory holds no run; ``cfg.epochs`` may be raised to extend a run);
            ``"weights"``: continue from its ``model.safetensors`` and history when ``resume.pt`` is
            lost or corrupt (optimizer and random state start afresh). Without it an ``out_dir``
            holding a run is an error, so nothing is overwritten.
        device: ``auto`` (GPU if available), ``cpu``, ``cuda``, ``cuda:N``.
        max_steps: stop after this many optimizer steps in total (the state is saved; resume later).
        callbacks: ``callback(event, info)`` with event ``"step"`` or ``"epoch"``; raising
            :class:`StopTraining` stops after the step with the state saved.
        progress: tqdm bars (None: only when stderr is a terminal; never on non-main processes).
        eval_batch_size: evaluation batch size (default: twice the training batch size).
        run_info: extra JSON-able information stored in ``config.json`` and ``results.json``.
        handle_signals: on SIGTERM/SIGINT finish the current step, save the state and stop.
        log: where progress lines go on the main process (None: silent).

    Returns:
        :class:`TrainResult`.
    """
    given = cfg or TrainConfig()
    cfg = given.resolved()
    validate_config(cfg)
    if resume not in (False, True, "weights"):
        raise TokenTuneError(f"resume must be True, False or 'weights', got {resume!r}")
    inf = D.init_distributed(device)
    dev = D.resolve_device(device)
    say = (log if (log is not None and inf.is_main) else (lambda *_: None))
    run = _open_run_dir(out_dir, resume, model, inf.is_main)
    train_data = as_training_data(train_data)
    if isinstance(train_data, StreamDataset):
        train_data.per_process()                   # a stream needs an epoch size
    if len(train_data) == 0:
        raise TokenTuneError("the training split is empty")
    state = run.read_resume() if run is not None and resume is True else None
    if state is not None:
        cfg = adopt_saved_defaults(cfg, state["train_config"], given)
    records = {"train_config": jsonable(dataclasses.asdict(cfg)), "data": run_info_data(train_data, test_data)}
    if run_info:
        records["run"] = jsonable(run_info)
    logging = LoggingCallback(training_loggers(run, cfg.loggers, records) if inf.is_main else [], cfg.log_every)
    try:
        s = _setup(model, train_data, cfg, dev, inf, run, records, say)
        p, finished = _start(s, resume, state)
        s.ema = _moving_average(s, state if resume is True else None)
        del state
        metric = evaluator_of(model)[1]
        if finished:
            return _result(p.history, p.global_step, True, p.train_time_s,
                           read_results(run.path) if os.path.isfile(run.results) else None, metric=metric)
        eval_bs = eval_batch_size or 2 * cfg.batch_size
        return _epochs(s, p, model, test_data, eval_bs, [logging, *callbacks], max_steps, progress, handle_signals,
                       run_info, metric)
    finally:
        logging.close(raising=sys.exc_info()[0] is None)     # an error already on its way is the one to report


def _moving_average(s: _Session, state: Optional[Dict[str, Any]]) -> Optional[TrainedEMA]:
    """The EMA of the trained weights (``cfg.ema_decay``): from the current weights, or as ``resume.pt`` kept it."""
    if s.cfg.ema_decay is None:
        return None
    ema = TrainedEMA(s.model, s.cfg.ema_decay)
    if state is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    return ema


def _epochs(s: _Session, p: Progress, model: nn.Module, test_data, eval_bs: int, callbacks, max_steps, progress,
            handle_signals: bool, run_info, metric: str = "top1") -> TrainResult:
    """The epochs from ``p`` to the end (or a stop request), then the final checkpoint."""
    cfg, say, records = s.cfg, s.say, s.records
    with _StopFlag(handle_signals) as stop_flag:
        while p.epoch < cfg.epochs:
            stop = _train_epoch(s, p, stop_flag, callbacks, max_steps, progress)
            if p.batches_done < s.batches:    # stopped inside the epoch
                p.train_time_s += p.partial["time"]
                p.partial["time"] = 0.0
                _save(s, p)
                say(f"stopped at epoch {p.epoch + 1}, step {p.batches_done // cfg.grad_accum}/{s.steps_per_epoch} "
                    f"(global step {p.global_step}); continue with resume=True (--resume)")
                return _result(p.history, p.global_step, False, p.train_time_s, None, stop, metric)
            try:
                record = _finish_epoch(s, p, test_data, eval_bs, progress, stop_flag)
            except _EvaluationStopped:
                p.train_time_s += p.partial["time"]
                p.partial["time"] = 0.0
                _save(s, p)
                say(f"stopped during the evaluation after epoch {p.epoch + 1}'s training (saved); continue with "
                    "resume=True (--resume), which evaluates it first")
                return _result(p.history, p.global_step, False, p.train_time_s, None, "signal", metric)
            say(_epoch_line(record, cfg.epochs, metric))
            if p.epoch < cfg.epochs:
                _save(s, p)
            try:
                for cb in callbacks:
                    cb("epoch", {"epoch": p.epoch - 1, "global_step": p.global_step, "model": model, "record": record})
            except StopTraining:
                stop = "callback"
            if stop and p.epoch < cfg.epochs:
                say(f"stopped after epoch {p.epoch}; continue with resume=True (--resume)")
                return _result(p.history, p.global_step, False, p.train_time_s, None, stop, metric)

    results = run_results(model=model, history=p.history, dataset=records["data"], train_time_s=p.train_time_s,
                          epochs=cfg.epochs, finished=True, extra={"run": records["run"]} if run_info else None,
                          metric=metric)
    _save(s, p, finished=True, results=results)
    return _result(p.history, p.global_step, True, p.train_time_s, results, metric=metric)


def run_info_data(train_data, test_data) -> Dict[str, Any]:
    """Dataset description for run records (name, group, splits, sizes)."""
    def describe(ds):
        if ds is None:
            return None
        if hasattr(ds, "describe"):
            return ds.describe()
        return {"name": getattr(ds, "name", None), "num_images": len(ds)}

    train_d = describe(train_data) or {}
    return {"name": train_d.get("name"), "kind": train_d.get("kind"), "group": train_d.get("group"),
            "root": train_d.get("root"),
            "train": train_d, "test": describe(test_data)}


def _epoch_line(record: Dict[str, Any], epochs: int, metric: str = "top1") -> str:
    line = f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  lr {record['lr']:.2e}"
    extras = [k for k in record if k not in ("epoch", "train_loss", "lr", "time_s", metric, "test_loss")]
    line += "".join(f"  {k} {record[k]:.4f}" for k in extras)
    if record.get(metric) is not None:
        line += f"  test {'top-1' if metric == 'top1' else metric} {record[metric]:.2f}%"
    return line + f"  ({record['time_s']:.1f} s)"


def _read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def _result(history, global_step, finished, elapsed, results, stop_reason=None, metric: str = "top1") -> TrainResult:
    evals = [(h["epoch"], h[metric]) for h in history if h.get(metric) is not None]
    best = max(evals, key=lambda e: e[1]) if evals else (None, None)
    last = evals[-1][1] if evals else None
    top1 = metric == "top1"
    return TrainResult(top1=last if top1 else None, best_top1_over_epochs=best[1] if top1 else None, best_epoch=best[0],
                       history=list(history), epochs_done=len(history), global_step=global_step, finished=finished,
                       train_time_s=elapsed, results=results, stop_reason=stop_reason, metric=metric, score=last,
                       best_score_over_epochs=best[1])
