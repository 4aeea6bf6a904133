"""LoRA as a method: the layer (:mod:`.layer`), peft's adapter format (:mod:`.peft`), the registration.

``method="lora"`` wraps the target Linear layers of every block (``lora_targets``, default the
fused ``qkv``) with :class:`LoRALinear`; ``deploy()`` merges them into the weights. Trained LoRA
tensors can also be written in peft's format (``save_formats["peft"]``: :func:`.peft.save_peft`).
"""
from torch import nn

from ...core.method import Method, register_method
from ...core.vit import adapted_blocks
from .layer import LoRAConfig, LoRALinear, PartLoRALinear, apply_lora, merge_lora
from .peft import load_peft, save_peft


def _apply(model: nn.Module, cfg: LoRAConfig, ctx) -> None:
    apply_lora(adapted_blocks(model), cfg)


def _deploy(model: nn.Module) -> None:
    merge_lora(model)


register_method(Method("lora", LoRAConfig, _apply, trainable=(r"\.lora_[AB]$",), order=12, peft=True,
                       deploy=_deploy, save_formats={"peft": save_peft}, load_formats={"peft": load_peft},
                       summary="LoRA on the fused qkv projection (mergeable for deployment)"))

__all__ = ["LoRAConfig", "LoRALinear", "PartLoRALinear", "apply_lora", "load_peft", "merge_lora", "save_peft"]
