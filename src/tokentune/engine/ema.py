"""Exponential moving average of the trained weights (``TrainConfig.ema_decay``).

After every optimizer step ``ema = decay * ema + (1 - decay) * weights`` for each trainable
parameter (the frozen backbone needs none: it does not move). Evaluation during training and the
run's ``model.safetensors`` use the averaged weights; ``resume.pt`` keeps the raw weights (training
continues from them) and the average, so a resumed run ends bit-identical to an uninterrupted one.

Deviation from timm's ``ModelEmaV3``: no decay warm-up and only the trained tensors are averaged
(timm copies the whole model); with a frozen backbone the two compute the same average.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
from torch import nn


class TrainedEMA:
    """The moving average of a model's trainable parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.shadow: Dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in model.named_parameters()
                                                if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step with the model's current weights."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own are put back after."""
        params = {n: p for n, p in model.named_parameters() if n in self.shadow}
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: t.detach().cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in state.items():
                self.shadow[n].copy_(t)
