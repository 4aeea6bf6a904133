"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022, arXiv 2202.07800).

Reimplemented from the paper and the published behaviour of its official code (youweiliang/evit,
``evit.py``; no code of it is used). In each pruning block (default: indices 3, 6, 9 of a
12-block ViT, :mod:`tokentune.methods.pruning`), between attention and MLP::

    a_i  = 1/H sum_h softmax(q_cls^h K^h^T / sqrt(d))_i       CLS attention to token i, averaged
                                                              over heads (paper Eq. 1-2)
    K    = ceil(keep_rate * n)                                n non-prefix tokens, K kept
    keep = top-K of a (descending, as the reference's ``topk(sorted=True)``)
    x_f  = sum_{i not kept} a_i x_i                           the fused token (Eq. 3; the weights
                                                              are the raw attention values, not
                                                              renormalised, as the reference)
    x   <- [prefix tokens, x_keep, x_f]                        then the MLP on these tokens

The attention row comes from the block's own attention on the tokens it received (the reference
takes it from the same softmax; under SDPA we compute that single row, see
:func:`tokentune.core.attention.attention`). Prefix tokens (CLS, registers, distillation token,
VPT prompts) are never pruned; the attention of the *first* prefix token (CLS) ranks the others.
A fused token is an ordinary token in later blocks (it may be kept or fused again), as in the
reference. If ``K = n`` the block keeps everything and adds no fused token (the reference's
``left_tokens == N - 1`` case). Training and inference run the same pruned computation, so the
deployed model is the training-time model in eval mode (nothing to switch).

Keep-rate schedule (reference ``adjust_keep_rate``, ``--shrink_start_epoch 10 --shrink_epochs
100`` of 300 epochs): keep everything until ``shrink_start`` of training, then a half cosine from
1 to ``keep_rate`` until ``shrink_end``, then ``keep_rate``. The training loop applies it through
the method's ``on_step`` hook. Off by default (``shrink_end = 0``: ``keep_rate`` throughout).
Per-forward option ``model(x, evit_keep_rate=r)`` overrides the keep rate of every pruning block
(the reference's ``model(x, keep_rate)``), e.g. to evaluate at another rate.

PYRA on the fused token (``method="evit+pyra"``, an opt-in extension of PYRA beyond ToMe; see
:mod:`tokentune.methods.pyra`): the block's modulator rewrites the weighted inattentive tokens
``M_s = a_i x_i`` before they are summed; their target ``M_t`` is the fused token they form
(unmodulated), one row per source. W_r has one row per fused token, so the keep rate is fixed at
build time (no shrink schedule, no ``evit_keep_rate`` override that changes the count).

Keep-rate targets (``tokentune accelerate`` sets them; the resolved rate is what the model records):
``keep_rate="flops:X"`` is the largest keep rate whose analytic FLOPs (:func:`evit_flops`: the
attention on the tokens entering a block, the MLP on those left after its pruning, 2 FLOPs per
multiply-add as :mod:`tokentune.methods.tome.flops`) are at least ``X`` times below the unpruned
model's; ``keep_rate="tokens:N"`` the largest one that leaves at most ``N`` tokens after the last
block. A target beyond the smallest keep rate's is one line naming what is reachable.

Defaults: ``keep_rate=0.7`` with fusion, the paper's setting for DeiT-S/DeiT-B and the ViT-B/16
rows of DyT's Table 5. EViT has no parameters; ``"evit"`` alone trains the whole model (the
paper's setting), ``"lora+evit"``/``"adapter+evit"`` combine it with PEFT.
"""
from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.method import Method, register_method
from ..core.reduce import TokenReducer, keep_tokens, reducers
from ..core.state import TokenState
from ..core.vit import adapted_blocks, info_of, num_input_tokens, num_prefix
from ..core.weights import load_reference_state, read_checkpoint, rename_keys, state_dict_of
from ..errors import TokenTuneError
from ..typecheck import check_fields
from .pruning import PEFT_TENSORS, check_keep_rate, check_locations
from .tome.flops import ViTDims


@dataclass
class EViTConfig:
    """EViT options (defaults: the paper's DeiT / ViT-B/16 setting).

    Attributes:
        keep_rate: share of the non-prefix tokens each pruning block keeps, in (0, 1] (paper 0.7), or a
            target resolved for this backbone: ``"flops:X"`` (X times fewer FLOPs), ``"tokens:N"``
            (at most N tokens after the last block).
        locations: blocks that prune (0-based); None = a quarter, half and three quarters of the
            depth (3, 6, 9 for 12 blocks, the paper's ``drop_loc``).
        fuse: fuse the inattentive tokens into one token weighted by their CLS attention (the
            paper's EViT); false drops them.
        shrink_start: fraction of training that keeps every token before the keep rate starts
            to decrease (reference: 10 of 300 epochs); used only with ``shrink_end`` > 0.
        shrink_end: fraction of training at which the keep rate reaches ``keep_rate`` along a
            half cosine from 1 (reference: 110 of 300 epochs); 0 = ``keep_rate`` from the start.
    """

    keep_rate: Union[float, str] = 0.7
    locations: Optional[Sequence[int]] = None
    fuse: bool = True
    shrink_start: float = 0.0
    shrink_end: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "evit_")
        if isinstance(self.keep_rate, str):
            parse_rate_target(self.keep_rate)
        else:
            check_keep_rate("evit", self.keep_rate)
        if not 0.0 <= self.shrink_start <= 1.0 or not 0.0 <= self.shrink_end <= 1.0:
            raise TokenTuneError(f"evit_shrink_start and evit_shrink_end are fractions of training in [0, 1], "
                                 f"got {self.shrink_start} and {self.shrink_end}")
        if self.shrink_end and self.shrink_start > self.shrink_end:
            raise TokenTuneError(f"evit_shrink_start={self.shrink_start} is after evit_shrink_end={self.shrink_end}; "
                                 "the keep rate starts shrinking before it reaches keep_rate")


def kept_count(rate: float, tokens: int) -> int:
    """Non-prefix tokens a block keeps: ``ceil(rate * tokens)`` (reference ``left_tokens``)."""
    return min(tokens, math.ceil(rate * tokens))


class EViTReducer(TokenReducer):
    """Keeps the top-K tokens by CLS attention and fuses the rest (a block's ``reduce`` plug-in).

    Args:
        layer: index of its block.
        keep_rate: the keep rate in eval mode (and in training without a schedule).
        fuse: fuse the inattentive tokens into one.
        sources: fused tokens per image at the build-time token count (the rows a
            PYRA modulator gets).
    """

    needs_cls_attn = True

    def __init__(self, layer: int, keep_rate: float, fuse: bool = True, sources: int = 0) -> None:
        super().__init__()
        self.layer = int(layer)
        self.base_keep_rate = float(keep_rate)
        self.keep_rate = float(keep_rate)        # moves with the shrink schedule in training
        self.fuse = bool(fuse)
        self.sources = int(sources)
        self.varying_count = False               # True while a keep-rate schedule runs (PYRA refuses it)
        self.modulator: Optional[nn.Module] = None

    def extra_repr(self) -> str:
        return f"layer={self.layer}, keep_rate={self.base_keep_rate:g}, fuse={self.fuse}"

    def forward(self, x: torch.Tensor, state: TokenState,
                cls_attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, TokenState]:
        if cls_attn is None:
            raise TokenTuneError("EViT needs the CLS attention row of its block")
        rate = state.options.get("evit_keep_rate")
        if rate is None:
            rate = self.keep_rate if self.training else self.base_keep_rate
        else:                                   # model(x, evit_keep_rate=r): the same range as the option
            check_keep_rate("evit", float(rate))
        p = state.num_prefix
        n = x.shape[1] - p
        left = kept_count(float(rate), n)
        if left >= n:
            return x, state
        if left < 1:
            raise TokenTuneError(f"evit keep rate {rate} keeps no token of {n}; use a keep rate in (0, 1]")
        attn = cls_attn[:, p:]                                            # a_i of the non-prefix tokens
        keep = attn.topk(left, dim=1, largest=True, sorted=True)[1]       # [B, K]
        if not self.fuse:
            return keep_tokens(x, state, keep)
        # the others in ascending index order (the reference's complement_idx), then their weighted sum:
        # key n - i for a dropped token i, 0 for a kept one, so top-(n - K) lists the dropped ones by index
        # (topk instead of a stable sort, which graph exporters such as ONNX do not have)
        key = torch.arange(n, 0, -1, device=x.device, dtype=attn.dtype).expand_as(attn).scatter(1, keep, 0.0)
        rest = key.topk(n - left, dim=1, sorted=True)[1]                  # [B, n - K]
        tokens = x[:, p:].gather(1, rest.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        weighted = tokens * attn.gather(1, rest).unsqueeze(-1)          # M_s = a_i x_i
        if self.modulator is not None:                                  # PYRA on the fused token
            target = weighted.sum(dim=1, keepdim=True).expand_as(weighted)
            weighted = self.modulator(weighted, target)
        fused = weighted.sum(dim=1, keepdim=True)                       # x_f = sum a_i x_i
        return keep_tokens(x, state, keep, fused, rest)


def evit_reducers(model: nn.Module) -> List[EViTReducer]:
    """The model's EViT reducers, in block order."""
    return [r for r in reducers(model) if isinstance(r, EViTReducer)]


def token_path(num_tokens: int, prefix: int, locations: Sequence[int], keep_rate: float, fuse: bool,
               depth: int) -> Tuple[List[int], Dict[int, int]]:
    """Tokens entering each block and after the last, and the fused/dropped tokens per pruning block."""
    counts, fused, n = [], {}, num_tokens
    for i in range(depth):
        counts.append(n)
        if i in locations:
            left = kept_count(keep_rate, n - prefix)
            if left < n - prefix:
                fused[i] = n - prefix - left
                n = prefix + left + (1 if fuse else 0)
    counts.append(n)
    return counts, fused


def parse_rate_target(spec: str) -> Tuple[str, float]:
    """``"flops:2"`` / ``"tokens:40"`` -> (kind, value); anything else is one line."""
    kind, _, value = spec.partition(":")
    if kind in ("flops", "tokens") and ":" in value:
        profile = value.partition(":")[2]
        raise TokenTuneError(f"evit_keep_rate {spec!r}: EViT's rate is one keep rate at fixed blocks, so a schedule "
                             f"profile has no meaning; drop ':{profile}'")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if kind not in ("flops", "tokens") or not number > 0 or (kind == "tokens" and number != int(number)):
        raise TokenTuneError(f"invalid evit_keep_rate {spec!r}: give a share in (0, 1], 'flops:X' (X >= 1 times fewer "
                             "FLOPs) or 'tokens:N' (N tokens after the last block)")
    return kind, number


def evit_flops(dims: ViTDims, keep_rate: float, locations: Sequence[int], fuse: bool) -> int:
    """FLOPs per image (2 per multiply-add; matrix products only) under EViT: attention on the tokens
    entering each block, the MLP on those its pruning leaves (the CLS row's ranking is not counted)."""
    counts, _ = token_path(dims.num_tokens, dims.num_prefix, locations, keep_rate, fuse, dims.depth)
    inner = dims.heads * dims.head_dim
    total = dims.stem_flops + dims.head_flops
    for i in range(dims.depth):
        n, left = counts[i], counts[i + 1]
        total += 2 * n * dims.attn_linear_macs + 2 * (2 * n * n * inner) + 2 * left * dims.mlp_linear_macs
    return total


def resolve_keep_rate(model: nn.Module, spec: str, locations: Sequence[int], fuse: bool) -> float:
    """The largest keep rate (to 1e-4) meeting a ``"flops:X"`` / ``"tokens:N"`` target on ``model``."""
    kind, value = parse_rate_target(spec)
    dims = ViTDims.from_model(model)

    def measure(rate: float) -> float:
        if kind == "flops":
            return evit_flops(dims, 1.0, locations, fuse) / evit_flops(dims, rate, locations, fuse)
        return -float(token_path(dims.num_tokens, dims.num_prefix, locations, rate, fuse, dims.depth)[0][-1])

    goal = value if kind == "flops" else -value
    lowest = 1e-4
    if measure(lowest) < goal:
        reach = (f"a FLOPs ratio of {measure(lowest):.3f}" if kind == "flops"
                 else f"{-measure(lowest):.0f} final tokens")
        raise TokenTuneError(f"evit_keep_rate {spec!r} is out of reach for this model: keeping the fewest tokens at "
                             f"blocks {list(locations)} gives {reach}; ask for at most that (or prune earlier, "
                             "evit_locations)")
    lo, hi = lowest, 1.0                   # measure(lo) reaches the goal; find the largest such rate
    if measure(hi) >= goal:
        return 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(mid) >= goal else (lo, mid)
    rounded = math.floor(lo * 1e4) / 1e4         # a readable rate, when it still meets the target
    return rounded if rounded >= lowest and measure(rounded) >= goal else lo


def apply_evit(model: nn.Module, cfg: EViTConfig, ctx) -> EViTConfig:
    blocks = adapted_blocks(model)
    locations = check_locations("evit", cfg.locations, len(blocks))
    if getattr(model, "cls_token", None) is None:
        raise TokenTuneError("EViT ranks tokens by the CLS token's attention, and this model has no class token; "
                             "use a ViT with a class token (class_token=True)")
    if isinstance(cfg.keep_rate, str):
        cfg = replace(cfg, keep_rate=resolve_keep_rate(model, cfg.keep_rate, locations, cfg.fuse))
    _, fused = token_path(num_input_tokens(model), num_prefix(model), locations, cfg.keep_rate, cfg.fuse, len(blocks))
    for i in locations:
        blocks[i].reduce = EViTReducer(i, cfg.keep_rate, cfg.fuse, fused.get(i, 0) if cfg.fuse else 0)
        blocks[i].reduce.varying_count = bool(cfg.shrink_end)
    cfg = replace(cfg, locations=list(locations))
    model.tokentune.state["evit"] = cfg
    return cfg


def shrink_keep_rate(progress: float, cfg: EViTConfig) -> float:
    """The training keep rate at ``progress`` in [0, 1] (reference ``adjust_keep_rate``)."""
    if not cfg.shrink_end:
        return cfg.keep_rate
    if progress < cfg.shrink_start:
        return 1.0
    if progress >= cfg.shrink_end:
        return cfg.keep_rate
    t = (progress - cfg.shrink_start) / (cfg.shrink_end - cfg.shrink_start)
    return cfg.keep_rate + (1.0 - cfg.keep_rate) * (math.cos(t * math.pi) + 1.0) * 0.5


def update_keep_rate(model: nn.Module, progress: float) -> float:
    """Apply the keep-rate schedule at ``progress`` = step / total steps (the ``on_step`` hook)."""
    info = info_of(model)
    cfg = info.state.get("evit") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no EViT; build it with method='evit'")
    rate = shrink_keep_rate(progress, cfg)
    for r in evit_reducers(model):
        r.keep_rate = rate
    return rate


# ----------------------------------------------------------------------------- reference checkpoints
# youweiliang/evit@5ca95a7 (main.py, evit.py) saves {"model", "optimizer", "lr_scheduler", "epoch", "model_ema",
# "scaler", "args"}; its model is DeiT with timm's names, so every tensor keeps its name here. EViT has
# no parameters: the keep rate, locations and fusion are in the training arguments (--base_keep_rate,
# --drop_loc, --fuse_token), which must match the model's options.


def check_reference_args(args: Any, cfg: EViTConfig) -> None:
    """The EViT options a reference run was trained with (its ``args``) against the model's."""
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    rate, loc, fuse = get("base_keep_rate"), get("drop_loc"), get("fuse_token")
    if isinstance(loc, str):
        try:
            loc = ast.literal_eval(loc)
        except (ValueError, SyntaxError):
            loc = None
    found = {"evit_keep_rate": rate, "evit_locations": None if loc is None else [int(i) for i in loc], "evit_fuse": fuse}
    have = {"evit_keep_rate": cfg.keep_rate, "evit_locations": list(cfg.locations or []), "evit_fuse": cfg.fuse}
    for key, value in found.items():
        if value is not None and value != have[key]:
            raise TokenTuneError(f"the EViT reference checkpoint was trained with {key}={value}, this model has "
                                 f"{have[key]}; build it with {key}={value}")


def load_reference_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                              trust_checkpoint: bool = False) -> List[str]:
    """Load an official EViT checkpoint (youweiliang/evit; path or loaded dict) into an EViT model.

    Names are timm's on both sides (``module.`` prefixes dropped); every tensor of the checkpoint
    must be used and every tensor of the model present, except those of a PEFT method combined with
    EViT (``lora+evit``: LoRA, adapters, prompts keep their values; returned). When the file holds
    the run's training arguments, their keep rate, pruning locations and fusion must be the model's
    (one line naming the option otherwise).

    A path is read weights-only (:func:`tokentune.core.weights.read_checkpoint`); ``trust_checkpoint=True``
    unpickles fully: only for files you trust, it can run any code.
    """
    info = info_of(model)
    cfg = info.state.get("evit") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no EViT; build it with method='evit' (or 'lora+evit', ...)")
    if isinstance(checkpoint, (str, os.PathLike)):
        tensors, args = read_checkpoint(os.fspath(checkpoint), trust_checkpoint=trust_checkpoint)
    else:
        tensors, args = state_dict_of(checkpoint), checkpoint.get("args")
    if args is not None:
        check_reference_args(args, cfg)
    tensors = rename_keys(tensors, [])
    return load_reference_state(model, tensors, source="EViT reference checkpoint", ours_only=PEFT_TENSORS,
                                fix="check the model name, num_classes and img_size (the reference: DeiT at 224 px)")


register_method(Method(
    "evit", EViTConfig, apply_evit, order=21, reduces_tokens=True, default_peft="full", on_step=update_keep_rate,
    training_free=True, rate_option="keep_rate",
    summary="EViT: keep the tokens the CLS token attends to most, fuse the others into one (no parameters)"))
