"""DTEM: decoupled token embedding for merging (Lee et al., NeurIPS 2024, arXiv 2412.10569).

Reimplemented from the paper and the behaviour of its official code (movinghoon/DTEM @ 13f20463,
``dtem/dtem.py``, ``dtem/utils.py``, ``train.py``; that repository has no licence, so none of its
code is used). DTEM is ToMe whose merge metric is not the keys but the output of a small learned
*embedding module*, decoupled from the backbone, trained through a differentiable soft grouping:

* **Embedding** (``dtem.py:11-47``): ``e = W_m LN1(x) + b_m`` per block (``feat_dim`` = the head
  size, twice that for widths >= 1024), read from the attention's input with the gradient stopped
  (``input.detach()``), so training it never moves the backbone. Initialised as ``nn.Linear``
  (random: no copy of the keys).
* **Attention** (``dtem.py:71-83``): ``A_ij = exp(q_i k_j / sqrt(d) - max) s_j / sum_j (...)`` with
  token sizes ``s`` in every block, q scaled before the product (proportional attention; see
  :func:`tokentune.core.attention.softmax_sized`).
* **Inference** (``dtem.py:193-201``): ToMe's bipartite soft matching on the normalised embedding
  (:func:`tokentune.methods.tome.bipartite_soft_matching`, the same algorithm, prefix tokens
  protected) and the size-weighted merge; ``r`` tokens leave per block.
* **Training** (``dtem.py:113-191``), no token is removed. Among the ``n`` tokens still in play
  (prefix tokens excluded), A = the 1st, 3rd, ... and B = the 2nd, 4th, ... (note: the opposite
  parity of ToMe's split, as the reference); ``S = a b^T`` (cosine); each A row keeps its top
  ``k2`` scores, divided by ``tau1``; then ``r`` rounds of a softmax over all ``|A| k2`` entries at
  temperature ``tau2`` (so ``tau1 tau2 = 0.01`` effectively), each round adding
  ``log(max(1 - row mass, eps))`` to its rows; ``P`` = the summed rounds, each row divided by
  ``max(sum_row - 1, 0) + 1`` (detached). Then::

      x_b <- (s_b x_b + P^T (s_a x_a)) / (s_b + P^T s_a)      s_b <- s_b + P^T s_a
      s_a <- s_a * c,   c = (1 - sum_row P) clamped to [0, 1] in the forward, identity gradient

  and the ``n`` tokens are re-ordered by descending soft size (``argsort(descending=True)``, the
  reference's own call: exact ties keep the order torch's sort gives them); the last ``r`` of them
  take no part in later matching (:attr:`tokentune.core.state.TokenState.soft_tokens`) but stay in
  attention with their small sizes.

Differences from the reference (docs/baselines.md, "DTEM"): the reference fuses ``qkv`` and the
embedding into one ``Linear`` whose weights are copied only when ``.eval()`` is called
(``dtem.py:24-37``), so weights loaded or changed after ``.eval()`` are silently ignored; here the
embedding is its own ``Linear`` read at every forward (nothing can go stale; one more small matrix
product per merging block). The reference normalises the eval metric twice (``dtem.py:195`` and
``utils.py:30``), here once. Softmax in float32 only on the soft (training) path; in eval,
proportional attention adds ``log s`` (the same weights). Prefix tokens beyond CLS (registers,
VPT prompts) are protected as ToMe protects them. Blocks with ``r = 0`` get no embedding.

Not training-free: untrained, the embedding is a random projection (the reference has no
initialisation that reproduces ToMe), so ``training_free=False``; ``dtem_r`` takes ToMe's
schedules and the ``"flops:X"`` / ``"tokens:N"`` targets (the embedding's cost included).

Reference checkpoints: ``blocks.{i}.attn.qkv.metric_layer.{weight,bias}`` is
``blocks.{i}.merge.embed.{weight,bias}`` here, ``blocks.{i}.attn.qkv.qkv_layer.*`` is timm's
``blocks.{i}.attn.qkv.*``, and the fused copy ``blocks.{i}.attn.qkv.{weight,bias}`` is dropped
(:func:`load_reference_checkpoint`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.method import Method, register_method
from ..core.rope import reorder_rope
from ..core.state import TokenState
from ..core.vit import adapted_blocks
from ..errors import TokenTuneError
from ..typecheck import check_fields
from .tome import TokenMerging, ViTDims, resolve_merge_schedule
from .tome.schedules import PROFILES, Schedule

TRAINABLE = r"\.merge\.embed\."


@dataclass
class DTEMConfig:
    """DTEM options (defaults: the reference's ``train.py``).

    Attributes:
        r: tokens merged per block, in training (softly) and inference: ToMe's schedules (int,
            per-layer list, ``(r, inflect)``, ``"low"``/``"high"``) or a target for this backbone
            (``"tokens:N"``, ``"flops:X"``, the embedding's cost included). Reference: 16.
        k2: scores kept per A token before the soft grouping (top-k2 partners).
        tau1: temperature of the kept scores.
        tau2: temperature of each soft grouping round (effective temperature ``tau1 * tau2``).
        feat_dim: width of the embedding; 0 = the head size (twice that for widths >= 1024),
            the reference's default.
        prop_attn: size-weighted attention (proportional attention); the reference's ViT/DeiT
            setting (its MAE patch turns it off in eval).
        trace_source: record which patches every token stands for (visualisation).
        pool_by_size: with an average-pool head, weight tokens by size (the reference's MAE
            ``prop_pool``).
    """

    r: Schedule = 16
    k2: int = 3
    tau1: float = 0.1
    tau2: float = 0.1
    feat_dim: int = 0
    prop_attn: bool = True
    trace_source: bool = False
    pool_by_size: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "dtem_")
        if self.k2 < 1:
            raise TokenTuneError(f"dtem_k2 must be >= 1 (scores kept per token), got {self.k2}")
        for name in ("tau1", "tau2"):
            if not getattr(self, name) > 0:
                raise TokenTuneError(f"dtem_{name} must be > 0 (a softmax temperature), got {getattr(self, name)}")
        if self.feat_dim < 0:
            raise TokenTuneError(f"dtem_feat_dim must be >= 0 (0 = the head size), got {self.feat_dim}")


# ----------------------------------------------------------------------------- soft grouping (training)
def soft_assignment(scores: torch.Tensor, r: int, k2: int, tau1: float, tau2: float) -> torch.Tensor:
    """DTEM's soft grouping ``P`` [B, |A|, |B|] from cosine scores [B, |A|, |B|] (``dtem.py:113-148``).

    Each A row keeps its top ``k2`` scores (divided by ``tau1``); ``r`` rounds of a softmax over
    every kept entry of the image at ``tau2`` pick (softly) one pair each, a row that was picked
    being pushed down by ``log(max(1 - its mass, eps))``; rows whose total passes 1 are scaled
    back to 1 (detached scale). Computed in float32.
    """
    eps = torch.finfo(torch.float32).eps
    scores = scores.to(torch.float32)
    idx = scores.argsort(dim=-1, descending=True)[..., :k2]      # the reference's call (ties as it meets them)
    logits = scores.gather(-1, idx) / tau1
    B, NA, K = logits.shape
    khot = torch.zeros_like(logits)
    for _ in range(r):
        onehot = F.softmax(logits.reshape(B, -1) / tau2, dim=-1).view(B, NA, K)
        khot = khot + onehot
        logits = logits + torch.log(torch.clamp(1 - onehot.sum(dim=-1, keepdim=True), min=eps))
    khot = khot / (torch.clamp(khot.sum(dim=-1, keepdim=True).detach() - 1, min=0.0) + 1.0)
    return torch.zeros_like(scores).scatter_reduce(-1, idx, khot, reduce="sum")


def soft_merge(x: torch.Tensor, metric: torch.Tensor, state: TokenState, r: int, k2: int, tau1: float,
               tau2: float) -> Tuple[torch.Tensor, TokenState]:
    """One training-time DTEM step: soft grouping of the ``state.soft_tokens`` leading tokens
    (all at first), sizes updated, those tokens re-ordered by soft size (``dtem.py:150-191``)."""
    B, N, C = x.shape
    p = state.num_prefix
    n = N if state.soft_tokens is None else state.soft_tokens
    r = min(r, (n - p) // 2)
    if r <= 0:
        return x, state
    size = state.size if state.size is not None else x.new_ones(B, N, 1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    xa, xb = x[:, p:n:2], x[:, p + 1:n:2]
    wa, wb = size[:, p:n:2], size[:, p + 1:n:2]
    assign = soft_assignment(metric[:, p:n:2] @ metric[:, p + 1:n:2].transpose(-1, -2), r, k2, tau1, tau2)
    assign_t = assign.transpose(-1, -2).to(x.dtype)
    wb_new = wb + assign_t @ wa                                    # s_b + P^T s_a
    xb = (wb * xb + assign_t @ (wa * xa)) / wb_new
    rest = 1 - assign.sum(dim=-1, keepdim=True).to(x.dtype)        # straight-through clamp to [0, 1]
    wa = wa * (rest + (rest.clamp(0.0, 1.0) - rest).detach())
    w = torch.cat([wa, wb_new], dim=1)
    order = w[..., 0].argsort(dim=-1, descending=True)          # the reference's unstable sort call
    pos = torch.cat([torch.arange(p, n, 2, device=x.device), torch.arange(p + 1, n, 2, device=x.device)])
    index = torch.cat([torch.arange(p, device=x.device).expand(B, p), pos[order],
                       torch.arange(n, N, device=x.device).expand(B, N - n)], dim=1)   # input position of each output
    nx = torch.cat([xa, xb], dim=1).gather(1, order[..., None].expand(-1, -1, C))
    x = torch.cat([x[:, :p], nx, x[:, n:]], dim=1)
    size = torch.cat([size[:, :p], w.gather(1, order[..., None]), size[:, n:]], dim=1)
    changes: Dict[str, object] = dict(reorder_rope(state, index, N))
    if state.trace_source:   # no token leaves: each output row keeps its own patches
        source = state.source if state.source is not None else torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
        changes["source"] = source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))
    return x, state.replace(size=size, soft_tokens=n - r, **changes)


# ----------------------------------------------------------------------------- the block's merge module
class DTEMMerging(TokenMerging):
    """ToMe's merge step with DTEM's embedding as the metric and soft grouping in training.

    ``embed`` (the reference's ``metric_layer``) reads the normalised block input with its gradient
    stopped; in eval the step is :class:`~tokentune.methods.tome.TokenMerging` on that embedding.
    """

    def __init__(self, dim: int, feat_dim: int, r: int, k2: int, tau1: float, tau2: float) -> None:
        super().__init__(r)
        self.embed = nn.Linear(dim, feat_dim)
        self.k2, self.tau1, self.tau2 = int(k2), float(tau1), float(tau2)

    def extra_repr(self) -> str:
        return f"r={self.r}, k2={self.k2}, tau1={self.tau1:g}, tau2={self.tau2:g}"

    def input_metric(self, h: torch.Tensor) -> torch.Tensor:
        """The merge metric from the block's normalised input ``h`` (``metric_layer(input.detach())``)."""
        return self.embed(h.detach())

    def forward(self, x: torch.Tensor, metric: torch.Tensor, state: TokenState):
        if self.training:
            return soft_merge(x, metric, state, self.r, self.k2, self.tau1, self.tau2)
        return super().forward(x, metric, state)


def feat_dim_of(model: nn.Module, cfg: DTEMConfig) -> int:
    """The embedding width: ``cfg.feat_dim``, or the head size (twice it for widths >= 1024)."""
    if cfg.feat_dim:
        return int(cfg.feat_dim)
    attn = adapted_blocks(model)[0].attn
    return int(attn.head_dim) * (1 if attn.num_heads * attn.head_dim < 1024 else 2)


def apply_dtem(model: nn.Module, cfg: DTEMConfig, ctx) -> DTEMConfig:
    blocks = adapted_blocks(model)
    feat = feat_dim_of(model, cfg)
    base = ViTDims.from_model(model)
    dims = replace(base, metric_dim=feat, metric_macs=base.dim * feat)
    schedule = resolve_merge_schedule(model, cfg.r, ctx.model_name, dims)
    for block, r in zip(blocks, schedule):
        block.merge = DTEMMerging(block.width(), feat, r, cfg.k2, cfg.tau1, cfg.tau2).to(**block.param_like()) \
            if r > 0 else None
    info = model.tokentune
    info.prop_attn, info.trace_source, info.pool_by_size = cfg.prop_attn, cfg.trace_source, cfg.pool_by_size
    info.state["dtem"] = schedule          # the fitted schedule
    return replace(cfg, r=list(schedule))


# ----------------------------------------------------------------------------- reference checkpoints
_REFERENCE_KEYS = (
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.metric_layer\.(weight|bias)$"), r"blocks.\1.merge.embed.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.qkv_layer\.(weight|bias)$"), r"blocks.\1.attn.qkv.\2"),
)
_FUSED = re.compile(r"^blocks\.\d+\.attn\.qkv\.(weight|bias)$")


def reference_state_dict(state_dict: Dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """A reference DTEM checkpoint (``model.state_dict()`` of its patched timm model, ``"state_dict"``
    of its ``.pth.tar``) under our names; the fused ``qkv`` copy is dropped, and with ``model`` the
    embeddings of blocks that do not merge here are dropped too."""
    own = set(model.state_dict()) if model is not None else None
    fused = any(k.endswith("attn.qkv.qkv_layer.weight") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if fused and _FUSED.match(key):
            continue
        for pattern, target in _REFERENCE_KEYS:
            if pattern.match(key):
                key = pattern.sub(target, key)
                break
        if own is None or key in own or not key.endswith(("merge.embed.weight", "merge.embed.bias")):
            out[key] = value
    return out


def load_reference_checkpoint(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Load a reference DTEM checkpoint into a ``dtem`` model (:func:`reference_state_dict`)."""
    state_dict = state_dict.get("state_dict", state_dict)
    return model.load_state_dict(reference_state_dict(state_dict, model), strict=strict)


register_method(Method(
    "dtem", DTEMConfig, apply_dtem, trainable=(TRAINABLE,), order=27, reduces_tokens=True, rate_option="r",
    rate_profiles=PROFILES,
    summary="DTEM: ToMe on a learned, decoupled embedding (soft grouping in training, hard merging in eval)"))
