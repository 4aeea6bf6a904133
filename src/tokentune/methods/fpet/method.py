"""The FPET method: its config, the merge module of block ``r_layer`` and how the method is applied.

One block (``fpet_r_layer``, 0-based as the reference counts, default 6) merges its tokens between
attention and MLP, after kyk120/fpet@17a45e76 ``fpet/apply_fpet.py:76-99``::

    metric = sg(mean over heads of the keys)                 (apply_fpet.py:27-28, detached)
    metric = metric + refinement(metric)                     1-bit adapter, width 32, input = head size
    M = straight-through matching of A into B (checkerboard split; :mod:`.matching`)
    x, s = size-weighted dense merge by M                    every A token merges: 197 -> 99 on ViT-B/16

and the blocks after it use proportional attention (``log s`` on the logits) in training as
well (``apply_fpet.py:159``: ``prop_attn=True``). The refinement adapter is always the reference's
``Adapter(dim=32, bit=1, in_dim=64)`` of ``adaptformer.py`` (ReLU, dropout 0.1, no biases, binary
weights; its up projection starts at trunc_normal(0, 0.001)), whatever the PEFT adapter is;
``fpet_refine_bits=32`` gives a float one (zero-initialised up projection). It trains with the PEFT
parameters (the reference selects trainable tensors by the substring "adapter", ``main.py:141``).

Parameter names: the reference's ``blocks.{r}.refinement.adapter_down.weight`` /
``adapter_up.weight`` are ``blocks.{r}.merge.refinement.down_proj.weight`` / ``up_proj.weight`` here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from ...core.method import Method, register_method
from ...core.rope import reorder_rope
from ...core.vit import adapted_blocks
from ...errors import TokenTuneError
from ...typecheck import check_fields
from ..adapter import Adapter
from ..binary import BITS, fold_binary
from .matching import check_grid, checkerboard, diff_matching, grid_of, merge_dense, merge_source


@dataclass
class FPETConfig:
    """FPET options (defaults: kyk120/fpet's train.sh and apply_fpet.py).

    Attributes:
        r_layer: the block (counted from 0, as the reference does) that merges its tokens between
            attention and MLP; 0 = off (the reference's ``--r_layer`` treats 0 as off). Default 6
            (of 12 blocks: ViT-B/16 goes from 197 to 99 tokens there).
        refine_dim: hidden width of the refinement adapter on the keys (reference: 32).
        refine_bits: weight bits of the refinement adapter: 1 (reference), 2, 4, 8 or 32 (float).
        refine_dropout: dropout inside the refinement adapter (training only; reference: 0.1).
        prop_attn: proportional attention (``log`` of the token sizes on the attention logits) in the
            blocks after the merge, in training too (reference: on).
        trace_source: record which patches every token stands for (visualisation, dense features).
        pool_by_size: with timm's average pool, weight every token by its size (the mean over the
            patches, as ToMe's ``tome_pool_by_size``); no effect with CLS-token heads (the reference's).
    """

    r_layer: int = 6
    refine_dim: int = 32
    refine_bits: int = 1
    refine_dropout: float = 0.1
    prop_attn: bool = True
    trace_source: bool = False
    pool_by_size: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "fpet_")
        if self.r_layer < 0:
            raise TokenTuneError(f"invalid fpet_r_layer={self.r_layer}: a block index counted from 0 (0 = off)")
        if self.refine_dim < 1:
            raise TokenTuneError(f"invalid fpet_refine_dim={self.refine_dim}: must be at least 1")
        if self.refine_bits not in BITS:
            raise TokenTuneError(f"invalid fpet_refine_bits={self.refine_bits}: choose one of "
                                 f"{', '.join(map(str, BITS))} (32 = full precision)")
        if not 0.0 <= self.refine_dropout < 1.0:
            raise TokenTuneError(f"invalid fpet_refine_dropout={self.refine_dropout}: a dropout probability is in [0, 1)")


@functools.lru_cache(maxsize=64)
def _rows(h: int, w: int, p: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows of A, of B's patch tokens, and the rows the output keeps (prefix then B)."""
    with torch.inference_mode(False), torch.no_grad():
        a, b = checkerboard(h, w, device)
        keep = torch.cat([torch.arange(p, device=device), b + p])
        return a + p, b + p, keep


class FPETMerge(nn.Module):
    """The merge step of block ``r_layer``: refinement adapter on the detached keys, straight-through
    matching, dense size-weighted merge (``block.merge`` slot: ``merge(x, keys, state)``).

    ``straight_through`` False (set by ``deploy()``) uses the hard 0/1 matching itself: the same
    forward values without the soft path (no gradient, one rounding less).
    """

    def __init__(self, head_dim: int, grid: Tuple[int, int], cfg: FPETConfig) -> None:
        super().__init__()
        check_grid(*grid)
        self.grid = (int(grid[0]), int(grid[1]))
        self.refinement = Adapter(head_dim, cfg.refine_dim, scale=1.0, dropout=cfg.refine_dropout,
                                  bits=cfg.refine_bits, bias=False)
        self.straight_through = True

    def extra_repr(self) -> str:
        return f"grid={self.grid[0]}x{self.grid[1]}, straight_through={self.straight_through}"

    def forward(self, x: torch.Tensor, keys: torch.Tensor, state):
        p = state.num_prefix
        h, w = grid_of(x.shape[1] - p, self.grid)
        rows = _rows.__wrapped__ if torch.compiler.is_compiling() else _rows
        a_rows, b_rows, keep = rows(h, w, p, x.device)
        metric = keys.detach()                                       # apply_fpet.py:84
        metric = metric + self.refinement(metric)                    # apply_fpet.py:85
        match = diff_matching(metric, a_rows, b_rows, self.straight_through)
        source = state.source
        if state.trace_source:
            source = merge_source(source, match, p, a_rows, b_rows, x)
        rope = reorder_rope(state, keep.expand(x.shape[0], -1), x.shape[1])   # a destination keeps its rotation
        out, size = merge_dense(x, state.size, match, p, a_rows, b_rows)
        return out, state.replace(size=size, source=source, **rope)


def merges_of(model: nn.Module):
    """The model's :class:`FPETMerge` modules (one, or none with ``r_layer=0``)."""
    return [b.merge for b in adapted_blocks(model) if isinstance(b.merge, FPETMerge)]


def apply_fpet(model: nn.Module, cfg: FPETConfig, ctx) -> None:
    blocks = adapted_blocks(model)
    if cfg.r_layer >= len(blocks):
        raise TokenTuneError(f"fpet_r_layer={cfg.r_layer} but the model has {len(blocks)} blocks; choose a block "
                             f"index in 1..{len(blocks) - 1} (0 = off)")
    model.tokentune.prop_attn = cfg.prop_attn
    model.tokentune.trace_source = cfg.trace_source
    model.tokentune.pool_by_size = cfg.pool_by_size
    if cfg.r_layer == 0:
        return
    block = blocks[cfg.r_layer]
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    block.merge = FPETMerge(int(block.attn.head_dim), grid, cfg).to(**block.param_like())


def deploy_fpet(model: nn.Module) -> None:
    """The hard 0/1 matching (no straight-through arithmetic) and the refinement's quantised weights
    folded into plain float layers; shapes stay static (every image keeps ``p + |B|`` tokens)."""
    for merge in merges_of(model):
        merge.straight_through = False
        fold_binary(merge)


register_method(Method(
    "fpet", FPETConfig, apply_fpet, trainable=(r"\.merge\.refinement\.",), order=22, reduces_tokens=True,
    default_peft="adapter", deploy=deploy_fpet, training_free=False, rate_option=None,
    summary="FPET (CVPR 2025): one checkerboard merge at block r_layer, keys refined by a 1-bit adapter, "
            "straight-through matching"))
