import math
import os

import pytest
import torch

# tests never reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)   # 16 patches + CLS


def tiny(**overrides):
    """Keyword arguments for a small timm ViT (real timm code paths, tiny sizes)."""
    kw = dict(TINY)
    kw.update(overrides)
    return kw


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_lora(model, scale=0.05):
    """Give LoRA B a non-zero value so merged/unmerged comparisons test something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, scale)


@torch.no_grad()
def randomize_dyt(model, dispatcher_std=1.0):
    """DyT: non-zero adapters, dispatchers whose logits spread around 0 (about half the tokens active)."""
    for name, p in model.named_parameters():
        if "adapter" in name and ("up_proj" in name or "up_weight" in name or name.endswith("bias")):
            p.normal_(0, 0.1)
        elif name.endswith("dispatcher.linear.weight"):
            p.normal_(0, dispatcher_std / math.sqrt(p.shape[1]))
        elif name.endswith("dispatcher.linear.bias"):
            p.zero_()
