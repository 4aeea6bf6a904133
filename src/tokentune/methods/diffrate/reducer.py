"""DiffRate's token operations: sort by CLS attention, prune the tail, merge the next tail into
the kept tokens; the fixed-rate reducer and the searchable one with its rate proxies."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ...core.reduce import TokenReducer
from ...core.rope import keep_rope, reorder_rope
from ...core.state import TokenState


# ----------------------------------------------------------------------------- straight-through helpers
class _CeilSTE(torch.autograd.Function):
    """``ceil`` forward, identity gradient (reference ``STE_Ceil``)."""

    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def ste_min(*values: torch.Tensor) -> torch.Tensor:
    """The smallest value forward, the gradient to every argument but the first (reference ``STE_Min``)."""
    device = next(v.device for v in values if torch.is_tensor(v))
    values = [v if torch.is_tensor(v) else torch.tensor(float(v), device=device) for v in values]
    low = torch.stack([v.detach().float().to(device) for v in values]).min()
    return low + sum(v - v.detach() for v in values[1:])


# ----------------------------------------------------------------------------- sorting, matching, merging
def sort_by_cls_attention(x: torch.Tensor, state: TokenState, cls_attn: torch.Tensor, size: torch.Tensor,
                          mask: Optional[torch.Tensor]):
    """Prefix tokens first, then the others by descending CLS attention (reference ``torch.sort``);
    the last item returned are the state changes that move the rotary rows alike (RoPE models)."""
    B, N, C = x.shape
    p = state.num_prefix
    order = torch.sort(cls_attn[:, p:], dim=1, descending=True)[1] + p
    idx = torch.cat([torch.arange(p, device=x.device).expand(B, p), order], dim=1)
    x = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))
    size = size.gather(1, idx.unsqueeze(-1))
    mask = mask.gather(1, idx) if mask is not None else None
    source = state.source
    if state.trace_source:
        source = source if source is not None else torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
        source = source.gather(1, idx.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
    return x, size, mask, source, reorder_rope(state, idx, N)


def match(metric: torch.Tensor, kept: int, prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every token after the first ``kept`` merges into its most similar (cosine) token among them;
    prefix tokens are never destinations. Returns destination indices [B, n, 1] and similarities [B, n]."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)
        similarity[..., :prefix] = -math.inf
        node_max, node_idx = similarity.max(dim=-1)
    return node_idx[..., None], node_max


def merge(x: torch.Tensor, dst_idx: torch.Tensor, kept: int, mode: str) -> torch.Tensor:
    """Reduce the tokens after ``kept`` into their destinations: ``"mean"`` (the unweighted mean of
    a destination and its sources, the reference's ``scatter_reduce("mean", include_self=True)``),
    ``"sum"`` or ``"amax"``. Sums go through ``index_add_`` on flattened rows (faster on CPU than
    ``scatter_reduce``, and graph exporters have it); the mean divides by ``1 + sources``."""
    src, dst = x[:, kept:], x[:, :kept]
    B, n, C = src.shape
    if mode == "amax":
        return dst.scatter_reduce(-2, dst_idx.expand(-1, -1, C), src, reduce="amax")
    rows = (dst_idx[..., 0] + torch.arange(B, device=x.device)[:, None] * kept).reshape(-1)
    out = dst.reshape(B * kept, C).index_add(0, rows, src.reshape(B * n, C))
    if mode == "mean":
        count = x.new_ones(B * kept, 1).index_add_(0, rows, x.new_ones(B * n, 1))
        out = out / count
    return out.view(B, kept, C)


# ----------------------------------------------------------------------------- fixed rates
class DiffRateReducer(TokenReducer):
    """One block's fixed DiffRate step (training and inference alike: the reference's eval path,
    which is also its fine-tuning path): sort, keep the first ``prune_kept`` tokens, merge those
    after ``merge_kept`` into the first ``merge_kept`` (``x``: mean, sizes: sum of the merged
    sizes scaled by their similarity, so proportional attention weighs them by how well they fit).

    Args:
        layer: index of its block.
        prune_kept, merge_kept: tokens (prefix tokens included) after pruning and after merging.
    """

    needs_cls_attn = True

    def __init__(self, layer: int, prune_kept: int, merge_kept: int) -> None:
        super().__init__()
        self.layer, self.prune_kept, self.merge_kept = int(layer), int(prune_kept), int(merge_kept)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, prune_kept={self.prune_kept}, merge_kept={self.merge_kept}"

    def forward(self, x: torch.Tensor, state: TokenState,
                cls_attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, TokenState]:
        # The same computation as sorting every token, slicing and merging (the reference's order
        # of operations, see sort_by_cls_attention / match / merge), done on flattened rows: only
        # the prune_kept tokens are ever copied (index_select / index_add_ on whole rows).
        B, N, C = x.shape
        p = state.num_prefix
        pk = min(self.prune_kept, N)
        mk = min(self.merge_kept, pk)
        order = torch.sort(cls_attn[:, p:], dim=1, descending=True)[1] + p
        idx = torch.cat([torch.arange(p, device=x.device).expand(B, p), order], dim=1)      # sorted tokens
        offset = torch.arange(B, device=x.device)[:, None] * N
        keep_rows = (idx[:, :mk] + offset).reshape(-1)
        flat = x.reshape(B * N, C)
        out = flat.index_select(0, keep_rows)
        sizes = state.size.reshape(B * N, 1) if state.size is not None else x.new_ones(B * N, 1)
        size = sizes.index_select(0, keep_rows)
        source, policy = state.source, state.policy
        rope = keep_rope(state, keep_rows, B, N)                            # destinations keep their rotation
        if state.trace_source and source is None:
            source = torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
        all_sources = source.reshape(B * N, -1) if source is not None else None
        if all_sources is not None:
            source = all_sources.index_select(0, keep_rows)
        if policy is not None:
            policy = policy.reshape(B * N).index_select(0, keep_rows).view(B, mk)
        if mk < pk:
            src_rows = (idx[:, mk:pk] + offset).reshape(-1)
            src = flat.index_select(0, src_rows)
            n = pk - mk
            with torch.no_grad():                 # cosine similarity of the features, prefix never a destination
                a = src / src.norm(dim=-1, keepdim=True)
                b = out / out.norm(dim=-1, keepdim=True)
                similarity = a.view(B, n, C) @ b.view(B, mk, C).transpose(-1, -2)
                similarity[..., :p] = -math.inf
                node_max, node_idx = similarity.max(dim=-1)
            dst = (node_idx + torch.arange(B, device=x.device)[:, None] * mk).reshape(-1)
            count = x.new_ones(B * mk, 1).index_add_(0, dst, x.new_ones(B * n, 1))
            out = out.index_add(0, dst, src) / count                        # mean of destination and sources
            size = size.index_add(0, dst, sizes.index_select(0, src_rows) * node_max.reshape(-1, 1))
            if all_sources is not None:
                merged = all_sources.index_select(0, src_rows).view(B, n, -1)
                source = source.view(B, mk, -1).scatter_reduce(
                    1, node_idx[..., None].expand(-1, -1, merged.shape[-1]), merged, reduce="amax").reshape(B * mk, -1)
        source = source.view(B, mk, -1) if source is not None else None
        return out.view(B, mk, C), state.replace(size=size.view(B, mk, 1), source=source, policy=policy, **rope)


# ----------------------------------------------------------------------------- the search
class RateProxy(nn.Module):
    """The differentiable discrete proxy of one rate (reference ``DiffRate`` module, "DDP").

    Candidates are kept patch-token counts ``n, n - g, n - 2g, ...`` (``g`` the granularity);
    ``logits`` (reference ``selected_probability``, zeros at start) give each a probability ``pi``.
    The kept count is ``ceil(sum_c pi_c c) + prefix`` (straight-through ceil, paper Eq. 8); the
    token mask keeps the first ``kept`` sorted tokens with forward values 0/1 and the gradient of
    ``P(token j kept) = sum_{c + prefix > j} pi_c`` (paper Eq. 9-10).
    """

    def __init__(self, patches: int, granularity: int, prefix: int) -> None:
        super().__init__()
        self.register_buffer("candidates", torch.arange(patches, 0, -granularity, dtype=torch.float32))
        self.logits = nn.Parameter(torch.zeros(self.candidates.numel()))
        self.prefix = int(prefix)

    def kept(self) -> torch.Tensor:
        """The expected kept count (prefix included), ceiled, with gradient."""
        return _CeilSTE.apply(self.candidates @ self.logits.softmax(dim=-1)) + self.prefix

    def token_mask(self, kept: int, upto: int) -> torch.Tensor:
        """[prefix + patches]: 0 at positions ``kept .. upto - 1``, else 1; gradient of the keep probability."""
        n = self.prefix + int(self.candidates[0]) if self.candidates.numel() else self.prefix
        positions = torch.arange(n, device=self.logits.device)
        covers = (positions[None, :] < (self.candidates[:, None] + self.prefix)).to(self.logits.dtype)
        prob = self.logits.softmax(dim=-1) @ covers
        mask = torch.ones_like(prob)
        mask[kept:upto] = 0
        return mask - prob.detach() + prob


class DiffRateSearchReducer(TokenReducer):
    """One block of the rate search (the reference's training path): everything is kept and
    computed, pruned and merged tokens are masked out of later attention through the token state's
    policy (their positions at the end of the sorted sequence), and the two kept counts are
    recorded (with gradient) for the FLOPs loss.

    Args:
        layer: index of its block.
        patches: patch tokens at the model input.
        prefix: prefix tokens.
        granularity: step between candidate kept counts (reference ``--granularity 4``).
    """

    needs_cls_attn = True

    def __init__(self, layer: int, patches: int, prefix: int, granularity: int) -> None:
        super().__init__()
        self.layer = int(layer)
        self.prune = RateProxy(patches, granularity, prefix)
        self.merge = RateProxy(patches, granularity, prefix)

    def forward(self, x: torch.Tensor, state: TokenState,
                cls_attn: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, TokenState]:
        B = x.shape[0]
        size = state.size if state.size is not None else x.new_ones(B, x.shape[1], 1)
        mask = state.policy if state.policy is not None else x.new_ones(B, x.shape[1])
        x, size, mask, source, rope = sort_by_cls_attention(x, state, cls_attn, size, mask)
        last = int(mask[0].sum())
        prune_kept = self.prune.kept()
        if prune_kept < last:
            mask = mask * self.prune.token_mask(int(prune_kept), last).expand(B, -1)
        mid = min(last, int(prune_kept))
        merge_kept = self.merge.kept()
        if merge_kept < mid:
            k = int(merge_kept)
            merge_mask = self.merge.token_mask(k, mid)
            dst_idx, node_max = match(x[:, :mid].detach(), k, state.num_prefix)
            head = x[:, :mid]
            x = torch.cat([merge(head, dst_idx, k, "mean"), head[:, k:], x[:, mid:]], dim=1)
            s = torch.cat([size[:, :k], size[:, k:mid] * node_max[..., None]], dim=1).clamp(1)
            size = torch.cat([merge(s, dst_idx, k, "sum"), s[:, k:], size[:, mid:]], dim=1)
            mask = mask * merge_mask
        state = state.replace(size=size, policy=mask, source=source, **rope)
        return x, state.record(diffrate=(prune_kept, merge_kept))
