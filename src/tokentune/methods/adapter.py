"""AdaptFormer-style parallel adapters (Chen et al., NeurIPS 2022), as used by DyT.

``Adapter(x) = scale * up(dropout(ReLU(down(x))))``, added in parallel with the MLP on the
post-attention (un-normalised) stream::

    x' = x + MLP(LN2(x)) + Adapter(x)

``down`` is kaiming-uniform (a=sqrt 5), ``up`` and both biases are zero, so the adapter outputs
0 at initialisation and training starts from the pretrained model. ``bias=False`` leaves the
biases out (FPET's adapters). ``bits < 32`` makes both projections low-bit layers
(:class:`~tokentune.methods.binary.BinaryLinear`, FPET's and the Binary Adapter's 1-bit adapters:
no biases, ``up`` starts at trunc_normal(0, 0.001) in [-0.002, 0.002] as in kyk120/fpet
``adaptformer.py:20-24``, so a binary adapter is *not* zero at initialisation); ``deploy()`` folds
them into plain float layers with the quantised weights. Parameter names follow the
DyT reference (``adaptmlp.down_proj``/``adaptmlp.up_proj`` there, ``adapter.down_proj``/
``adapter.up_proj`` here).

:class:`MoEAdapter` is DyT's mixture-of-experts adapter: ``N`` experts with their own
down/up weights, a routing layer that turns the mean token of each image into softmax weights
``alpha``, and the experts merged *in weight space* per image (``W = sum_i alpha_i W_i``), so
running it costs one adapter, not ``N``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.method import Method, register_method
from ..core.vit import adapted_blocks
from ..errors import TokenTuneError
from ..typecheck import check_fields
from .binary import BITS, fold_binary, make_linear


@dataclass
class AdapterConfig:
    """Adapter options.

    Attributes:
        bottleneck: hidden width (DyT: 16 on VTAB-1k, 64 on larger data).
        scale: output multiplier (DyT: 1.0 on VTAB-1k, AdaptFormer: 0.1).
        dropout: dropout on the hidden activation (training only).
        layernorm: ``"none"`` (DyT), ``"in"`` (LayerNorm on the input) or ``"out"`` (on the output).
        bits: weight bits of the two projections: 32 (float) or 1, 2, 4, 8 (binary/low-bit weights
            with a straight-through estimator, FPET's ``--bit``; such layers have no biases).
        bias: biases on the two projections (32-bit only; FPET's adapters have none).
    """

    bottleneck: int = 16
    scale: float = 1.0
    dropout: float = 0.1
    layernorm: str = "none"
    bits: int = 32
    bias: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "adapter_")
        if self.bottleneck < 1:
            raise TokenTuneError(f"invalid adapter_bottleneck={self.bottleneck}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise TokenTuneError(f"invalid adapter_dropout={self.dropout}: a dropout probability is in [0, 1)")
        if self.bits not in BITS:
            raise TokenTuneError(f"invalid adapter_bits={self.bits}: choose one of {', '.join(map(str, BITS))} "
                                 "(32 = full precision)")


class Adapter(nn.Module):
    """Bottleneck adapter ``scale * up(dropout(relu(down(x))))`` (``bits < 32``: low-bit projections)."""

    def __init__(self, dim: int, bottleneck: int = 16, scale: float = 1.0, dropout: float = 0.1,
                 layernorm: str = "none", bits: int = 32, bias: bool = True) -> None:
        super().__init__()
        if bottleneck <= 0:
            raise TokenTuneError(f"adapter bottleneck must be positive, got {bottleneck}")
        if layernorm not in ("none", "in", "out"):
            raise TokenTuneError(f"adapter layernorm must be 'none', 'in' or 'out', got {layernorm!r}")
        self.layernorm = layernorm
        self.norm = nn.LayerNorm(dim) if layernorm != "none" else None
        self.bits = int(bits)
        self.down_proj = make_linear(dim, bottleneck, bits, bias)
        self.up_proj = make_linear(bottleneck, dim, bits, bias)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        if self.bits < 32:          # kyk120/fpet adaptformer.py:24: a binary up projection cannot start at 0
            nn.init.trunc_normal_(self.up_proj.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)
        else:
            nn.init.zeros_(self.up_proj.weight)
        for layer in (self.down_proj, self.up_proj):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def extra_repr(self) -> str:
        bits = f", bits={self.bits}" if self.bits < 32 else ""
        return f"scale={self.scale:g}, layernorm={self.layernorm}{bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layernorm == "in":
            x = self.norm(x)
        out = self.up_proj(self.dropout(self.act(self.down_proj(x)))) * self.scale
        if self.layernorm == "out":
            out = self.norm(out)
        return out


class MoEAdapter(nn.Module):
    """Mixture-of-experts adapter with per-image routing, merged in weight space.

    For an image with tokens ``x`` [N, D]::

        alpha = softmax(router(mean_n x_n))                        # [E], one weight per expert
        W_down = sum_e alpha_e W_down^e,  b_down = sum_e alpha_e b_down^e   (same for up)
        out = scale * (dropout(relu(x W_down^T + b_down)) W_up^T + b_up)

    Every expert is initialised like :class:`Adapter` (kaiming-uniform down, zero up and biases),
    so the output is 0 at initialisation; the router starts with trunc_normal(0.02) weights and a
    zero bias. With one expert ``alpha = 1`` and the module equals :class:`Adapter` with that
    expert's weights. Parameters: ``down_weight`` [E, bottleneck, D], ``down_bias``
    [E, bottleneck], ``up_weight`` [E, D, bottleneck], ``up_bias`` [E, D], ``router`` Linear(D, E).

    Args:
        dim: token width ``D``.
        bottleneck: hidden width of each expert.
        num_experts: ``E`` (the DyT paper uses 4).
        scale: output multiplier.
        dropout: dropout on the hidden activation (training only).
    """

    def __init__(self, dim: int, bottleneck: int = 16, num_experts: int = 4, scale: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if bottleneck <= 0:
            raise TokenTuneError(f"adapter bottleneck must be positive, got {bottleneck}")
        if num_experts <= 0:
            raise TokenTuneError(f"the MoE adapter needs at least one expert, got {num_experts}")
        self.num_experts = int(num_experts)
        self.down_weight = nn.Parameter(torch.empty(num_experts, bottleneck, dim))
        self.down_bias = nn.Parameter(torch.empty(num_experts, bottleneck))
        self.up_weight = nn.Parameter(torch.empty(num_experts, dim, bottleneck))
        self.up_bias = nn.Parameter(torch.empty(num_experts, dim))
        self.router = nn.Linear(dim, num_experts)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = float(scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.down_weight[e], a=math.sqrt(5))
        nn.init.zeros_(self.down_bias)
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.up_bias)
        nn.init.trunc_normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, scale={self.scale:g}"

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights ``alpha`` [B, E] from the mean token of each image."""
        return self.router(x.mean(dim=1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise TokenTuneError(f"MoEAdapter expects tokens [B, N, D], got shape {tuple(x.shape)}")
        alpha = self.routing(x).to(self.down_weight.dtype)                 # [B, E]
        # merge the experts per image (E * D * bottleneck multiply-adds, independent of N)
        down_w = torch.einsum("be,ehd->bhd", alpha, self.down_weight)
        down_b = alpha @ self.down_bias
        up_w = torch.einsum("be,edh->bdh", alpha, self.up_weight)
        up_b = alpha @ self.up_bias
        # then one adapter's cost: x W_down^T + b_down, ReLU, dropout, h W_up^T + b_up
        h = torch.baddbmm(down_b.unsqueeze(1), x, down_w.transpose(1, 2))
        h = self.dropout(self.act(h))
        out = torch.baddbmm(up_b.unsqueeze(1), h, up_w.transpose(1, 2))
        return out * self.scale


def apply_adapters(blocks, cfg: AdapterConfig) -> None:
    """Give every block an :class:`Adapter` parallel to its MLP."""
    for block in blocks:
        block.adapter = Adapter(block.width(), cfg.bottleneck, cfg.scale, cfg.dropout, cfg.layernorm,
                                cfg.bits, cfg.bias).to(**block.param_like())


def _apply(model: nn.Module, cfg: AdapterConfig, ctx) -> None:
    apply_adapters(adapted_blocks(model), cfg)


def _deploy(model: nn.Module) -> None:
    fold_binary(model)              # low-bit adapters: the quantised weights in plain float layers


register_method(Method("adapter", AdapterConfig, _apply, trainable=(r"\.adapter\.",), order=13, peft=True,
                       deploy=_deploy, summary="AdaptFormer-style bottleneck adapters parallel to the MLP"))
