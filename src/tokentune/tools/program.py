"""``torch.export`` of a deployed model: one traced graph (``images -> logits``), the form that ONNX,
AOTInductor and ExecuTorch start from, checked against the eager model.

Every deployed method traces with static token counts: plain and LoRA-merged ViTs, adapters,
ToMe and PYRA (their schedules fix every block's token count) and DyT's capacity execution (a
fixed number of tokens per image and dispatcher), so the savings are inside the graph. DyT's
threshold rule has data-dependent token counts; it offers its mask form through its
``trace_options`` hook (exact, every token computed, no speed-up).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import TokenTuneError
from ..fileio import atomic_write
from ..utils import one_line
from .export import PathLike, as_deployed, describe_model, example_images, trace_options


class Traced(nn.Module):
    """``images -> logits`` only (fixed per-forward options, no token state) for tracing."""

    def __init__(self, model: nn.Module, options: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.model = model
        self.options = dict(options or {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, **self.options)


def traceable(model: Union[nn.Module, PathLike], dyt_mask_form: Optional[bool] = None) -> Tuple[nn.Module, Traced]:
    """The deployed model and its traceable ``images -> logits`` wrapper (with the forward options
    its methods ask for: DyT's threshold rule runs in its mask form). ``dyt_mask_form``: None
    accepts such a form with a warning, True silently, False raises."""
    deployed = as_deployed(model)
    deployed.eval()
    options, notes = trace_options(deployed)
    if notes:
        if dyt_mask_form is False:
            raise TokenTuneError(f"{notes[0]}; pass dyt_mask_form=True to accept that, or serve the model with PyTorch")
        if dyt_mask_form is None:
            warnings.warn("; ".join(notes), stacklevel=3)
    return deployed, Traced(deployed, options).eval()


def export_program(model: Union[nn.Module, PathLike], path: Optional[PathLike] = None,
                   image_size: Union[int, Tuple[int, int], None] = None, batch_size: int = 2, *,
                   dynamic_batch: bool = True, verify: bool = True, atol: float = 1e-4,
                   dyt_mask_form: Optional[bool] = None) -> torch.export.ExportedProgram:
    """``torch.export`` of the deployed model (``images -> logits``), optionally saved to ``path``.

    Args:
        model: a deployed model, a tokentune model (deployed here), an export directory or a run directory.
        path: where to save the program (``torch.export.save``, a ``.pt2`` file), or None.
        image_size: input height/width (default: the size the model was built for).
        batch_size: batch of the example input (with ``dynamic_batch`` at least 2 is traced, since
            a traced size 1 is specialised).
        dynamic_batch: make the batch dimension symbolic.
        verify: run the program on random batches (1, ``batch_size`` and one more) and raise if it
            differs from the eager model by more than ``atol``.
        dyt_mask_form: see :func:`traceable`.

    Returns:
        The exported program; ``program.module()`` runs it.
    """
    deployed, traced = traceable(model, dyt_mask_form)
    example_batch = max(int(batch_size), 2) if dynamic_batch else int(batch_size)
    images = example_images(deployed, example_batch, image_size, seed=0)
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    try:     # not under no_grad: that would put a grad-mode switch into the graph (deployed weights need no grad)
        program = torch.export.export(traced, (images,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - tracer failures become one line naming the cause
        raise TokenTuneError(f"torch.export of this {describe_model(deployed)} failed: {one_line(exc, 240)}") from exc
    if verify:
        batches = sorted({1, int(batch_size), example_batch + 1}) if dynamic_batch else [int(batch_size)]
        runner = program.module()
        for b in batches:
            x = example_images(deployed, b, image_size, seed=b)
            with torch.no_grad():
                diff = float((runner(x).float() - traced(x).float()).abs().max())
            if not diff <= atol:
                raise TokenTuneError(f"the exported program differs from PyTorch by {diff:.3g} (> {atol:g}) at batch {b}; "
                                     "please report this with the model's method spec")
    if path is not None:
        atomic_write(os.fspath(path), lambda tmp: _save(program, tmp))
    return program


def _save(program: torch.export.ExportedProgram, path: str) -> None:
    with open(path, "wb") as fh:              # a file object: the temporary name need not end in .pt2
        torch.export.save(program, fh)
