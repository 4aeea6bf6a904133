"""The video head: a clip runs through the adapted ViT as a batch of frames, then is pooled.

* ``attentive`` (the DyT reference, video_models/video_vision_transformer_IN21K.py): the final
  (normalised) tokens of all frames, prefix tokens included, are concatenated per clip
  ([B, T*N, D]); one learnable query (initialised to zeros) attends over them with a
  cross-attention whose query, key and value inputs each have their own LayerNorm, whose q/k/v
  projections have no bias except q and v (zero-initialised, as ``qkv_bias``), and whose output
  goes through a projection; no residual, no MLP. The pooled vector goes to the model's classifier
  (``model.head``). Linear weights start as trunc_normal(0.02), biases at zero.
* ``mean``: each frame is pooled as the image model pools it (CLS token or average, ``fc_norm``),
  the frames are averaged, and the classifier is applied: a one-frame clip gives exactly the image
  model's logits.

Inputs are clips [B, T, 3, H, W] or, for multi-view testing, [B, V, T, 3, H, W] whose views' logits
are averaged (as the reference's evaluation). Per-forward options that are per-sample tensors
(their first dimension is the number of clips, e.g. DyT's ``dyt_complete`` rows) are repeated for
each frame (and view). With token merging the frames' merged tokens are pooled as they are (the
attentive query does not weight them by their sizes).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.state import TokenState
from ...core.task import TaskHead
from ...errors import TokenTuneError

POOLS = ("attentive", "mean")


class AttentivePooling(nn.Module):
    """One learnable query cross-attending over a clip's tokens (the reference's ``AttentiveBlock``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise TokenTuneError(f"attentive pooling needs the width {dim} divisible by the {num_heads} heads")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        for linear in (self.q, self.k, self.v, self.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, D]."""
        B, L, D = tokens.shape
        h = self.num_heads
        q = F.linear(self.norm_q(self.query.expand(B, -1, -1)), self.q.weight, self.q_bias)
        k = self.k(self.norm_k(tokens))
        v = F.linear(self.norm_v(tokens), self.v.weight, self.v_bias)
        q, k, v = (t.reshape(B, t.shape[1], h, D // h).transpose(1, 2) for t in (q, k, v))
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, D))


def _per_frame(options: Dict[str, Any], clips: int, repeat: int) -> Dict[str, Any]:
    """Per-clip tensor options repeated for every frame of their clip."""
    return {k: (v.repeat_interleave(repeat, dim=0) if isinstance(v, torch.Tensor) and v.dim() > 0
                and v.shape[0] == clips else v) for k, v in options.items()}


class VideoHead(TaskHead):
    """Frames through the backbone, then attentive or mean pooling, then the model's classifier."""

    unit = "clip"

    def __init__(self, dim: int, num_heads: int, pool: str = "attentive", frames: int = 8) -> None:
        super().__init__()
        if pool not in POOLS:
            raise TokenTuneError(f"unknown video pooling {pool!r}; choose from {', '.join(POOLS)}")
        self.pool, self.frames = pool, int(frames)
        self.attentive = AttentivePooling(dim, num_heads) if pool == "attentive" else None

    def extra_repr(self) -> str:
        return f"pool={self.pool}, frames={self.frames}"

    def forward(self, model: nn.Module, clips: torch.Tensor, **options) -> Tuple[torch.Tensor, TokenState]:
        if clips.dim() == 6:                                   # [B, V, T, 3, H, W]: average the views' logits
            B, V = clips.shape[:2]
            logits, state = self(model, clips.flatten(0, 1), **_per_frame(options, B, V))
            return logits.view(B, V, -1).mean(dim=1), state
        if clips.dim() != 5:
            raise TokenTuneError(f"a video model takes clips [B, T, 3, H, W] (or views [B, V, T, 3, H, W]), got shape "
                                 f"{tuple(clips.shape)}")
        B, T = clips.shape[:2]
        tokens, state = model.forward_tokens(clips.flatten(0, 1), **_per_frame(options, B, T))
        if self.attentive is not None:
            tokens = model.head_drop(model.fc_norm(tokens))
            pooled = self.attentive(tokens.reshape(B, -1, tokens.shape[-1]))
        else:
            pooled = model.forward_head_sized(tokens, state, pre_logits=True).view(B, T, -1).mean(dim=1)
        return model.head(pooled), state

    def example_input(self, model: nn.Module, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        size = model.patch_embed.img_size
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, self.frames, 3, int(size[0]), int(size[1]), generator=g)

    def images_per_sample(self) -> int:
        return self.frames
