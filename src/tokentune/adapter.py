"""AdaptFormer-style parallel adapters (Chen et al., NeurIPS 2022), as used by DyT.

``Adapter(x) = scale * up(dropout(ReLU(down(x))))``, added in parallel with the MLP on the
post-attention (un-normalised) stream::

    x' = x + MLP(LN2(x)) + Adapter(x)

``down`` is kaiming-uniform (a=sqrt 5), ``up`` and both biases are zero, so the adapter outputs
0 at initialisation and training starts from the pretrained model. Parameter names follow the
DyT reference (``adaptmlp.down_proj``/``adaptmlp.up_proj`` there, ``adapter.down_proj``/
``adapter.up_proj`` here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TokenTuneError


@dataclass
class AdapterConfig:
    """Adapter options.

    Attributes:
        bottleneck: hidden width (DyT: 16 on VTAB-1k, 64 on larger data).
        scale: output multiplier (DyT: 1.0 on VTAB-1k, AdaptFormer: 0.1).
        dropout: dropout on the hidden activation (training only).
        layernorm: ``"none"`` (DyT), ``"in"`` (LayerNorm on the input) or ``"out"`` (on the output).
    """

    bottleneck: int = 16
    scale: float = 1.0
    dropout: float = 0.1
    layernorm: str = "none"


class Adapter(nn.Module):
    """Bottleneck adapter ``scale * up(dropout(relu(down(x))))``."""

    def __init__(self, dim: int, bottleneck: int = 16, scale: float = 1.0, dropout: float = 0.1,
                 layernorm: str = "none") -> None:
        super().__init__()
        if bottleneck <= 0:
            raise TokenTuneError(f"adapter bottleneck must be positive, got {bottleneck}")
        if layernorm not in ("none", "in", "out"):
            raise TokenTuneError(f"adapter layernorm must be 'none', 'in' or 'out', got {layernorm!r}")
        self.layernorm = layernorm
        self.norm = nn.LayerNorm(dim) if layernorm != "none" else None
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, layernorm={self.layernorm}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layernorm == "in":
            x = self.norm(x)
        out = self.up_proj(self.dropout(self.act(self.down_proj(x)))) * self.scale
        if self.layernorm == "out":
            out = self.norm(out)
        return out


def apply_adapters(blocks, cfg: AdapterConfig) -> None:
    """Give every block an :class:`Adapter` parallel to its MLP."""
    for block in blocks:
        dim = block.norm2.normalized_shape[0] if hasattr(block.norm2, "normalized_shape") else block.mlp.fc1.in_features
        block.adapter = Adapter(dim, cfg.bottleneck, cfg.scale, cfg.dropout, cfg.layernorm).to(
            device=block.mlp.fc1.weight.device, dtype=block.mlp.fc1.weight.dtype)
