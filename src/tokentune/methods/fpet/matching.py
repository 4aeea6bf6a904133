"""FPET's merge as pure functions: the checkerboard split, the straight-through matching, the dense
size-weighted merge.

Our implementation of the behaviour of kyk120/fpet@17a45e76 ``fpet/merge_fpet.py`` (no licence
file: read, not copied):

* **Split** (``checkerboard_split``, ``:19-55``): the patch tokens on their ``h x w`` grid; set
  A = the (even row, even column) tokens then the (odd row, odd column) tokens, set B = the prefix
  tokens, the (odd row, even column) tokens, then the (even row, odd column) tokens, each in
  row-major order. The reference hard-codes a 14 x 14 grid for 196 patches and otherwise assumes
  a square (``floor(sqrt(N))`` columns); here the grid is the model's own patch grid, any ``h x w``,
  odd sizes included (then ``|A| = ceil(hw / 2) >= |B|``).
* **Matching** (``bipartite_diff_matching``, ``:58-96``): cosine scores ``S = a b^T`` of the
  normalised metric, prefix columns excluded (the reference sets the CLS column to -inf, the same
  thing), ``soft = sigmoid(S - mean(top-2 of each row))``, ``hard = soft > 0.5`` (the row's
  arg-max when its top-1 and top-2 differ; on an exact tie no entry passes and the A token is
  dropped, as in the reference), ``M = soft + sg(hard - soft)`` (straight-through estimator).
* **Merge** (``merge_wavg``, ``:107-121``): ``x_B <- (x_B s_B + M^T (x_A s_A)) / (s_B + M^T s_A)``
  as one dense product; the output is the prefix tokens then B, so every image keeps the same
  number of tokens (``p + |B|``; 197 -> 99 on ViT-B/16) whatever it matches: the shapes are static.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from ...errors import TokenTuneError


@functools.lru_cache(maxsize=64)
def _split(h: int, w: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    grid = torch.arange(h * w).view(h, w)
    a = torch.cat([grid[0::2, 0::2].flatten(), grid[1::2, 1::2].flatten()])
    b = torch.cat([grid[1::2, 0::2].flatten(), grid[0::2, 1::2].flatten()])
    return tuple(a.tolist()), tuple(b.tolist())


def checkerboard(h: int, w: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch indices (row-major on the ``h x w`` grid) of set A and set B, in the reference's order."""
    a, b = _split(int(h), int(w))
    return torch.tensor(a, dtype=torch.long, device=device), torch.tensor(b, dtype=torch.long, device=device)


def check_grid(h: int, w: int) -> None:
    """A grid FPET can split: set B needs two tokens (each A token compares its top-2)."""
    if len(_split(int(h), int(w))[1]) < 2:
        raise TokenTuneError(f"FPET cannot split a {h}x{w} patch grid (set B needs at least 2 tokens); "
                             "use a larger image or a smaller patch size")


def grid_of(num_patches: int, grid: Tuple[int, int]) -> Tuple[int, int]:
    """The patch grid of ``num_patches`` tokens: the model's own grid when it fits, else the
    reference's square rule (``floor(sqrt(N))`` columns) when that divides ``N``."""
    if num_patches == grid[0] * grid[1]:
        return int(grid[0]), int(grid[1])
    w = int(math.isqrt(num_patches))
    if w > 0 and num_patches % w == 0:
        return num_patches // w, w
    raise TokenTuneError(f"FPET got {num_patches} patch tokens, which fit neither the model's {grid[0]}x{grid[1]} grid "
                         "nor a square; build the model for this image size (img_size=...)")


def diff_matching(metric: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
                  straight_through: bool = True) -> torch.Tensor:
    """The matching matrix ``M`` [B, |A|, |B|] of FPET's differentiable bipartite matching.

    ``metric`` [B, N, d]; ``a_rows``/``b_rows`` the token rows of A and of the non-prefix B tokens.
    ``straight_through``: ``soft + sg(hard - soft)`` (the reference, values 0/1 up to rounding,
    gradient of ``soft``); False: ``hard`` itself (deployment: exactly 0/1, no gradient).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric.index_select(1, a_rows), metric.index_select(1, b_rows)
    scores = a @ b.transpose(-1, -2)                                 # S: cosine similarities
    top2 = scores.topk(2, dim=-1).values
    soft = torch.sigmoid(scores - top2.mean(dim=-1, keepdim=True))   # sigma(S - mean(top-2))
    hard = (soft > 0.5).to(soft.dtype)
    if not straight_through:
        return hard
    return soft + (hard - soft).detach()


def merge_dense(x: torch.Tensor, size: Optional[torch.Tensor], match: torch.Tensor, num_prefix: int,
                a_rows: torch.Tensor, b_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of every A token into B by ``match`` [B, |A|, |B|]: returns the prefix
    tokens then B [B, p + |B|, C], and their sizes [B, p + |B|, 1]."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    mt = match.transpose(1, 2).to(x.dtype)                           # M^T [B, |B|, |A|]
    xs = x * size
    xb = xs.index_select(1, b_rows) + mt @ xs.index_select(1, a_rows)        # x_B s_B + M^T x_A s_A
    sb = size.index_select(1, b_rows) + mt @ size.index_select(1, a_rows)    # s_B + M^T s_A
    p = num_prefix
    return torch.cat([x[:, :p], xb / sb], dim=1), torch.cat([size[:, :p], sb], dim=1)


def merge_source(source: Optional[torch.Tensor], match: torch.Tensor, num_prefix: int, a_rows: torch.Tensor,
                 b_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The token -> input-token map [B, p + |B|, N0] after the merge (0/1; a tie-dropped token's
    patches belong to no token). The reference raises here (``merge_fpet.py:135`` passes ``mode``
    to a merge function that takes none)."""
    if source is None:
        n = like.shape[1]
        source = torch.eye(n, device=like.device, dtype=like.dtype)[None].expand(like.shape[0], n, n)
    hard = (match.detach() > 0.5).to(source.dtype).transpose(1, 2)
    sb = source.index_select(1, b_rows) + hard @ source.index_select(1, a_rows)
    return torch.cat([source[:, :num_prefix], sb], dim=1)
