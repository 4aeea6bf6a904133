"""PYRA: Parallel Yielding Re-Activation (Xiong et al., ECCV 2024, arXiv 2403.09192).

PYRA = LoRA + ToMe + a tiny *modulator* that rewrites the tokens ToMe is about to merge away.
In every block that merges ``r`` tokens (between attention and MLP), with ``D`` the embed dim::

    M_s, M_t  [r, D]   the size-weighted source tokens (ToMe's descending-similarity order) and,
                       for each, its destination as it was before any merge
    M_info  = LayerNorm(M_s + M_t)                    own LayerNorm(D), eps 1e-5, affine
    delta_D = W_r^T . M_info          [1, D]          W_r [r, 1]: perceives the token axis
    delta_r = M_info . W_D^T          [r, 1]          W_D [1, D]: perceives the channel axis
    M_hat   = 2 sigmoid(delta_D) * M_s                step 1 (re-activation, broadcast over rows)
    M_s    <- M_s + (2 sigmoid(delta_r) - 1) * M_hat  step 2 (broadcast over channels)

then ToMe scatter-sums the (modulated) sources into their destinations; token *sizes* are merged
without modulation. ``W_D`` starts at zero, so step 2 multiplies by ``2 sigmoid(0) - 1 = 0``
and PYRA is exactly LoRA+ToMe at initialisation. ``W_r`` starts Uniform(-1, 1) (the reference
code: kaiming_uniform(a=sqrt 5) on an [r, 1] tensor); the paper's "random Gaussian" is
``pyra_wr_init="gaussian"``. The modulator runs in training and inference: it is part of the
deployed model (LoRA merges into qkv, the modulator stays; ~4 r D FLOPs per block).

Usage::

    model = tokentune.create_model("vit_base_patch16_224.orig_in21k", method="pyra", num_classes=100,
                                   pretrained="ViT-B_16.npz", tome_r="high")   # or "low", a list, ...

``method="pyra"`` is ``lora+tome+pyra`` (the paper's system); ``"adapter+pyra"`` and
``"full+pyra"`` swap the tuning method. Options: ``pyra_<field>=...`` (:class:`PYRAConfig`);
the merge schedule is ToMe's ``tome_r`` and is fixed at build time because ``W_r`` has one row
per merged token of its block.

Parameter names (ours -> reference THU-MIG/PYRA checkpoints), see :func:`from_reference_state_dict`:

=============================================  ================================================
tokentune                                      reference
=============================================  ================================================
``blocks.{i}.merge.modulator.W_r``  [r_i, 1]   ``blocks.{i}.pyra_a``  [r_i, 1]
``blocks.{i}.merge.modulator.W_D``  [1, D]     ``blocks.{i}.pyra_b``  [1, D]
``blocks.{i}.merge.modulator.norm.weight``     ``blocks.{i}.pyra_norm.weight``
``blocks.{i}.merge.modulator.norm.bias``       ``blocks.{i}.pyra_norm.bias``
``blocks.{i}.attn.qkv.lora_A``  [rank, D]      ``blocks.{i}.attn.LoRA_a.weight``  [rank, D]
``blocks.{i}.attn.qkv.lora_B``  [3D, rank]     ``blocks.{i}.attn.LoRA_b.weight``  [3D, rank]
every other name (timm's)                      the same name (``patch_embed.*``, ``cls_token``,
                                               ``dist_token``, ``pos_embed``, ``blocks.{i}.norm1/
                                               attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2.*``,
                                               ``norm.*``, ``head.*``, ``head_dist.*``)
=============================================  ================================================

Ablation variants (``pyra_variant``, ``pyra_activation``) are described in :class:`PYRAConfig`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import load_weights_file
from .checkpoint import rename_keys
from .config import Recipe, register_recipe
from .errors import TokenTuneError
from .methods import Method, register_method
from .model import adapted_blocks
from .typecheck import check_fields

VARIANTS = ("pyra", "wr", "wd", "matrix", "gated_mlp")
WR_INITS = ("uniform", "gaussian")

# parameter-name regexes (used by the method registry, the paper count and optimizer groups)
TRAINABLE = r"\.merge\.modulator\."
NORM = r"\.merge\.modulator\.norm\."
GENERATOR = r"\.merge\.modulator\.(?!norm\.)"


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
    """

    variant: str = "pyra"
    activation: bool = True
    wr_init: str = "uniform"
    wr_std: float = 1.0
    norm_eps: float = 1e-5
    norm_affine: bool = True
    mlp_hidden: int = 4

    def __post_init__(self) -> None:
        check_fields(self, "pyra_")
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
        if v == "pyra":
            with torch.no_grad():
                if cfg.wr_init == "uniform":
                    self.W_r.uniform_(-1.0, 1.0)      # = kaiming_uniform(a=sqrt 5) on fan_in 1
                else:
                    self.W_r.normal_(0.0, cfg.wr_std)
        if v == "matrix":
            self.W = nn.Parameter(torch.zeros(self.r, dim))
        if v == "gated_mlp":
            self.down = nn.Linear(dim, cfg.mlp_hidden, bias=False)
            self.up = nn.Linear(cfg.mlp_hidden, dim, bias=False)
            nn.init.zeros_(self.up.weight)

    def extra_repr(self) -> str:
        return f"r={self.r}, dim={self.dim}, variant={self.variant}, activation={self.activation}"

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if src.shape[-2] != self.r:
            raise TokenTuneError(
                f"PYRA modulator was built for r={self.r} merged tokens but got {src.shape[-2]}; "
                "the merge schedule changed after building: rebuild the model with this schedule")
        v, act = self.variant, self.activation
        if v == "matrix":                                     # fixed learned W (ablation)
            w = 2 * torch.sigmoid(self.W) - 1 if act else self.W
            return src + src * w
        info = self.norm(src + dst)                           # M_info = LN(M_s + M_t)   [B, r, D]
        if v == "pyra":
            delta_D = self.W_r.transpose(0, 1) @ info         # W_r^T M_info             [B, 1, D]
            delta_r = info @ self.W_D.transpose(0, 1)         # M_info W_D^T             [B, r, 1]
            if act:
                step1 = 2 * torch.sigmoid(delta_D)            # M_hat = 2 sigma(delta_D) * M_s
                step2 = 2 * torch.sigmoid(delta_r) - 1        # M_s + (2 sigma(delta_r) - 1) * M_hat
            else:
                step1, step2 = delta_D, delta_r
            return src + (src * step1) * step2
        if v == "wr":
            delta = self.W_r.transpose(0, 1) @ info           # [B, 1, D]
        elif v == "wd":
            delta = info @ self.W_D.transpose(0, 1)           # [B, r, 1]
        else:                                                 # gated_mlp
            delta = self.up(F.gelu(self.down(info)))          # [B, r, D]
        w = 2 * torch.sigmoid(delta) - 1 if act else delta
        return src + src * w

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
            return 4 * r * d                                  # two [r]x[r,D] and [r,D]x[D] products
        if self.variant in ("wr", "wd"):
            return 2 * r * d
        if self.variant == "gated_mlp":
            return 4 * r * d * self.down.out_features
        return 0


# ----------------------------------------------------------------------------- method
def modulators(model: nn.Module) -> Dict[int, PYRAModulator]:
    """Block index -> its PYRA modulator."""
    out = {}
    for i, block in enumerate(adapted_blocks(model)):
        merge = getattr(block, "merge", None)
        mod = getattr(merge, "modulator", None) if merge is not None else None
        if isinstance(mod, PYRAModulator):
            out[i] = mod
    return out


def _apply_pyra(model: nn.Module, cfg: PYRAConfig, ctx) -> None:
    schedule = list(getattr(model, "tome_schedule", []))
    if not any(schedule):
        raise TokenTuneError(
            "PYRA needs a merge schedule: pass tome_r ('low'/'high' for ViT-B/16, ViT-L/16 and DeiT-B distilled, "
            "an int, a per-layer list, 'tokens:N' or 'flops:X')")
    dim = int(model.embed_dim)
    for block in adapted_blocks(model):
        if block.merge is not None and block.merge.r > 0:
            block.merge.modulator = PYRAModulator(block.merge.r, dim, cfg)


register_method(Method(
    "pyra", PYRAConfig, _apply_pyra, trainable=(TRAINABLE,), order=30, implies=("tome",), default_peft="lora",
    exclude_from_paper_count=(NORM,),
    summary="PYRA: learned modulation of the tokens ToMe merges (LoRA + ToMe + PYRA)"))


# ----------------------------------------------------------------------------- reports
def parameter_report(model: nn.Module) -> Dict[str, Any]:
    """PYRA's parameters as the paper counts them, plus the LayerNorms and the tuning method.

    Returns a dict with ``generator`` (W_r + W_D, or the variant's generator: the paper's count),
    ``norm`` (the modulators' LayerNorms, not counted by the paper), ``per_block`` (generator
    count per merging block), ``peft`` (the other trainable backbone parameters: LoRA, ...),
    ``paper_trainable`` = peft + generator, ``backbone`` and ``paper_pct``.
    """
    from .params import count_parameters

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


# ----------------------------------------------------------------------------- reference checkpoints
_TO_OURS = [
    (re.compile(r"^blocks\.(\d+)\.pyra_a$"), r"blocks.\1.merge.modulator.W_r"),
    (re.compile(r"^blocks\.(\d+)\.pyra_b$"), r"blocks.\1.merge.modulator.W_D"),
    (re.compile(r"^blocks\.(\d+)\.pyra_norm\.(weight|bias)$"), r"blocks.\1.merge.modulator.norm.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.LoRA_a\.weight$"), r"blocks.\1.attn.qkv.lora_A"),
    (re.compile(r"^blocks\.(\d+)\.attn\.LoRA_b\.weight$"), r"blocks.\1.attn.qkv.lora_B"),
]
_TO_REFERENCE = [
    (re.compile(r"^blocks\.(\d+)\.merge\.modulator\.W_r$"), r"blocks.\1.pyra_a"),
    (re.compile(r"^blocks\.(\d+)\.merge\.modulator\.W_D$"), r"blocks.\1.pyra_b"),
    (re.compile(r"^blocks\.(\d+)\.merge\.modulator\.norm\.(weight|bias)$"), r"blocks.\1.pyra_norm.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.lora_A$"), r"blocks.\1.attn.LoRA_a.weight"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.lora_B$"), r"blocks.\1.attn.LoRA_b.weight"),
]
# reference-only modules that PYRA runs leave empty; a non-empty one is another method
_UNSUPPORTED = re.compile(r"(visual_prompt|prefix_tokens|\.adapter\.|pre_logits\.)")


def from_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a THU-MIG/PYRA checkpoint (``{"model": ...}`` or a bare state dict) to our names.

    Shapes are identical on both sides (table in the module docstring); ``module.`` prefixes
    (DDP) are dropped. Visual-prompt, prefix and adapter tensors (other methods of that code
    base) are refused with a clear error.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    bad = sorted(k for k in state_dict if _UNSUPPORTED.search(k))
    if bad:
        raise TokenTuneError(f"reference checkpoint holds tensors of another method ({bad[0]}, ...); "
                             "only LoRA + ToMe + PYRA checkpoints convert")
    return rename_keys(state_dict, _TO_OURS)


def to_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our names -> the reference implementation's (inverse of :func:`from_reference_state_dict`).

    Only the default variant (W_r, W_D, LayerNorm) and LoRA on qkv exist in the reference; other
    PYRA variants or LoRA targets are refused.
    """
    bad = sorted(k for k in state_dict
                 if re.search(r"\.merge\.modulator\.(W|down|up)\b", k)
                 or re.search(r"\.lora_[AB]$", k) and ".attn.qkv." not in k)
    if bad:
        raise TokenTuneError(f"{bad[0]} has no counterpart in the reference implementation "
                             "(it only has PYRA's default variant and LoRA on qkv)")
    return rename_keys(state_dict, _TO_REFERENCE)


def reference_schedule(state_dict: Mapping[str, torch.Tensor]) -> List[int]:
    """The merge schedule a reference PYRA checkpoint was trained with (rows of each ``pyra_a``)."""
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    rows = {}
    for key, value in state_dict.items():
        m = re.match(r"^(?:module\.)?blocks\.(\d+)\.pyra_a$", key)
        if m:
            rows[int(m.group(1))] = int(value.shape[0])
    if not rows:
        raise TokenTuneError("no blocks.{i}.pyra_a in this checkpoint; it is not a PYRA checkpoint")
    depth = max(rows) + 1
    return [rows.get(i, 0) for i in range(depth)]


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                              strict: bool = True, *, trust_checkpoint: bool = False) -> Dict[str, List[str]]:
    """Load a reference PYRA checkpoint (path or state dict) into a tokentune PYRA model.

    With ``strict``, every PYRA/LoRA tensor of the model must be in the checkpoint and every
    checkpoint tensor must exist in the model; backbone tensors missing from the checkpoint are
    allowed (reference runs often save only trained weights). Returns ``missing``/``unexpected``.

    A path is read by :func:`tokentune.backbone.load_weights_file` with weights-only unpickling;
    a file pickling other objects than tensors, plain values and training arguments is refused
    with one line naming them. ``trust_checkpoint=True`` unpickles it fully: only for files you
    trust, it can run any code.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_weights_file(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)
    sd = from_reference_state_dict(checkpoint)
    want = model.state_dict()
    for key, value in sd.items():
        if key in want and tuple(want[key].shape) != tuple(value.shape):
            hint = ""
            if key.endswith(".W_r"):
                hint = (f"; the checkpoint was trained with tome_r={reference_schedule(checkpoint)}: "
                        "build the model with that schedule")
            raise TokenTuneError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape "
                                 f"{tuple(want[key].shape)}{hint}")
    unexpected = sorted(k for k in sd if k not in want)
    trained = re.compile(rf"{TRAINABLE}|\.lora_[AB]$")
    missing = sorted(k for k in want if k not in sd and trained.search(k))
    if strict and (unexpected or missing):
        first = (unexpected or missing)[0]
        what = "not in the model" if unexpected else "missing from the checkpoint"
        raise TokenTuneError(f"reference checkpoint does not fit: {first} is {what} "
                             f"({len(unexpected)} unexpected, {len(missing)} missing); check model name, "
                             "LoRA rank and merge schedule, or pass strict=False")
    model.load_state_dict(sd, strict=False)
    return {"missing": missing, "unexpected": unexpected}


# ----------------------------------------------------------------------------- recipes
_VTAB_TRAIN = dict(
    epochs=100, batch_size=32, grad_accum=1, lr=1e-3, min_lr=1e-5, warmup_epochs=10, warmup_lr=1e-6,
    schedule_step="epoch", weight_decay=1e-4, no_decay_norm_bias=True, opt_eps=1e-8, betas=(0.9, 0.999),
    param_groups={}, clip_grad=None, label_smoothing=0.0, amp="off", seed=0, drop_last=True, eval_every=10,
    train_split="train800val200", test_split="test", normalization="imagenet", image_size=224,
    interpolation="bicubic",
)
_VTAB_MODEL = dict(lora_rank=8, lora_alpha=None, lora_dropout=0.1, lora_targets=("qkv",), tome_r="high",
                   tome_prop_attn=True, pyra_variant="pyra", pyra_activation=True, pyra_wr_init="uniform",
                   drop_path_rate=0.1, head_init_std=0.02)

register_recipe(Recipe(
    "pyra-vtab", "pyra", model_options=dict(_VTAB_MODEL), train_options=dict(_VTAB_TRAIN),
    summary="PYRA VTAB-1k reference recipe for ViT-B/16 and DeiT-B (LoRA rank 8, 'high' schedule; "
            "tome_r='low' for ~1.7x)"))
register_recipe(Recipe(
    "pyra-vtab-large", "pyra", model_options=dict(_VTAB_MODEL, lora_rank=12), train_options=dict(_VTAB_TRAIN),
    summary="PYRA VTAB-1k reference recipe for ViT-L/16 (LoRA rank 12, 'high' schedule; tome_r='low' for ~1.7x)"))
