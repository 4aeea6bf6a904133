"""LoRA: low-rank adaptation of frozen linear layers (Hu et al., ICLR 2022).

``W x + b`` becomes ``W x + b + s * B A dropout(x)`` with ``A`` [rank, in] (kaiming-uniform,
a=sqrt 5), ``B`` [out, rank] (zeros, so training starts from the pretrained model) and
``s = alpha / rank``. On timm's fused ``qkv`` projection one ``B A`` covers q, k and v, which is
the "LoRA" of PYRA and NOAH (there: no scaling, i.e. ``alpha = rank``, dropout 0.1).

:class:`LoRALinear` *is* an ``nn.Linear`` that keeps the frozen ``weight``/``bias`` under their
original names, so ``blocks.0.attn.qkv.weight`` still loads from timm checkpoints; the new
parameters are ``...qkv.lora_A`` and ``...qkv.lora_B`` (reference PYRA code: ``attn.LoRA_a.weight``
and ``attn.LoRA_b.weight``). :meth:`LoRALinear.merge` folds ``s B A`` into the weight and returns
a plain ``nn.Linear`` whose outputs equal the unmerged layer's in eval mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import TokenTuneError
from ...typecheck import check_fields
from ..binary import BITS, binarized_weight


@dataclass
class LoRAConfig:
    """LoRA options.

    Attributes:
        rank: rank of the update ``B A``.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``. ``None`` means
            ``alpha = rank`` (no scaling, as PYRA/NOAH).
        dropout: dropout on the LoRA input (training only).
        targets: names of the Linear layers inside each block to adapt (``qkv``, ``proj``,
            ``fc1``, ``fc2``; timm's Eva blocks also ``q_proj``, ``k_proj``, ``v_proj``, ``fc1_g``,
            ``fc1_x``, and ``qkv``/``fc1`` adapt the separate parts where a block splits them), or
            ``q``, ``k``, ``v``: one LoRA of its own on that part of the attention's fused qkv
            (FPET's LoRA: ``q`` and ``v``; separate projections: ``q_proj`` etc.).
        bits: weight bits of A and B: 32 (float) or 1, 2, 4, 8 (binary/low-bit weights with a
            straight-through estimator, FPET's ``--bit``; B then starts at trunc_normal(0, 0.001)).
        hidden_dropout: apply the dropout to the rank-r hidden ``A x`` instead of the input (FPET's
            LoRA, ``lora.py:40-45``).
    """

    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.1
    targets: Sequence[str] = ("qkv",)
    bits: int = 32
    hidden_dropout: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "lora_")
        if self.rank < 1:
            raise TokenTuneError(f"invalid lora_rank={self.rank}: the rank must be at least 1")
        if self.alpha is not None and not self.alpha > 0:
            raise TokenTuneError(f"invalid lora_alpha={self.alpha}: must be > 0 (or none for alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise TokenTuneError(f"invalid lora_dropout={self.dropout}: a dropout probability is in [0, 1)")
        if not self.targets:
            raise TokenTuneError("lora_targets is empty; name at least one of qkv, proj, fc1, fc2")
        if self.bits not in BITS:
            raise TokenTuneError(f"invalid lora_bits={self.bits}: choose one of {', '.join(map(str, BITS))} "
                                 "(32 = full precision)")


@torch.no_grad()
def merged_linear(layer: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``W + delta`` of a layer with ``delta_weight()`` (a new weight tensor;
    the layer is unchanged), its bias and its ``requires_grad`` flags."""
    merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight.device, dtype=layer.weight.dtype)
    merged.weight.copy_(layer.weight + layer.delta_weight().to(layer.weight.dtype))
    merged.weight.requires_grad_(layer.weight.requires_grad)
    if layer.bias is not None:
        merged.bias.copy_(layer.bias)
        merged.bias.requires_grad_(layer.bias.requires_grad)
    return merged


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None, dropout: float = 0.0) -> None:
        if rank <= 0:
            raise TokenTuneError(f"LoRA rank must be positive, got {rank}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"

    def delta_weight(self) -> torch.Tensor:
        """``s B A``: what :meth:`merge` adds to the weight."""
        delta = self.lora_B @ self.lora_A
        return delta * self.scaling if self.scaling != 1.0 else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return out + delta

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + s B A`` (a new weight tensor; this layer is unchanged)."""
        return merged_linear(self)


class PartLoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus one low-rank update per *part* of its output: FPET's LoRA, separate
    updates of q and v on timm's fused qkv (kyk120/fpet ``lora.py:7-21``), optionally with low-bit
    A and B and the dropout on the hidden. For part ``j`` of ``chunks`` equal output slices::

        y_j = W_j x + b_j + s * B_j dropout(A_j x)      (hidden_dropout; else B_j A_j dropout(x))

    ``lora_A`` [k, rank, in], ``lora_B`` [k, out / chunks, rank] (``k`` adapted parts); low-bit
    A_j and B_j are quantised each as one layer (:mod:`tokentune.methods.binary`). :meth:`merge`
    folds every ``s B_j A_j`` into its rows.
    """

    def __init__(self, base: nn.Linear, parts: Sequence[int], chunks: int, rank: int, alpha: Optional[float] = None,
                 dropout: float = 0.0, bits: int = 32, hidden_dropout: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if self.out_features % chunks:
            raise TokenTuneError(f"cannot split {self.out_features} outputs into {chunks} parts for LoRA")
        self.weight, self.bias = base.weight, base.bias
        self.parts, self.chunks, self.bits = tuple(int(p) for p in parts), int(chunks), int(bits)
        part = self.out_features // chunks
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(len(self.parts), rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(len(self.parts), part, rank, **factory))
        with torch.no_grad():
            for j in range(len(self.parts)):
                nn.init.kaiming_uniform_(self.lora_A[j], a=math.sqrt(5))
                if bits < 32:            # a binary B cannot start at zero (kyk120/fpet lora.py:35)
                    nn.init.trunc_normal_(self.lora_B[j], mean=0.0, std=0.001, a=-0.002, b=0.002)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.hidden_dropout = bool(hidden_dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, parts={self.parts} of {self.chunks}, rank={self.rank}, alpha={self.alpha:g}, "
                f"bits={self.bits}")

    def storage_bits(self):
        """``{tensor: bits}`` of low-bit A and B as the papers count them (each A_j, B_j one layer:
        ``bits`` per weight + mu, sigma in float32); {} at 32 bits."""
        if self.bits == 32:
            return {}
        k = len(self.parts)
        return {self.lora_A: self.lora_A.numel() * self.bits + 64 * k,
                self.lora_B: self.lora_B.numel() * self.bits + 64 * k}

    def _ab(self, j: int):
        a, b = self.lora_A[j], self.lora_B[j]
        if self.bits < 32:
            return binarized_weight(a, self.bits), binarized_weight(b, self.bits)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        xin = x if self.hidden_dropout else self.lora_dropout(x)
        deltas = {}
        for j, part in enumerate(self.parts):
            a, b = self._ab(j)
            h = F.linear(xin, a)
            if self.hidden_dropout:
                h = self.lora_dropout(h)
            deltas[part] = F.linear(h, b) * self.scaling
        width = self.out_features // self.chunks
        pieces = [deltas[c] if c in deltas else out.new_zeros(*out.shape[:-1], width) for c in range(self.chunks)]
        return out + torch.cat(pieces, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """``s B_j A_j`` in the rows of each part, zeros elsewhere: what :meth:`merge` adds."""
        rows = []
        width = self.out_features // self.chunks
        for c in range(self.chunks):
            if c in self.parts:
                a, b = self._ab(self.parts.index(c))
                rows.append((b @ a) * self.scaling)
            else:
                rows.append(self.weight.new_zeros(width, self.in_features))
        return torch.cat(rows, dim=0)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        return merged_linear(self)


#: parts of the attention's fused qkv that a LoRA may adapt alone, and the separate projection
#: that stands for each on an attention without a fused qkv
_QKV_PARTS = {"q": (0, "q_proj"), "k": (1, "k_proj"), "v": (2, "v_proj")}

#: where a target lives in a block, and what it stands for in blocks that split it: timm's Eva
#: attention may have separate q/k/v projections (EVA-02 base and up; DINOv3 uses a fused qkv), its SwiGLU MLP
#: separate gate and value halves of fc1 (``fc1_g``, ``fc1_x``)
_PARENTS = {"qkv": "attn", "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "proj": "attn",
            "fc1": "mlp", "fc1_g": "mlp", "fc1_x": "mlp", "fc2": "mlp"}
_SPLIT = {"qkv": ("q_proj", "k_proj", "v_proj"), "fc1": ("fc1_g", "fc1_x")}


def _block_linears(block: nn.Module, target: str) -> List[Tuple[nn.Module, str]]:
    """(parent module, attribute) of the Linear layers a target names inside a block.

    ``qkv`` on an attention with separate projections means ``q_proj``, ``k_proj`` and ``v_proj``
    (one LoRA each, rank ``r``: 6 r D parameters against 4 r D on a fused qkv); ``fc1`` on a
    SwiGLU MLP means ``fc1_g`` and ``fc1_x``.
    """
    if target not in _PARENTS:
        raise TokenTuneError(f"unknown LoRA target {target!r}; choose from {', '.join(_PARENTS)}")
    parent = getattr(block, _PARENTS[target])
    if isinstance(getattr(parent, target, None), nn.Linear):
        return [(parent, target)]
    parts = _SPLIT.get(target, ())
    if parts and all(isinstance(getattr(parent, n, None), nn.Linear) for n in parts):
        return [(parent, n) for n in parts]
    raise TokenTuneError(f"this backbone's blocks have no Linear '{_PARENTS[target]}.{target}' for LoRA "
                         f"({type(parent).__name__}); choose lora_targets among the Linear layers it has: "
                         f"{', '.join(n for n, m in parent.named_children() if isinstance(m, nn.Linear))}")


def _plan(block: nn.Module, targets: Sequence[str]):
    """{(parent, attribute): parts or None (the whole layer)} of one block's LoRA targets."""
    plan = {}
    for target in targets:
        if target in _QKV_PARTS:
            part, separate = _QKV_PARTS[target]
            attn = block.attn
            if isinstance(getattr(attn, "qkv", None), nn.Linear):
                parts = plan.setdefault((attn, "qkv"), [])
                if parts is None:
                    raise TokenTuneError(f"lora_targets names both 'qkv' and its part {target!r}; choose one")
                parts.append(part)
                continue
            target = separate
        for key in _block_linears(block, target):
            if plan.get(key):
                raise TokenTuneError("lora_targets names both 'qkv' and its parts; choose one")
            plan[key] = None
    return plan


def apply_lora(blocks: Sequence[nn.Module], cfg: LoRAConfig) -> None:
    """Wrap the target Linear layers of every block with :class:`LoRALinear` (with ``q``/``k``/``v``
    parts, low-bit weights or the hidden dropout: :class:`PartLoRALinear`)."""
    plain = cfg.bits == 32 and not cfg.hidden_dropout
    for block in blocks:
        for (parent, attr), parts in _plan(block, cfg.targets).items():
            layer = getattr(parent, attr)
            if isinstance(layer, (LoRALinear, PartLoRALinear)):
                continue
            if parts is None and plain:
                setattr(parent, attr, LoRALinear(layer, cfg.rank, cfg.alpha, cfg.dropout))
                continue
            parts, chunks = (sorted(set(parts)), 3) if parts is not None else ((0,), 1)
            setattr(parent, attr, PartLoRALinear(layer, parts, chunks, cfg.rank, cfg.alpha, cfg.dropout,
                                                 cfg.bits, cfg.hidden_dropout))


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` (and :class:`PartLoRALinear`) in ``model`` by its merged
    ``nn.Linear``; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, PartLoRALinear)):
                setattr(module, name, child.merge())
                count += 1
    return count

