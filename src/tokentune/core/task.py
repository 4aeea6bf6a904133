"""Tasks beyond image classification: what a model outputs and how it is trained and scored.

Image classification is the default (no task): the timm head on the pooled tokens, cross-entropy,
top-1. A *task* (semantic segmentation, video recognition; :mod:`tokentune.tasks`) changes that
in one place, as a method changes the blocks in one place:

* its **head** is a :class:`TaskHead` module installed as ``model.task_head`` by the task's
  ``apply``; the adapted model's forward hands its input to it
  (``task_head(model, inputs, **options) -> (outputs, TokenState)``), so the head decides how the
  backbone runs (a clip as a batch of frames, multi-level features of an image) and what comes
  out (clip logits, per-pixel logits). Methods, deployment, export, checkpoints and the
  per-forward options work unchanged; a deployed model keeps its head.
* its **hooks** tell the training loop and the tools what differs: the loss module, the
  evaluation and its headline metric, how data is loaded.

A task registers itself when its module is imported (``import tokentune`` imports the built-in
ones); ``create_model(..., task="segmentation", segmentation_<field>=...)`` applies it and records
it in the build spec, so :func:`tokentune.load_trained` and exports rebuild it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import TokenTuneError
from ..utils import unwrap_model
from .state import TokenState


class TaskHead(nn.Module):
    """The module a task installs as ``model.task_head``.

    ``forward(model, inputs, **options) -> (outputs, state)`` runs the adapted ViT ``model`` (its
    ``forward_tokens`` or ``forward_intermediates``, with the per-forward ``options``) on the
    task's ``inputs`` and returns the task's outputs and the final
    :class:`~tokentune.core.state.TokenState` (DyT's records reach its loss through it).
    """

    #: what one sample is (benchmarks report per-sample numbers: per image, per clip)
    unit: str = "image"

    def forward(self, model: nn.Module, inputs: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        raise NotImplementedError

    def example_input(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        """A reproducible random input of ``batch_size`` samples (benchmarks, export checks)."""
        raise NotImplementedError

    def images_per_sample(self) -> int:
        """Backbone images one sample runs through (a clip: its frames); FLOPs per sample = per image x this."""
        return 1


@dataclass
class Task:
    """A registered task.

    Attributes:
        name: the ``--task`` name; its options are ``<name>_<field>`` (``segmentation_channels``).
        config: its options dataclass.
        apply: ``apply(model, cfg, num_classes) -> cfg or None`` installs ``model.task_head`` (and may
            change the timm head); it may return the config as it should be recorded.
        summary: one line for ``--help``.
        metric: the metric a run reports (``top1``, ``miou``): the key of ``evaluate``'s result that
            becomes a run's score.
        criterion: ``criterion(train_config) -> loss module`` called as ``loss(outputs, targets)``
            (default: cross-entropy with the config's label smoothing).
        evaluate: ``evaluate(model, dataset, *, batch_size, device, amp, num_workers, progress, desc)
            -> metrics`` with ``metric`` and ``loss`` among them (default: top-1 of
            :func:`tokentune.engine.evaluate.evaluate`).
        load_data: ``load_data(...) -> (train, test)`` datasets without transforms, as the command
            line builds them (see the task's module for its arguments).
        set_transforms: ``set_transforms(train, test, model, train_config)`` gives the datasets (either
            may be None) the task's training and evaluation transforms for ``model``.
        describe: ``describe(train, test, model) -> str``: one line a run prints about what the task will
            do with this data (e.g. segmentation's rescale and test windows per image).
    """

    name: str
    config: type
    apply: Callable[[nn.Module, Any, int], Any]
    summary: str = ""
    metric: str = "top1"
    criterion: Optional[Callable[[Any], nn.Module]] = None
    evaluate: Optional[Callable[..., Dict[str, Any]]] = None
    load_data: Optional[Callable[..., Tuple[Any, Any]]] = None
    set_transforms: Optional[Callable[..., None]] = None
    describe: Optional[Callable[..., str]] = None


_TASKS: Dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (a task of the same name is replaced)."""
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise TokenTuneError(f"unknown task {name!r}; choose from classification (the default), "
                             f"{', '.join(available_tasks()) or 'none registered'}")
    return _TASKS[name]


def available_tasks() -> List[str]:
    return sorted(_TASKS)


def task_head_of(model: nn.Module) -> Optional[TaskHead]:
    """The model's :class:`TaskHead`, or None (image classification)."""
    head = getattr(unwrap_model(model), "task_head", None)
    return head if isinstance(head, TaskHead) else None


def task_of(model: nn.Module) -> Optional[Task]:
    """The registered :class:`Task` a model was built for, or None (image classification)."""
    info = getattr(unwrap_model(model), "tokentune", None)
    spec = getattr(info, "spec", None) or {}
    name = spec.get("task")
    return get_task(name) if name else None
