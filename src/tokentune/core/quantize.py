"""int8 inference on CPUs: dynamic quantization of the deployed model's Linear layers.

Token reduction shortens every matrix multiplication by the tokens it removes; at batch 1 and
small token counts a block's time is bound by streaming its fp32 weights, which token reduction
does not shorten. int8 weights quarter that traffic, so the two compound.

``"int8-dynamic"``: every ``nn.Linear`` of the deployed model (timm's qkv/proj/fc1/fc2 with LoRA
already merged, adapters, DyT's dispatchers, PYRA's modulator, the head) gets int8 weights
(one symmetric scale per output channel, as onnxruntime's ``per_channel=True``: PyTorch's default
dynamic qconfig has ONE scale per weight tensor, which lets a single large weight coarsen every row
of the layer) and quantizes its input per batch at run time, through PyTorch's own x86/ARM kernels
(``torch.ao.quantization.quantize_dynamic`` with ``per_channel_dynamic_qconfig``, fbgemm or qnnpack). Everything else
(attention's softmax, LayerNorm, merging, pruning) stays in fp32. PyTorch marks this eager API as
deprecated in favour of torchao, whose int8 path targets ``torch.compile`` and GPUs; on the pinned
torch it is the maintained CPU kernel path that runs eagerly, so we use it and keep its warning
out of the user's way. The ONNX route (``export_onnx(..., quantize="int8")``) uses onnxruntime's
quantization tools instead.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..errors import TokenTuneError

QUANTIZE_CHOICES = (None, "int8-dynamic")


def check_quantize(quantize: Optional[str]) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise TokenTuneError(f"quantize={quantize!r} is not supported; choose 'int8-dynamic' (CPU) or leave it unset")


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """``model`` with int8 dynamic-quantized ``nn.Linear`` layers (in place; CPU, fp32 activations)."""
    p = next(iter(model.parameters()), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        raise TokenTuneError(f"int8 dynamic quantization runs on CPU fp32 models; this one is {p.dtype} on "
                             f"{p.device.type}: deploy it on the CPU in fp32 (or export to ONNX with --quantize int8)")
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines and "x86" not in engines and "qnnpack" not in engines:
        raise TokenTuneError(f"this PyTorch build has no int8 CPU kernels (engines: {engines}); use the ONNX route")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
