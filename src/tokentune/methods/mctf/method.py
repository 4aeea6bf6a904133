"""MCTF's options, the reducer a merging block runs (one-step-ahead attention), its FLOPs and
schedule targets, its training loss and its registration.

Adapted from mlvlab/MCTF @ 2004da0c (MIT licence): ``models/modules/blocks.py`` (where the
merge runs), ``models/SA/MHSA.py`` (attention from the merged attention map), ``models/deit.py``
(teacher with a random r, consistency) and ``engine.py:41-59`` (the loss).

One-step-ahead attention (``one_step_ahead=1``, the reference's default): in a merging block the
attention map ``P = softmax(q k^T / sqrt(d) + log s)`` of the tokens *entering* the block gives the
informativeness ``a`` (mean over heads and queries); the tokens merge (:mod:`.matching`), and the
block's attention uses ``P`` merged instead of recomputing it: keys summed, queries pooled with
the weights ``w`` of the tokens, ``P'`` times the values of the merged tokens. We compute the same
thing without merging the [N, N] map: ``P' v' = pool_w(P v'[dest])`` (``v'[dest]``: every input
token takes the value of the token it merged into), one product at N tokens and one pooling of
[N, C], exact in values and gradients. ``one_step_ahead=2`` (the reference's "precise"): ``P``
without gradient, merge, then ordinary attention on the merged tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...core.attention import attention, project_qkv
from ...core.block import AdaptedEvaBlock
from ...core.method import Method, register_method
from ...core.reduce import TokenReducer
from ...core.state import TokenState
from ...core.vit import adapted_blocks, info_of
from ...errors import TokenTuneError
from ...typecheck import check_fields
from ...utils import unwrap_model
from ..tome.flops import ViTDims
from ..tome.schedules import parse_target
from .matching import POOLINGS, fusion, merge_amax, merge_count, pool_weights, scores

Rate = Union[int, float, List[int], str]


@dataclass
class MCTFConfig:
    """MCTF options (defaults: the reference README's fine-tuning and evaluation setting, DeiT-S,
    ``--mctf_type [16,8,0,1,1,1,20,40,1,1,0] --activate_layer [1..11] --task_type [1,1,0.4]
    --task_weight [1.0,1.0,3.0]``; its argparse defaults differ: see docs/baselines.md).

    Attributes:
        r: tokens merged per merging block: a whole number, a fraction (< 1) of the non-prefix
            tokens entering the block, one whole number per block (a list), or a target for this
            backbone (``"flops:X"``: X times fewer FLOPs, ``"tokens:N"``: N tokens left; with
            ``":geometric"``, e.g. ``"flops:3.46:geometric"``, the target is met by one fraction instead of
            one whole number). At least 10 tokens stay and at most half the non-prefix tokens merge per
            block (the reference's rules).
        layers: blocks that merge (0-based); None = every block but the first (the reference's 1..11).
        one_step_ahead: 1 = merge at the block input and attend with the merged attention map
            (default); 2 = merge with the attention map, then recompute attention ("precise").
        tau_sim: temperature of the similarity criterion (0 = off).
        tau_info: temperature of the informativeness criterion (0 = off).
        tau_size: temperature of the size criterion (0 = off).
        bidirection: bidirectional matching (A -> B, then B -> A on the remaining tokens).
        pooling: how merged tokens are averaged: "attention" (attention x size, the default),
            "size" (by size, as ToMe) or "mean".
        prop_attn: add log(size) to the attention logits (proportional attention).
        trace_source: record which patches every token stands for (visualisation).
        pool_by_size: with an average-pool head, weight tokens by their size (as ToMe).
        teacher_r: training: the teacher pass merges a random r in [0, teacher_r) per forward
            (a fraction when < 1); 0 = the teacher merges nothing.
        teacher_weight: training: weight of the teacher pass's loss (0 = no teacher loss).
        consistency_weight: training: weight of the consistency loss between the teacher's and
            the student's final class token (0 = off).
        consistency_threshold: training: the consistency loss counts the images whose student
            probability of the label exceeds this.
    """

    r: Rate = 16
    layers: Optional[Sequence[int]] = None
    one_step_ahead: int = 1
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True
    pooling: str = "attention"
    prop_attn: bool = True
    trace_source: bool = False
    pool_by_size: bool = True
    teacher_r: float = 8
    teacher_weight: float = 1.0
    consistency_weight: float = 3.0
    consistency_threshold: float = 0.4

    def __post_init__(self) -> None:
        check_fields(self, "mctf_")
        if isinstance(self.r, str) and parse_target(self.r) is None:
            raise TokenTuneError(f"invalid mctf_r {self.r!r}; give a number, a per-block list, 'flops:X' or 'tokens:N'")
        values = self.r if isinstance(self.r, (list, tuple)) else [] if isinstance(self.r, str) else [self.r]
        if any(v < 0 for v in values):
            raise TokenTuneError(f"mctf_r must be >= 0, got {self.r!r}")
        if self.one_step_ahead not in (1, 2):
            raise TokenTuneError(f"mctf_one_step_ahead={self.one_step_ahead} is not supported; use 1 (merged attention "
                                 "map) or 2 (recomputed); merging after the MLP (the reference's 0) is not implemented")
        if self.pooling not in POOLINGS:
            raise TokenTuneError(f"unknown mctf_pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        for name in ("tau_sim", "tau_info", "tau_size", "teacher_r", "teacher_weight", "consistency_weight"):
            if getattr(self, name) < 0:
                raise TokenTuneError(f"mctf_{name} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- the merging block
def _qk_probs(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention map [B, H, N, N] of the block's attention on ``x`` (normalised tokens): one product
    writes the logits, the bias is added in place, one softmax (two [B, H, N, N] tensors, not three)."""
    qkv = getattr(attn, "qkv", None)
    if type(qkv) is nn.Linear and getattr(attn, "q_bias", None) is None:     # only q and k, as the reference
        B, N, C = x.shape
        H, D = attn.num_heads, attn.head_dim
        n = H * D
        bias_qk = qkv.bias[:2 * n] if qkv.bias is not None else None
        qk = F.linear(x, qkv.weight[:2 * n], bias_qk).reshape(B, N, 2, H, D)
        # one copy into [2, B, H, N, D]: q and k contiguous per head, so the product reads k transposed
        # in place (a view of k's [B, N, H, D] rows would be copied transposed, and q once more)
        q, k = qk.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    else:
        q, k, _ = project_qkv(attn, x)
        q, k = q.contiguous(), k.contiguous()
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits.add_(bias.to(logits.dtype))
    return logits.softmax(dim=-1)


def _values(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Values [B, N, H * D] of the block's attention on ``x`` (token rows, heads side by side)."""
    qkv = getattr(attn, "qkv", None)
    if type(qkv) is nn.Linear and getattr(attn, "q_bias", None) is None:
        n = attn.num_heads * attn.head_dim
        bias_v = qkv.bias[2 * n:] if qkv.bias is not None else None
        return F.linear(x, qkv.weight[2 * n:], bias_v)
    v = project_qkv(attn, x)[2]
    return v.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class MCTFMerge(TokenReducer):
    """The reduction a merging block runs at its input (it runs the block's attention itself).

    ``r`` is this block's merge count (or fraction); the per-forward option ``mctf_r`` overrides it
    (the reference's ``r_eval``, and the teacher's random r in training).
    """

    runs_attention = True
    merges = True

    def __init__(self, r: float, cfg: MCTFConfig) -> None:
        super().__init__()
        self.r = r
        self.one_step_ahead = cfg.one_step_ahead
        self.taus = (cfg.tau_sim, cfg.tau_info, cfg.tau_size)
        self.bidirection = bool(cfg.bidirection)
        self.pooling = cfg.pooling

    def extra_repr(self) -> str:
        return f"r={self.r}, one_step_ahead={self.one_step_ahead}"

    def attention(self, block: nn.Module, x: torch.Tensor, state: TokenState):
        B, N, C = x.shape
        p = state.num_prefix
        r = merge_count(state.options.get("mctf_r", self.r), N, p)
        xn = block.norm1(x)
        if r <= 0:                          # nothing merges: the block's ordinary attention
            return x, state, attention(block.attn, xn, bias=state.attn_bias())[0]
        if self.one_step_ahead == 2:
            with torch.no_grad():
                probs = _qk_probs(block.attn, xn, state.attn_bias())
        else:
            probs = _qk_probs(block.attn, xn, state.attn_bias())
        info = probs.detach().mean(dim=(1, 2))                               # attention received [B, N]
        w = scores(x, info, state.size, p, *self.taus)
        f = fusion(w, r, N, p, self.bidirection)
        out = f.out_tokens
        # the pooling weights of the kept and the merged rows, each divided by its group's sum
        weight = pool_weights(self.pooling, info, state.size, x).to(x.dtype).reshape(B * N, 1)
        w_keep, w_src = weight.index_select(0, f.keep), weight.index_select(0, f.src)
        norm = w_keep.index_add(0, f.dst, w_src)
        w_keep, w_src = w_keep / norm, w_src / norm.index_select(0, f.dst)
        merged = f.pool(x, w_keep, w_src)
        changes = {"size": f.pool(state.size if state.size is not None else x.new_ones(B, N, 1))}
        if state.trace_source:
            source = state.source if state.source is not None else \
                torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
            changes["source"] = merge_amax(source, f.rows, out)
        state = state.replace(**changes)
        xn = block.norm1(merged)
        if self.one_step_ahead == 2:
            return merged, state, attention(block.attn, xn, bias=state.attn_bias())[0]
        attn = block.attn
        H, D = attn.num_heads, attn.head_dim
        # v'[dest] [B, H, N, D]: every input token takes the values of the token it merged into, one
        # row selection of the [B * (N - r) * H, D] value rows in (image, head, token) order
        heads = torch.arange(H, device=x.device)
        v_src = _values(attn, xn).reshape(B * out * H, D).index_select(
            0, (f.rows.view(B, 1, N) * H + heads[:, None]).reshape(-1)).view(B, H, N, D)
        h = attn.attn_drop(probs) @ v_src                                    # P v'[dest], [B, H, N, D]
        h = f.pool(h.transpose(1, 2).reshape(B, N, -1), w_keep, w_src)      # the queries pooled as the tokens
        if hasattr(attn, "norm"):
            h = attn.norm(h)
        return merged, state, attn.proj_drop(attn.proj(h))


# ----------------------------------------------------------------------------- schedules and FLOPs
def merging_blocks(cfg: MCTFConfig, depth: int) -> List[int]:
    """The blocks that merge (checked against the depth)."""
    layers = list(range(1, depth)) if cfg.layers is None else [int(i) for i in cfg.layers]
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise TokenTuneError(f"mctf_layers has block {bad[0]} but the model has {depth} blocks (0..{depth - 1})")
    return sorted(set(layers))


def per_block(r, layers: Sequence[int], depth: int) -> List[float]:
    """One r per block (0 outside ``layers``)."""
    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise TokenTuneError(f"mctf_r has {len(r)} entries but the model has {depth} blocks; give one per block")
        return [float(v) if i in layers else 0.0 for i, v in enumerate(r)]
    return [float(r) if i in layers else 0.0 for i in range(depth)]


def token_counts(rates: Sequence[float], num_tokens: int, num_prefix: int) -> List[int]:
    """Tokens entering each block and after the last, under MCTF's per-block rules."""
    counts = [num_tokens]
    for r in rates:
        counts.append(counts[-1] - (merge_count(r, counts[-1], num_prefix) if r > 0 else 0))
    return counts


def mctf_flops(dims: ViTDims, rates: Sequence[float], one_step_ahead: int = 1) -> int:
    """Forward FLOPs per image (2 per multiply-add) of a deployed MCTF model, as it computes them:
    a merging block's q/k projection and attention map at the N tokens entering it, the matching
    on the tokens (``|A| |B| D``), values, ``P v'[dest]`` (N x N), projection and MLP at N - r
    (one-step-ahead 2: the map without values, then full attention at N - r)."""
    inner = dims.heads * dims.head_dim
    qkv = 3 * dims.dim * inner
    proj = dims.attn_linear_macs - qkv
    total = dims.stem_flops + dims.head_flops
    counts = token_counts(rates, dims.num_tokens, dims.num_prefix)
    for n, m in zip(counts, counts[1:]):
        if m == n:
            total += 2 * (n * dims.attn_linear_macs + 2 * n * n * inner + n * dims.mlp_linear_macs)
            continue
        p = dims.num_prefix
        macs = n * qkv * 2 // 3 + n * n * inner + ((n - p + 1) // 2) * ((n - p) // 2) * dims.dim
        if one_step_ahead == 2:
            macs += m * dims.attn_linear_macs + 2 * m * m * inner
        else:
            macs += m * (qkv // 3 + proj) + n * n * inner
        total += 2 * (macs + m * dims.mlp_linear_macs)
    return total


#: the target profiles MCTF's r takes: one whole r per merging block ("constant") or one fraction of the
#: tokens entering each merging block ("geometric": the reference's r < 1, e.g. MCTF-Fast's r = 0.35)
RATE_PROFILES = ("constant", "geometric")


def resolve_rate(model: nn.Module, cfg: MCTFConfig) -> List[float]:
    """One r per block; ``"flops:X"``/``"tokens:N"`` become the whole numbers of the gentlest
    schedule that reaches the target (the same r in every merging block, then the last blocks
    give back what is not needed); with ``":geometric"`` the smallest fraction (4 decimals) that
    reaches it, the same in every merging block (:func:`_fraction_for`)."""
    blocks = adapted_blocks(model)
    layers = merging_blocks(cfg, len(blocks))
    if not isinstance(cfg.r, str):
        return per_block(cfg.r, layers, len(blocks))
    kind, value, profile = parse_target(cfg.r)
    if profile not in RATE_PROFILES:
        raise TokenTuneError(f"mctf_r={cfg.r!r}: MCTF's r is one whole number per merging block (constant profile) or "
                             f"one fraction of the tokens (':geometric'); drop ':{profile}' or use ':geometric'")
    dims = ViTDims.from_model(model)
    dense = mctf_flops(dims, [0] * len(blocks))

    def reaches(rates) -> bool:
        if kind == "tokens":
            return token_counts(rates, dims.num_tokens, dims.num_prefix)[-1] <= value
        return dense / mctf_flops(dims, rates, cfg.one_step_ahead) >= value

    if profile == "geometric":
        return _fraction_for(reaches, layers, len(blocks), cfg.r)
    rates = next((per_block(r, layers, len(blocks)) for r in range(dims.num_tokens + 1)
                  if reaches(per_block(r, layers, len(blocks)))), None)
    if rates is None:
        raise TokenTuneError(f"mctf_r={cfg.r!r} is out of reach for this model (merging in blocks {layers}); "
                             "ask for less")
    for i in reversed(layers):
        while rates[i] > 0 and reaches(rates[:i] + [rates[i] - 1] + rates[i + 1:]):
            rates = rates[:i] + [rates[i] - 1] + rates[i + 1:]
    return rates


def _fraction_for(reaches, layers: Sequence[int], depth: int, spec: str) -> List[float]:
    """The smallest fraction ``r < 1`` (rounded up to 4 decimals) whose schedule ``reaches`` the target:
    every merging block merges ``int((t - p) r)`` of its ``t`` tokens (the reference's fractional r,
    ``utils/mctf.py:26``), at most half; the token path shrinks monotonically as ``r`` grows."""
    top = 0.5                                 # every merging block merges half its non-prefix tokens
    if not reaches(per_block(top, layers, depth)):
        raise TokenTuneError(f"mctf_r={spec!r} is out of reach for this model (merging in blocks {list(layers)}); "
                             "ask for less")
    lo, hi = 0.0, top
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reaches(per_block(mid, layers, depth)) else (mid, hi)
    rounded = min(math.ceil(hi * 1e4) / 1e4, top)   # a readable rate, when it still meets the target
    return per_block(rounded if reaches(per_block(rounded, layers, depth)) else hi, layers, depth)


def apply_mctf(model: nn.Module, cfg: MCTFConfig, ctx) -> MCTFConfig:
    blocks = adapted_blocks(model)
    if any(isinstance(b, AdaptedEvaBlock) for b in blocks):
        raise TokenTuneError("MCTF is implemented for timm's VisionTransformer class; this is an Eva model "
                             "(use tome for token merging on Eva)")
    rates = resolve_rate(model, cfg)
    for block, r in zip(blocks, rates):
        block.reduce = MCTFMerge(int(r) if r >= 1 else r, cfg) if r > 0 else None
    info = model.tokentune
    info.prop_attn = cfg.prop_attn
    info.trace_source = cfg.trace_source
    info.pool_by_size = cfg.pool_by_size
    if isinstance(cfg.r, str):                # a target: recorded as what it resolved to
        fraction = next((v for v in rates if 0 < v < 1), None)
        cfg = replace(cfg, r=fraction if fraction is not None else [int(v) for v in rates])
    info.state["mctf"] = cfg
    return cfg


def config_of(model: nn.Module) -> MCTFConfig:
    info = info_of(model)
    cfg = info.state.get("mctf") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no MCTF; build it with method='...+mctf'")
    return cfg


# ----------------------------------------------------------------------------- training
def teacher_rate(r_max: float) -> float:
    """The teacher's r for one forward (reference ``deit.py:167-169``): uniform in [0, r_max)
    (whole numbers; hundredths when ``r_max < 1``), drawn from torch's generator."""
    if not r_max:
        return 0
    if r_max < 1:
        return float(torch.randint(0, int(r_max * 100), size=(1,))) / 100
    return int(torch.randint(0, int(r_max), size=(1,)))


def confidence(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The student's probability of the label [B] (soft targets, e.g. mixup: of the two largest
    target classes, as the reference adds the probabilities of both mixed labels)."""
    probs = logits.detach().softmax(dim=-1)
    if targets.dim() == 1:
        return probs.gather(1, targets[:, None].long())[:, 0]
    top = targets.topk(min(2, targets.shape[1]), dim=1)[1]
    return probs.gather(1, top).sum(dim=1)


def mctf_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
              criterion) -> Tuple[torch.Tensor, Dict[str, float]]:
    """MCTF's training loss (the method's ``loss`` hook; reference ``engine.py:41-59``)::

        L = CE(student) + teacher_weight * CE(teacher)
              + consistency_weight * sum_i c_i ||f_T(x_i)^- - f_S(x_i)||^2 / D / sum_i c_i

    the student merges ``r``, the teacher (same weights, with gradient) a random r per forward,
    ``f`` the final class token (pre-logits features), ``^-`` no gradient, ``c_i`` = 1 when the
    student's probability of the label exceeds ``consistency_threshold``. Task models (segmentation,
    video) have no class token: their loss is the task's criterion on the student and the teacher.
    """
    cfg = config_of(model)
    inner = unwrap_model(model)
    task = inner._modules.get("task_head") is not None          # segmentation / video: no class token
    consistent = cfg.consistency_weight > 0 and not task
    extra = {} if task else dict(return_state=True, return_tokens=True)
    out = model(images, **extra)
    logits, state, tokens = out if not task else (out, None, None)
    loss = criterion(logits, targets)
    logs: Dict[str, float] = {"ce": float(loss.detach())}
    if cfg.teacher_weight <= 0 and not consistent:
        return loss, logs
    r_teacher = teacher_rate(cfg.teacher_r)
    out = model(images, mctf_r=r_teacher, **extra)
    t_logits, t_state, t_tokens = out if not task else (out, None, None)
    logs["teacher_r"] = float(r_teacher)
    if cfg.teacher_weight > 0:
        t_ce = criterion(t_logits, targets)
        loss = loss + cfg.teacher_weight * t_ce
        logs["teacher_ce"] = float(t_ce.detach())
    if consistent:
        f_s = inner.forward_head_sized(tokens, state, pre_logits=True)
        f_t = inner.forward_head_sized(t_tokens, t_state, pre_logits=True).detach()
        per_image = (f_t - f_s).pow(2).mean(dim=1)
        passed = (confidence(logits, targets) > cfg.consistency_threshold).to(per_image.dtype)
        count = passed.sum()
        if float(count) > 0:
            consistency = (per_image * passed).sum() / count
            loss = loss + cfg.consistency_weight * consistency
            logs["consistency"] = float(consistency.detach())
        logs["confident"] = float(count) / max(len(passed), 1)
    return loss, logs


register_method(Method(
    "mctf", MCTFConfig, apply_mctf, order=24, reduces_tokens=True, loss=mctf_loss, training_free=True,
    rate_option="r", rate_profiles=RATE_PROFILES,
    summary="MCTF: multi-criteria token fusion (similarity, informativeness, size), one-step-ahead attention"))
