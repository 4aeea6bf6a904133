"""LoRA, adapters, parameter reports, deploy."""
import math

import pytest
import timm
import torch
from conftest import randomize_lora, tiny

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.lora import LoRALinear


def test_lora_linear_math_and_merge():
    base = torch.nn.Linear(12, 30)
    lora = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 12)
    want = base(x) + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    assert torch.allclose(lora(x), want, atol=1e-5)
    merged = lora.merge()
    assert type(merged) is torch.nn.Linear
    assert torch.allclose(merged(x), lora(x), atol=1e-5)


def test_lora_init_is_identity_and_a_is_kaiming():
    base = torch.nn.Linear(64, 192)
    lora = LoRALinear(base, rank=8)
    assert torch.count_nonzero(lora.lora_B) == 0
    bound = 1 / math.sqrt(64)            # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.8 * bound
    x = torch.randn(3, 64)
    assert torch.equal(lora.eval()(x), base(x))


@pytest.mark.parametrize("method", ["lora", "lora+tome"])
def test_merged_lora_equals_unmerged(method):
    extra = dict(tome_r=2) if "tome" in method else {}
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=7,
                                   lora_targets=("qkv", "proj", "fc1", "fc2"), **extra, **tiny()).eval()
    randomize_lora(model)
    x = torch.randn(3, 3, 32, 32)
    deployed = tokentune.deploy(model)
    assert not any(isinstance(m, LoRALinear) for m in deployed.modules())
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)


def test_deploy_plain_lora_returns_plain_timm_model():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=7, **tiny()).eval()
    randomize_lora(model)
    deployed = tokentune.deploy(model)
    assert type(deployed) is timm.models.vision_transformer.VisionTransformer
    assert type(deployed.blocks[0]) is timm.models.vision_transformer.Block
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)
    # and it is an ordinary timm model: its state dict loads into a fresh one
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=7, **tiny()).eval()
    fresh.load_state_dict(deployed.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)


def test_lora_reference_parametrisation():
    """q,k,v = qkv(x) + B A dropout(x), alpha = rank: the PYRA/NOAH LoRA."""
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", lora_rank=4, **tiny()).eval()
    randomize_lora(model)
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 5, 48)
    want = torch.nn.functional.linear(x, qkv.weight, qkv.bias) + (x @ qkv.lora_A.T) @ qkv.lora_B.T
    assert torch.equal(qkv(x), want)


def test_adapter_zero_init_and_trainable_set():
    kw = tiny()
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, **kw).eval()
    torch.manual_seed(1)
    model = tokentune.create_model("vit_tiny_patch16_224", method="adapter", num_classes=5, adapter_bottleneck=8, **kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), ref(x), atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.adapter.{p}" for i in range(4)
                         for p in ("down_proj.weight", "down_proj.bias", "up_proj.weight", "up_proj.bias")} | \
        {"head.weight", "head.bias"}


def test_adapter_forward_is_parallel_to_mlp():
    model = tokentune.create_model("vit_tiny_patch16_224", method="adapter", adapter_scale=0.5, **tiny()).eval()
    blk = model.blocks[0]
    with torch.no_grad():
        blk.adapter.up_proj.weight.normal_()
    x = torch.randn(2, 17, 48)
    got, _ = blk(x, model.initial_state(x))
    with torch.no_grad():
        y = x + blk.attn(blk.norm1(x))
        a = 0.5 * blk.adapter.up_proj(torch.relu(blk.adapter.down_proj(y)))
        want = y + blk.mlp(blk.norm2(y)) + a
    assert torch.allclose(got, want, atol=1e-5)


def test_parameter_counts_vit_b_lora_rank8():
    model = tokentune.create_model("vit_base_patch16_224", method="lora", lora_rank=8, num_classes=100)
    c = tokentune.count_parameters(model)
    assert c["per_method"]["lora"] == 294_912
    assert c["backbone"] == 85_798_656
    assert c["paper_trainable"] == 294_912
    assert abs(c["paper_pct"] - 0.3437) < 1e-3
    line = tokentune.print_trainable_parameters(model)
    assert line.startswith(f"trainable params: {294_912 + 76_900:,} || all params: ")


def test_full_and_linear_trainable_sets():
    full = tokentune.create_model("vit_tiny_patch16_224", method="full+tome", tome_r=2, **tiny())
    assert all(p.requires_grad for p in full.parameters())
    lin = tokentune.create_model("vit_tiny_patch16_224", method="linear", num_classes=3, **tiny())
    assert {n for n, p in lin.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_bad_specs_are_clear():
    with pytest.raises(TokenTuneError, match="unknown method 'lorra'"):
        tokentune.create_model("vit_tiny_patch16_224", method="lorra", **tiny())
    with pytest.raises(TokenTuneError, match="unknown model 'vit_tinny_patch16_224'.*did you mean"):
        tokentune.create_model("vit_tinny_patch16_224", method="lora")
    with pytest.raises(TokenTuneError, match="unknown lora option"):
        tokentune.create_model("vit_tiny_patch16_224", method="lora", lora_rnk=3, **tiny())
    with pytest.raises(TokenTuneError, match="belongs to method 'tome'"):
        tokentune.create_model("vit_tiny_patch16_224", method="lora", tome_r=3, **tiny())
    with pytest.raises(TokenTuneError, match="cannot be combined"):
        tokentune.create_model("vit_tiny_patch16_224", method="full+lora", **tiny())
