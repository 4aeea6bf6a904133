"""DynamicViT's prediction module and the reducer that runs it before a pruning block."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.reduce import TokenReducer, keep_tokens, top_order
from ...core.state import TokenState
from ...errors import TokenTuneError

EXECUTIONS = ("prune", "mask")


class PredictorLG(nn.Module):
    """Keep/drop log-probabilities of every token from a local and a global feature (paper Eq. 2-4).

    ``z = GELU(Linear(LN(x)))`` is split in halves: the local half of each token, and the global
    half averaged over the tokens still kept (``policy``-weighted mean); their concatenation goes
    through an MLP (D -> D/2 -> D/4 -> 2, GELU) and a log-softmax. Column 0 is "keep".
    Initialisation as the reference (its ``_init_weights``): trunc_normal(0.02) weights, zero
    biases, LayerNorm weight 1. Deviation: the denominator is clamped to at least 1e-6, so an
    image whose tokens were all dropped in training gets a zero global feature instead of the
    reference's 0/0 = NaN (which spreads to the whole batch's loss); the policy is 0/1, so this
    changes nothing otherwise.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """``x`` [B, n, D] patch tokens, ``policy`` [B, n, 1] -> [B, n, 2] log-probabilities."""
        x = self.in_conv(x)
        B, N, C = x.shape
        local_x = x[:, :, :C // 2]
        global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1))


class DynamicViTReducer(TokenReducer):
    """Predicts and prunes before its block (a block's ``reduce`` plug-in, stage ``stage``).

    Training: hard Gumbel-softmax decisions (straight-through), multiplied by the previous
    stage's, become the token state's ``policy``: every later attention hides the dropped keys and
    the gradient reaches the predictor through it. The decision is recorded for the ratio loss.
    Eval: the ``keep`` = ``int(n0 * ratio)`` tokens with the highest keep score stay (``n0`` the
    patch tokens of the first stage): ``execution="prune"`` gathers them (a smaller tensor, the
    reference's inference), ``"mask"`` keeps every token and hides the others through the policy
    (the same outputs up to the masked softmax's epsilon; for tests and analysis).

    Args:
        layer: index of its block.
        stage: 0, 1, 2, ... in block order.
        ratio: share of the first stage's patch tokens kept after this stage (rho^(stage+1)).
        dim: embedding dimension.
        tau: Gumbel-softmax temperature in training (reference 1).
        execution: ``"prune"`` or ``"mask"`` in eval mode.
        detach_input: the predictor reads the tokens without passing gradient back to them.
    """

    def __init__(self, layer: int, stage: int, ratio: float, dim: int, tau: float = 1.0,
                 execution: str = "prune", detach_input: bool = False) -> None:
        super().__init__()
        self.layer, self.stage, self.ratio, self.tau = int(layer), int(stage), float(ratio), float(tau)
        self.execution = execution
        self.detach_input = bool(detach_input)
        self.predictor = PredictorLG(dim)

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, stage={self.stage}, ratio={self.ratio:.4g}, execution={self.execution}"
                + (", detach_input=True" if self.detach_input else ""))

    def before_attention(self, x: torch.Tensor, state: TokenState) -> Tuple[torch.Tensor, TokenState]:
        if state.options.get("dynamicvit_prune", True) is False:      # the unpruned teacher
            return x, state
        B, N, _ = x.shape
        p = state.num_prefix
        if self.stage == 0:
            state = state.record(dynamicvit_tokens=N - p)
        n0 = next(r["dynamicvit_tokens"] for r in state.records if "dynamicvit_tokens" in r)
        prev = state.policy[:, p:].unsqueeze(-1) if state.policy is not None else x.new_ones(B, N - p, 1)
        tokens = x[:, p:].detach() if self.detach_input else x[:, p:]
        pred = self.predictor(tokens, prev)                                          # [B, n, 2]
        if self.training:
            hard = F.gumbel_softmax(pred, tau=self.tau, hard=True)[:, :, 0:1] * prev     # straight-through
            policy = torch.cat([hard.new_ones(B, p), hard[:, :, 0]], dim=1)
            return x, state.replace(policy=policy).record(dynamicvit=hard[:, :, 0], dynamicvit_stage=self.stage)
        keep = int(n0 * self.ratio)
        if keep < 1:
            raise TokenTuneError(f"DynamicViT stage {self.stage} keeps int({n0} x {self.ratio:.4g}) = 0 tokens; "
                                 "raise dynamicvit_keep_rate")
        score = pred[:, :, 0]
        execution = state.options.get("dynamicvit_execution", self.execution)
        if execution not in EXECUTIONS:
            raise TokenTuneError(f"dynamicvit_execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        if execution == "prune":
            return keep_tokens(x, state, top_order(score, keep))   # the reference's keep order; ties: lower index
        score = score.masked_fill(prev[:, :, 0] < 0.5, float("-inf"))              # only kept tokens compete
        kept = torch.zeros_like(score).scatter_(1, top_order(score, keep), 1.0)
        return x, state.replace(policy=torch.cat([kept.new_ones(B, p), kept], dim=1))


def decisions(state: TokenState) -> List[torch.Tensor]:
    """The training-time keep decisions [B, n0] of every stage of a forward, in order."""
    return [r["dynamicvit"] for r in state.records if "dynamicvit" in r]

