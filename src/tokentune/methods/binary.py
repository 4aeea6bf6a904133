"""Low-bit (binary) linear layers with a straight-through estimator, as FPET and the Binary Adapter use.

Our own implementation of the behaviour of ``QLinear`` in kyk120/fpet@17a45e76 ``utils.py:17-92``
(itself from JieShibo/PETL-ViT's binary adapter; that repository has no licence file, so nothing is
copied). A ``b``-bit layer keeps a float weight ``W`` (trained) and computes with::

    mu = mean(W),  sigma = std(W)  (unbiased),  W_n = (W - mu) / (sigma + 1e-5)
    W_q = Q_b(W_n)            forward value;  dW_q/dW_n = 1  (straight-through estimator)
    y = x (W_q sigma + mu)^T  (no bias)

``Q_b`` maps ``W_n`` to the ``2^b`` levels of a quantiser for a standard normal found by the
reference's fixed-point iteration (the levels are the normal quantiles at the middles of each
bin's probability mass; for ``b = 1``: ``+-0.67449``, i.e. ``Q_1(w) = 0.67449 sign(w)``, and
``Q_1(0) = 0``). Gradients reach ``W`` through ``W_n`` and through ``mu``/``sigma`` in the last line,
as in the reference. Storage as the papers count it: ``b`` bits per weight plus the two float32
numbers ``mu``, ``sigma`` per layer (the reference's ``.bin`` file, ``utils.py:135-147``).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TokenTuneError

BITS = (1, 2, 4, 8, 32)          # the reference's choices (main.py: --bit); 32 = a plain float layer


@functools.lru_cache(maxsize=None)
def _levels(bits: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(levels, thresholds) of the ``bits``-bit quantiser of N(0, 1): the reference's 500 iterations
    of ``thresholds = mid(levels); levels = ppf(mid(cdf([0, thresholds, 1])))`` from all zeros."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    values = torch.zeros(2 ** bits, dtype=torch.float64)
    ranges = torch.zeros(2 ** bits - 1, dtype=torch.float64)
    for _ in range(500):
        ranges = (values[1:] + values[:-1]) / 2
        pv = torch.cat([values.new_zeros(1), normal.cdf(ranges), values.new_ones(1)])
        values = normal.icdf((pv[1:] + pv[:-1]) / 2)
    return tuple(values.tolist()), tuple(ranges.tolist())


def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(w)``: ``sum_k sign(w - t_k) (l_{k+1} - l_k) / 2`` over the thresholds ``t_k`` (reference ``func``)."""
    levels, ranges = _levels(bits)
    pos = torch.tensor(ranges, dtype=w.dtype, device=w.device)
    lv = torch.tensor(levels, dtype=w.dtype, device=w.device)
    delta = (lv[1:] - lv[:-1]) / 2
    return (torch.sign(w.unsqueeze(-1) - pos) * delta).sum(-1)


def binarized_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight a ``bits``-bit layer computes with (straight-through gradient to ``weight``)."""
    mean, std = weight.mean(), weight.std()
    w = (weight - mean) / (std + 1e-5)
    wq = quantize(w.detach(), bits) + w - w.detach()
    return wq * std + mean


class BinaryLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose weight is quantised to ``bits`` bits in the forward
    (straight-through estimator in the backward). ``weight`` is the float weight being trained;
    :meth:`fold` returns the plain ``nn.Linear`` with the quantised weight (deployment)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 1, device=None, dtype=None) -> None:
        if bits not in BITS or bits == 32:
            raise TokenTuneError(f"a binary layer has 1, 2, 4 or 8 bits, got {bits}; use nn.Linear for 32")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.bits = int(bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"

    def quantized_weight(self) -> torch.Tensor:
        return binarized_weight(self.weight, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight())

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain bias-free ``nn.Linear`` computing the same outputs (the quantised weight)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=False,
                          device=self.weight.device, dtype=self.weight.dtype)
        layer.weight.copy_(self.quantized_weight())
        layer.weight.requires_grad_(self.weight.requires_grad)
        return layer

    def storage_bits(self):
        """``{weight: bits}`` to store it as the papers count it: ``bits`` per weight + mu, sigma in float32."""
        return {self.weight: self.weight.numel() * self.bits + 64}


def make_linear(in_features: int, out_features: int, bits: int = 32, bias: bool = True, **factory) -> nn.Linear:
    """``nn.Linear`` for ``bits=32``, else a bias-free :class:`BinaryLinear` of that many bits."""
    if bits not in BITS:
        raise TokenTuneError(f"invalid bits={bits}: choose one of {', '.join(map(str, BITS))} (32 = full precision)")
    if bits == 32:
        return nn.Linear(in_features, out_features, bias=bias, **factory)
    return BinaryLinear(in_features, out_features, bits, **factory)


def fold_binary(model: nn.Module) -> int:
    """Replace every :class:`BinaryLinear` in ``model`` by its folded ``nn.Linear``; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BinaryLinear):
                setattr(module, name, child.fold())
                count += 1
    return count


def storage_bytes(model: nn.Module, pattern=None) -> float:
    """Bytes to store the trainable tensors as the binary-adapter papers count them: ``b`` bits per
    weight of a low-bit layer (+ its mu, sigma), 32 bits per other trainable value."""
    binary = {id(p): b for m in model.modules() if callable(getattr(m, "storage_bits", None))
              for p, b in m.storage_bits().items()}
    bits = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or (pattern is not None and not pattern(name)):
            continue
        bits += binary.get(id(p), 32 * p.numel())
    return bits / 8
