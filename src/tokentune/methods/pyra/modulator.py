"""PYRA's modulator, the method and its reports (the module docstring of the package has the math)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...core.method import Method, register_method
from ...core.params import count_parameters
from ...core.vit import adapted_blocks
from ...errors import TokenTuneError
from ...typecheck import check_fields
from ..tome import register_modulator

VARIANTS = ("pyra", "wr", "wd", "matrix", "gated_mlp")
WR_INITS = ("uniform", "gaussian")

# parameter-name regexes (used by the method registry, the paper count and optimizer groups)
TRAINABLE = r"\.(merge|reduce)\.modulator\."
NORM = r"\.(merge|reduce)\.modulator\.norm\."
GENERATOR = r"\.(merge|reduce)\.modulator\.(?!norm\.)"


@dataclass
class PYRAConfig:
    """PYRA options (the merge schedule is ToMe's ``tome_r``).

    Attributes:
        variant: which token modulator to build. ``"pyra"`` (default): the paper's parallel
            W_r and W_D generators, two-step re-activation. Ablations of the paper (Table 6/7):
            ``"wr"`` W_r only (token-axis generator: ``M_s <- M_s + g(delta_D) * M_s``),
            ``"wd"`` W_D only (channel-axis generator: ``M_s <- M_s + g(delta_r) * M_s``),
            ``"matrix"`` a directly learned, input-independent D x r matrix W per block
            (``M_s <- M_s + g(W) * M_s``; no LayerNorm since nothing is generated),
            ``"gated_mlp"`` a gated-MLP weight generator
            (``M_s <- M_s + g(up(GELU(down(M_info)))) * M_s``, hidden width ``mlp_hidden``).
            Single-generator variants zero-initialise their generator so that, like PYRA, every
            variant starts as exactly LoRA+ToMe.
        activation: the sigmoid re-activation. With it, ``g(x) = 2 sigmoid(x) - 1`` in the
            residual (and ``2 sigmoid(delta_D)`` in PYRA's step 1); without it (ablation
            "w/o activation") the raw generated weights are used: PYRA becomes
            ``M_s + delta_r * (delta_D * M_s)`` and ``g(x) = x``.
        wr_init: initialisation of W_r in the ``"pyra"`` variant: ``"uniform"`` = U(-1, 1), the
            reference implementation (default, published numbers); ``"gaussian"`` = N(0,
            ``wr_std``^2), the paper's text.
        wr_std: standard deviation of the Gaussian W_r initialisation.
        norm_eps: epsilon of the modulator's own LayerNorm (reference: PyTorch's default 1e-5,
            not the ViT's 1e-6).
        norm_affine: learnable LayerNorm weight and bias (reference: yes).
        mlp_hidden: hidden width of the ``"gated_mlp"`` generator (4 gives the paper's 73.73K
            parameters on ViT-B: 12 x 2 x 768 x 4).
        modulate_targets: also modulate the merge targets M_t (an extension the paper names as a
            limitation; ``"pyra"`` variant only): a second pair W_r^t [r, 1], W_D^t [1, D] (W_D^t
            zero, so the default start is still exact ToMe) gives each (source, target) pair a
            target modulation ``(2 sigmoid(M_info W_D^t^T) - 1) * 2 sigmoid(W_r^t^T M_info) * M_t``
            that is added to what its source contributes; a target shared by k sources gets k
            such terms. Off by default (the paper's PYRA).
    """

    variant: str = "pyra"
    activation: bool = True
    wr_init: str = "uniform"
    wr_std: float = 1.0
    norm_eps: float = 1e-5
    norm_affine: bool = True
    mlp_hidden: int = 4
    modulate_targets: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "pyra_")
        if self.modulate_targets and self.variant != "pyra":
            raise TokenTuneError(f"pyra_modulate_targets works with the 'pyra' variant only, not {self.variant!r}")
        if self.variant not in VARIANTS:
            raise TokenTuneError(f"unknown pyra_variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.wr_init not in WR_INITS:
            raise TokenTuneError(f"unknown pyra_wr_init {self.wr_init!r}; choose from {', '.join(WR_INITS)}")
        if self.mlp_hidden <= 0:
            raise TokenTuneError(f"pyra_mlp_hidden must be positive, got {self.mlp_hidden}")


# ----------------------------------------------------------------------------- modulator
class PYRAModulator(nn.Module):
    """Modulates the ``r`` size-weighted source tokens of one block before ToMe merges them.

    Called by :class:`tokentune.tome.TokenMerging` as ``modulator(src, dst)`` with ``src`` =
    M_s and ``dst`` = M_t, both [B, r, D]; returns the new M_s.

    Args:
        r: tokens this block merges (rows of W_r); fixed by the build-time schedule.
        dim: embedding dimension D.
        cfg: the :class:`PYRAConfig` (variant, activation, initialisation, LayerNorm).
    """

    def __init__(self, r: int, dim: int, cfg: Optional[PYRAConfig] = None) -> None:
        super().__init__()
        cfg = cfg or PYRAConfig()
        if r <= 0:
            raise TokenTuneError(f"a PYRA modulator needs r > 0 merged tokens, got r={r}")
        self.r, self.dim = int(r), int(dim)
        self.variant, self.activation = cfg.variant, bool(cfg.activation)
        v = cfg.variant
        if v in ("pyra", "wr", "wd", "gated_mlp"):
            self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        if v in ("pyra", "wr"):
            self.W_r = nn.Parameter(torch.zeros(self.r, 1))
        if v in ("pyra", "wd"):
            self.W_D = nn.Parameter(torch.zeros(1, dim))     # zero: PYRA is the identity at init
        self.modulate_targets = bool(cfg.modulate_targets)
        if self.modulate_targets:
            self.W_r_t = nn.Parameter(torch.zeros(self.r, 1))
            self.W_D_t = nn.Parameter(torch.zeros(1, dim))   # zero: the targets start unmodulated
        if v == "pyra":
            with torch.no_grad():
                for w in (self.W_r, self.W_r_t) if self.modulate_targets else (self.W_r,):
                    if cfg.wr_init == "uniform":
                        w.uniform_(-1.0, 1.0)         # = kaiming_uniform(a=sqrt 5) on fan_in 1
                    else:
                        w.normal_(0.0, cfg.wr_std)
        if v == "matrix":
            self.W = nn.Parameter(torch.zeros(self.r, dim))
        if v == "gated_mlp":
            self.down = nn.Linear(dim, cfg.mlp_hidden, bias=False)
            self.up = nn.Linear(cfg.mlp_hidden, dim, bias=False)
            nn.init.zeros_(self.up.weight)

    def extra_repr(self) -> str:
        return (f"r={self.r}, dim={self.dim}, variant={self.variant}, activation={self.activation}"
                + (", modulate_targets=True" if self.modulate_targets else ""))

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if src.shape[-2] != self.r:
            raise TokenTuneError(
                f"PYRA modulator was built for r={self.r} merged (or fused) tokens but got {src.shape[-2]}; the merge "
                "schedule or keep rate changed after building: rebuild the model with it")
        v, act = self.variant, self.activation
        if v == "matrix":                                     # fixed learned W (ablation)
            return torch.addcmul(src, src, torch.tanh(0.5 * self.W) if act else self.W)   # 2 sigma(W) - 1 = tanh(W / 2)
        info = self.norm(src + dst)                           # M_info = LN(M_s + M_t)   [B, r, D]
        if v == "pyra":
            delta_D = self.W_r.transpose(0, 1) @ info         # W_r^T M_info             [B, 1, D]
            delta_r = info @ self.W_D.transpose(0, 1)         # M_info W_D^T             [B, r, 1]
            out = self._two_step(src, src, delta_D, delta_r)
            if self.modulate_targets:                         # the same two steps on M_t, own W_r^t, W_D^t
                out = self._two_step(out, dst, self.W_r_t.transpose(0, 1) @ info, info @ self.W_D_t.transpose(0, 1))
            return out
        if v == "wr":
            delta = self.W_r.transpose(0, 1) @ info           # [B, 1, D]
        elif v == "wd":
            delta = info @ self.W_D.transpose(0, 1)           # [B, r, 1]
        else:                                                 # gated_mlp
            delta = self.up(F.gelu(self.down(info)))          # [B, r, D]
        return torch.addcmul(src, src, torch.tanh(0.5 * delta) if act else delta)      # src + g(delta) * src

    def _two_step(self, base: torch.Tensor, m: torch.Tensor, delta_D: torch.Tensor, delta_r: torch.Tensor) -> torch.Tensor:
        """``base`` plus PYRA's modulation term ``(2 sigma(delta_r) - 1) * (2 sigma(delta_D) * m)`` (raw deltas
        without activation), in few operations (one ``addcmul``; ``2 sigma(v) - 1 = tanh(v / 2)``): at batch 1
        the modulator's cost is the number of its operations, not their FLOPs."""
        if self.activation:
            return torch.addcmul(base, m * (2 * torch.sigmoid(delta_D)), torch.tanh(0.5 * delta_r))
        return torch.addcmul(base, m * delta_D, delta_r)

    def generator_parameters(self) -> int:
        """Parameters the paper counts (everything but the LayerNorm)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("norm."))

    def norm_parameters(self) -> int:
        norm = getattr(self, "norm", None)
        return 0 if norm is None else sum(p.numel() for p in norm.parameters())

    def flops(self) -> int:
        """Multiply-add FLOPs per image (2 per MAC; elementwise ops and LayerNorm not counted)."""
        r, d = self.r, self.dim
        if self.variant == "pyra":
            return (8 if self.modulate_targets else 4) * r * d   # two [r]x[r,D] and [r,D]x[D] products (per pair)
        if self.variant in ("wr", "wd"):
            return 2 * r * d
        if self.variant == "gated_mlp":
            return 4 * r * d * self.down.out_features
        return 0


# ----------------------------------------------------------------------------- method
def _hosts(model: nn.Module):
    """(block index, plug-in, rows) of every plug-in that fuses source tokens PYRA can modulate:
    ToMe's merge (``r`` merged tokens) or a token reducer that fuses ``sources`` tokens (EViT)."""
    for i, block in enumerate(adapted_blocks(model)):
        merge, reduce = getattr(block, "merge", None), getattr(block, "reduce", None)
        if merge is not None and merge.r > 0:
            yield i, merge, merge.r
        elif reduce is not None and hasattr(reduce, "modulator") and getattr(reduce, "sources", 0) > 0:
            yield i, reduce, reduce.sources


def modulators(model: nn.Module) -> Dict[int, PYRAModulator]:
    """Block index -> its PYRA modulator."""
    return {i: host.modulator for i, host, _ in _hosts(model) if isinstance(host.modulator, PYRAModulator)}


def _apply_pyra(model: nn.Module, cfg: PYRAConfig, ctx) -> None:
    hosts = list(_hosts(model))
    if not hosts:
        raise TokenTuneError(
            "PYRA needs a merge schedule (or an EViT fused token): pass tome_r ('low'/'high' for ViT-B/16, ViT-L/16 "
            "and DeiT-B distilled, an int, a per-layer list, 'tokens:N' or 'flops:X'), or use evit with fusion and a "
            "keep rate below 1")
    if any(getattr(host, "varying_count", False) for _, host, _ in hosts):
        raise TokenTuneError("PYRA's W_r has one row per fused token, so the token count must stay fixed; "
                             "drop the keep-rate schedule (evit_shrink_end=0) to combine evit with pyra")
    dim = int(model.embed_dim)
    for _, host, rows in hosts:
        host.modulator = PYRAModulator(rows, dim, cfg)


register_method(Method(
    "pyra", PYRAConfig, _apply_pyra, trainable=(TRAINABLE,), order=30, needs_one_of=("tome", "evit"), default_peft="lora",
    exclude_from_paper_count=(NORM,),
    summary="PYRA: learned modulation of the tokens ToMe merges (LoRA + ToMe + PYRA) or EViT fuses"))


# ----------------------------------------------------------------------------- reports
def parameter_report(model: nn.Module) -> Dict[str, Any]:
    """PYRA's parameters as the paper counts them, plus the LayerNorms and the tuning method.

    Returns a dict with ``generator`` (W_r + W_D, or the variant's generator: the paper's count),
    ``norm`` (the modulators' LayerNorms, not counted by the paper), ``per_block`` (generator
    count per merging block), ``peft`` (the other trainable backbone parameters: LoRA, ...),
    ``paper_trainable`` = peft + generator, ``backbone`` and ``paper_pct``.
    """
    mods = modulators(model)
    generator = sum(m.generator_parameters() for m in mods.values())
    norm = sum(m.norm_parameters() for m in mods.values())
    counts = count_parameters(model)
    return {
        "variant": next(iter(mods.values())).variant if mods else None,
        "generator": generator,
        "norm": norm,
        "per_block": {i: m.generator_parameters() for i, m in mods.items()},
        "peft": counts["paper_trainable"] - generator,
        "paper_trainable": counts["paper_trainable"],
        "backbone": counts["backbone"],
        "paper_pct": counts["paper_pct"],
        "flops": sum(m.flops() for m in mods.values()),
    }


def param_groups(lr: Optional[float] = None, weight_decay: Optional[float] = None,
                 norm_lr: Optional[float] = None) -> Dict[str, Dict[str, float]]:
    """``TrainConfig.param_groups`` entries for a separate PYRA learning rate / weight decay.

    The generators (W_r, W_D, ...) get ``lr``/``weight_decay``; the modulators' LayerNorms get
    ``norm_lr`` (default: ``lr``) and no weight decay. ``None`` leaves the main value. The
    reference meant PYRA to train at 1e-4 but its group regex never matched, so the published
    runs used the main lr 1e-3 and weight decay 1e-4 for W_r/W_D and weight decay 0 for the
    LayerNorms: ``param_groups()`` (everything ``None``) is that setting.
    """
    gen: Dict[str, float] = {}
    if lr is not None:
        gen["lr"] = float(lr)
    if weight_decay is not None:
        gen["weight_decay"] = float(weight_decay)
    norm: Dict[str, float] = {"weight_decay": 0.0}
    if norm_lr is not None or lr is not None:
        norm["lr"] = float(norm_lr if norm_lr is not None else lr)
    groups: Dict[str, Dict[str, float]] = {NORM: norm}
    if gen:
        groups[GENERATOR] = gen
    return groups


def modulator_flops(dim: int) -> Callable[[int], int]:
    """PYRA's extra cost per block: two products of an [r, D] matrix with vectors (4 r D)."""
    return lambda r: 4 * r * dim


register_modulator("pyra", lambda r, d: PYRAModulator(r, d), modulator_flops)   # random W_r, zero W_D: same cost
