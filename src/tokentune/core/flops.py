"""FLOPs of a real forward, attention included, with ``torch.utils.flop_counter``.

The counter follows the forward the model really runs, so ToMe/PYRA schedules and DyT activation
rates are reflected. One multiply-add counts as 2 FLOPs there; the papers (fvcore) count it as
1, so tables give both ``GFLOPs`` and ``GMACs`` (= the papers' "GFLOPs"). PyTorch's counter has
no formula for the CPU fused attention kernel and counts it as zero; we register one (the formula
PyTorch uses for the GPU kernels), so attention is counted on CPU and GPU alike.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

_REGISTERED = False


def _register_cpu_attention_flops() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    aten = torch.ops.aten
    try:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
        def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
            return sdpa_flop_count(query.shape, key.shape, value.shape)

        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
        def _cpu_sdpa_bwd(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
    except (AttributeError, ValueError, RuntimeError):   # older torch / already registered
        pass
    _REGISTERED = True


def count_flops(model: nn.Module, images: torch.Tensor, **forward_kwargs) -> int:
    """FLOPs (2 per multiply-add) of one forward of ``model`` on ``images``, attention included."""
    _register_cpu_attention_flops()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images, **forward_kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def flops_per_image(model: nn.Module, image_size: int = 224, batch_size: int = 1, device="cpu") -> float:
    """Forward FLOPs per image at ``image_size`` (averaged over a batch of random images)."""
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    return count_flops(model, images) / batch_size
