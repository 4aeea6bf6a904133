"""ONNX export of a deployed model (optional ``onnx`` extra) and its check with onnxruntime.

What exports: every deployed model whose token counts are fixed by its configuration (plain and
LoRA-merged timm ViTs, adapters, ToMe, PYRA); a method whose deployed form has data-dependent
shapes offers a traceable form through its ``trace_options`` hook (DyT: the mask form).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import TokenTuneError
from ..utils import one_line
from .export import PathLike, as_deployed, describe_model, example_images, trace_options


def _require_onnx():
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TokenTuneError(f"ONNX export needs {' and '.join(missing)}; install them with "
                             "pip install 'tokentune[onnx]'")


def export_onnx(model: Union[nn.Module, PathLike], path: PathLike,
                image_size: Union[int, Tuple[int, int], None] = None, batch_size: int = 1, *,
                dynamic_batch: bool = True, opset: Optional[int] = None, verify: Optional[bool] = None,
                atol: float = 1e-4, dyt_mask_form: Optional[bool] = None) -> str:
    """Export a deployed model to ONNX (one self-contained ``.onnx`` file, weights inside).

    What exports: every deployed model whose token counts are fixed by its configuration: plain
    and LoRA-merged timm ViTs, adapters, ToMe (``lora+tome``, ``adapter+tome``, ``full+tome``)
    and PYRA, whose merge schedules fix the token count of every block, so the graph has static
    shapes apart from the batch. Matching (argsort, gather), the row merges (index_select,
    index_add) and proportional attention become ordinary ONNX operators.

    DyT: its deployed form skips inactive tokens with data-dependent shapes (how many tokens a
    batch keeps decides the gathered sizes and which code path runs), which the exporter cannot
    trace. DyT models are exported in their *mask form* instead (``dyt_execution="mask"``: every
    token goes through the skippable computation and its update is multiplied by the 0/1 mask),
    which gives the same outputs but none of DyT's savings inside the ONNX graph. Pass
    ``dyt_mask_form=False`` to get an error instead; ``True`` to accept it without a warning.

    Args:
        model: a deployed model, a tokentune model (deployed here), an export directory
            (:func:`export_deployed`) or a training run directory.
        path: the ``.onnx`` file to write (atomically).
        image_size: input height/width (default: the size the model was built for; ToMe
            schedules and position embeddings are fixed to it).
        batch_size: batch of the example input; with ``dynamic_batch`` the graph accepts any batch
            (a batch of 2 is traced when 1 is asked, since a traced size 1 is specialised).
        dynamic_batch: make the batch dimension symbolic.
        opset: ONNX opset (default: the exporter's).
        verify: compare onnxruntime's outputs with PyTorch's on random inputs and raise above
            ``atol`` (default: when onnxruntime is installed).
        atol: tolerance of that check.
        dyt_mask_form: accept the traceable form a method asks for (its ``trace_options`` hook;
            DyT: the mask form): None: yes, with a warning; True: yes, silently; False: raise.

    Returns:
        ``path``.
    """
    deployed = as_deployed(model)
    deployed.eval()
    options, notes = trace_options(deployed)
    if notes:
        if dyt_mask_form is False:
            raise TokenTuneError(f"{notes[0]}; pass dyt_mask_form=True to accept that, or serve the model with PyTorch")
        if dyt_mask_form is None:
            warnings.warn("; ".join(notes), stacklevel=2)
    _require_onnx()
    path = os.fspath(path)
    traced_batch = max(int(batch_size), 2) if dynamic_batch else int(batch_size)
    images = example_images(deployed, traced_batch, image_size, seed=0)
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    kwargs = dict(input_names=["images"], output_names=["logits"], dynamo=True, external_data=False,
                  dynamic_shapes=dynamic_shapes, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    try:
        with torch.no_grad():
            program = torch.onnx.export(_OnnxWrapper(deployed, options).eval(), (images,), **kwargs)
    except TokenTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures become one line naming the cause
        raise TokenTuneError(f"ONNX export of this {describe_model(deployed)} failed: {one_line(exc, 240)}") from exc
    _save_onnx(program, path)
    if verify is None:
        try:
            import onnxruntime  # noqa: F401
            verify = True
        except ImportError:
            verify = False
    if verify:
        batches = sorted({1, int(batch_size), traced_batch + 1}) if dynamic_batch else [int(batch_size)]
        for b in batches:
            diff = check_onnx(path, deployed, example_images(deployed, b, image_size, seed=b))
            if not diff <= atol:
                raise TokenTuneError(f"the ONNX graph differs from PyTorch by {diff:.3g} (> {atol:g}) at batch {b}; "
                                     "please report this with the model's method spec")
    return path


def _save_onnx(program, path: str) -> None:
    """Save an ONNX program atomically; graphs over protobuf's 2 GB limit keep their weights in
    ``<path>.data`` beside it (written first, so the graph never points to a missing file)."""
    import shutil
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=".tmp-onnx-", dir=directory)
    try:
        tmp = os.path.join(tmpdir, os.path.basename(path))
        program.save(tmp)                  # the exporter moves weights out itself above 2 GB
        names = sorted(os.listdir(tmpdir), key=lambda n: n == os.path.basename(path))   # the graph last
        for name in names:
            os.replace(os.path.join(tmpdir, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class _OnnxWrapper(nn.Module):
    """``images -> logits`` only (fixed per-forward options, no token state) for tracing."""

    def __init__(self, model: nn.Module, options: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.model = model
        self.options = dict(options or {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, **self.options)


@torch.no_grad()
def check_onnx(path: PathLike, model: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on ``images``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise TokenTuneError("checking an ONNX graph needs onnxruntime; pip install 'tokentune[onnx]'") from exc
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.detach().cpu().float().numpy()})[0]
    want = model.eval()(images).float().cpu().numpy()
    return float(abs(got - want).max())
