"""Full fine-tuning and the linear probe: the two tuning methods that add nothing to the model."""
from __future__ import annotations

from ..core.method import Method, register_method


def _apply_nothing(model, cfg, ctx) -> None:
    pass


register_method(Method("full", None, _apply_nothing, trainable=(r".*",), order=10, peft=True, exclusive=True,
                       summary="full fine-tuning: every parameter trains"))
register_method(Method("linear", None, _apply_nothing, order=11, peft=True, exclusive=True,
                       summary="linear probe: only the classification head trains"))
