"""DyT's token dispatcher: ``Linear(D -> 1)`` on the patch tokens, Gumbel-sigmoid with the
straight-through estimator in training, a threshold on the sigmoid in inference (optionally
within a fixed per-image capacity: the static-shape execution)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ...core.dispatch import Dispatcher, DispatchRecord
from ...core.skip import capacity_index
from ...core.state import Dispatch, TokenState
from ...errors import TokenTuneError


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples: -log(E), E ~ Exp(1). A sigmoid is a two-way softmax, so its
    Gumbel-softmax noise is the difference of two Gumbels (a logistic sample)."""
    return -torch.empty_like(like, memory_format=torch.legacy_contiguous_format).exponential_().log()


class TokenDispatcher(Dispatcher):
    """DyT token dispatcher: ``Linear(D -> 1)`` on the patch tokens, Gumbel-sigmoid + STE.

    Args:
        dim: token width.
        layer: index of its block (for records and statistics).
        kind: what it dispatches: ``"attn"``, ``"mlp"`` or ``"layer"``.
        tau: training temperature.
        threshold: activation threshold on the sigmoid.
        gumbel_noise: add logistic noise in training.
        inference: ``"skip"``, ``"mask"`` or ``"capacity"`` (eval-mode execution path).

    Capacity (``inference="capacity"``, or the per-forward option ``dyt_execution="capacity"``):
    each image computes its top-``k`` patch tokens by logit (``k`` from :meth:`capacity_tokens`:
    ``capacity_tokens`` if set, else ``ceil(capacity_factor * target_rate * M)``, at most ``M``);
    of those, the ones above the threshold are active. With ``k`` at least the number of tokens
    above the threshold in every image this is exactly the threshold rule; beyond it, the
    lowest-scoring active tokens of an image over capacity skip too.
    """

    def __init__(self, dim: int, layer: int, kind: str, tau: float = 5.0, threshold: float = 0.5,
                 gumbel_noise: bool = True, inference: str = "skip") -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.layer, self.kind = int(layer), kind
        self.tau, self.threshold = float(tau), float(threshold)
        self.gumbel_noise, self.inference = bool(gumbel_noise), inference
        self.calibrate_to: Optional[float] = None
        self.capacity_tokens: Optional[int] = None
        self.capacity_factor: Optional[float] = None
        self.target_rate = 0.5
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, tau={self.tau:g}, threshold={self.threshold:g}"

    def capacity_tokens_for(self, num_patches: int) -> int:
        """Patch tokens per image the capacity execution computes, of ``num_patches``."""
        if self.capacity_tokens is not None:
            return min(int(self.capacity_tokens), num_patches)
        if self.capacity_factor is None:
            raise TokenTuneError("dyt_execution='capacity' needs a capacity: deploy with dyt_capacity=FACTOR (e.g. 1.25) "
                                 "or calibrate it with tokentune.methods.dyt.calibrate_capacity")
        return min(math.ceil(self.capacity_factor * self.target_rate * num_patches - 1e-9), num_patches)

    def forward(self, x: torch.Tensor, state: TokenState) -> Tuple[Optional[Dispatch], TokenState]:
        complete = state.options.get("dyt_complete", False)
        if complete is True:
            return None, state                          # the complete model: nothing is skipped
        if complete is False or complete is None:
            complete = None
        p = state.num_prefix
        logits = self.linear(x)[:, p:]                  # [B, N - p, 1]; slicing x first would copy it
        if self.calibrate_to is not None:
            logits = self._calibrate(logits, complete)
        if self.training:
            noisy = logits + _gumbel(logits) - _gumbel(logits) if self.gumbel_noise else logits
            soft = (noisy / self.tau).sigmoid()
            hard = torch.zeros_like(soft).masked_fill(soft > self.threshold, 1.0)
            gate = (hard - soft.detach() + soft).squeeze(-1)        # STE: forward hard, backward soft
            active = hard.squeeze(-1) > 0
        else:
            active = (logits.sigmoid() > self.threshold).squeeze(-1)
            gate = None
        execution = state.options.get("dyt_execution", self.inference)
        index = None
        if not self.training and execution == "capacity" and complete is None:
            index, chosen = capacity_index(logits.squeeze(-1), self.capacity_tokens_for(logits.shape[1]), p)
            active = active & chosen                    # an active token over capacity skips
        B = x.shape[0]
        active = torch.cat([active.new_ones(B, p), active], dim=1)
        if gate is not None:
            gate = torch.cat([gate.new_ones(B, p), gate], dim=1)
        if complete is not None:
            complete = complete.to(device=x.device, dtype=torch.bool)
            active = active | complete[:, None]
            if gate is not None:
                gate = torch.where(complete[:, None], torch.ones_like(gate), gate)
        # rows that must run complete cannot keep a fixed capacity: they take the data-dependent skip path
        skip = not self.training and execution in ("skip", "capacity")
        mask = gate if gate is not None else active.to(x.dtype)
        record = DispatchRecord(self.layer, self.kind, mask, p, complete, state.source)
        return Dispatch(active, gate, skip, index), state.record(dispatch=record)

    @torch.no_grad()
    def _calibrate(self, logits: torch.Tensor, complete: Optional[torch.Tensor]) -> torch.Tensor:
        """Shift the bias so that ``calibrate_to`` of these patch tokens are active (eval rule)."""
        values = logits[~complete] if complete is not None else logits
        q = values.flatten().float().sort().values
        n = q.numel()
        inactive = int(round((1.0 - self.calibrate_to) * n))
        t = math.log(self.threshold / (1.0 - self.threshold))       # sigmoid(g) > thr <=> g > t
        if inactive <= 0:
            shift = t - float(q[0]) + 1.0
        elif inactive >= n:
            shift = t - float(q[-1]) - 1.0
        else:
            shift = t - 0.5 * (float(q[inactive - 1]) + float(q[inactive]))
        self.linear.bias.add_(shift)
        return logits + shift
