"""Saving only the trained parameters, loading them back, clear errors on mismatch."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tokentune
from tokentune.errors import TokenTuneError

from conftest import randomize_lora, tiny


def _model(method="lora+tome", **kw):
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=6, tome_r=[3, 2],
                                  **tiny(**kw))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model().eval()
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    tokentune.save_trained(model, str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora" in k or k.startswith("head.") for k in saved)   # frozen backbone not saved
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "lora+tome" and config["configs"]["tome"]["r"][:2] == [3, 2]
    # the frozen backbone is rebuilt from the same init (random here): seed it identically
    torch.manual_seed(0)
    loaded = tokentune.load_trained(str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_backbone_from_local_files(tmp_path):
    """Pretrained weights from .safetensors and .pth files (timm state dicts)."""
    import timm
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=6, **tiny()).eval()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": ref.state_dict()}, str(tmp_path / "w.pth"))
    x = torch.randn(2, 3, 32, 32)
    for f in ("w.safetensors", "w.pth"):
        m = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=6,
                                   pretrained=str(tmp_path / f), **tiny()).eval()
        with torch.no_grad():
            assert torch.allclose(m(x), ref(x), atol=1e-6), f
    # a different class count drops the head and keeps the backbone
    m = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3,
                               pretrained=str(tmp_path / "w.safetensors"), **tiny())
    assert torch.equal(m.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_backbone_from_google_npz(tmp_path):
    """Google's original .npz layout goes through timm's npz loader."""
    import numpy as np
    import timm
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=6, **tiny()).eval()
    sd = ref.state_dict()
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0).numpy(),
         "embedding/bias": sd["patch_embed.proj.bias"].numpy(),
         "cls": sd["cls_token"].numpy(),
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"].numpy(),
         "Transformer/encoder_norm/scale": sd["norm.weight"].numpy(),
         "Transformer/encoder_norm/bias": sd["norm.bias"].numpy(),
         "head/kernel": sd["head.weight"].T.numpy(), "head/bias": sd["head.bias"].numpy()}
    heads, dim = 3, 48
    for i in range(4):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"].numpy(), sd[b + "norm1.bias"].numpy()
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"].numpy(), sd[b + "norm2.bias"].numpy()
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            wj = qkv_w[j * dim:(j + 1) * dim]                       # [out, in]
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = wj.T.reshape(dim, heads, dim // heads).numpy()
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, -1).numpy()
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, dim // heads, dim).numpy()
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"].numpy()
        for k, n in ((0, "fc1"), (1, "fc2")):
            w[p + f"MlpBlock_3/Dense_{k}/kernel"] = sd[b + f"mlp.{n}.weight"].T.numpy()
            w[p + f"MlpBlock_3/Dense_{k}/bias"] = sd[b + f"mlp.{n}.bias"].numpy()
    np.savez(tmp_path / "ViT-T.npz", **w)
    m = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", tome_r=0, num_classes=6,
                               pretrained=str(tmp_path / "ViT-T.npz"), **tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), atol=1e-5)


def test_weight_errors_are_one_line(tmp_path):
    with pytest.raises(TokenTuneError, match="does not exist") as e:
        _model(pretrained=str(tmp_path / "missing.npz"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(5, 5)}, str(bad))
    with pytest.raises(TokenTuneError, match="do not fit") as e:
        _model(pretrained=str(bad))
    assert "\n" not in str(e.value)


def test_hub_failure_says_how_to_pass_a_file(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TokenTuneError, match="pass the local file"):
        tokentune.create_model("vit_tiny_patch16_224", method="lora", pretrained=True)


def test_trained_checkpoint_mismatch(tmp_path):
    model = _model()
    tokentune.save_trained(model, str(tmp_path))
    other = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=9, tome_r=[3, 2], **tiny())
    with pytest.raises(TokenTuneError, match=r"'head\.(weight|bias)' has shape"):
        tokentune.load_trained(str(tmp_path), model=other)
    with pytest.raises(TokenTuneError, match="has no config.json"):
        tokentune.load_trained(str(tmp_path / "nowhere"))
