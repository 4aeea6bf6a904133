"""FPET: the checkerboard split, the straight-through matching, binary adapters, and a literal
reimplementation of kyk120/fpet@17a45e76 (written here from reading ``fpet/apply_fpet.py``,
``fpet/merge_fpet.py``, ``adaptformer.py`` and ``utils.py``; that repository has no licence, so its
code is not copied) compared with ours on identical weights, in eval and in training (gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.binary import BinaryLinear, binarized_weight, storage_bytes
from tokentune.methods.fpet import FPETMerge, checkerboard, merges_of

MODEL = "vit_tiny_patch16_224"
LEVEL_1BIT = 0.6744897501960817          # scipy.stats.norm.ppf(0.75): the reference's 1-bit level


# ----------------------------------------------------------------------------- the reference, literally
def ref_qlinear(x, weight):
    """utils.py QLinear.forward with bits=1 (its quantize(1) gives thresholds [0] and levels +-0.6745)."""
    mean_w = weight.mean()
    std_w = weight.std()
    w = (weight - mean_w) / (std_w + 1e-5)
    q = (torch.sign(w.data.unsqueeze(-1) - torch.zeros(1)) * torch.tensor([LEVEL_1BIT])).sum(-1)
    wb = q.data + w - w.data
    return F.linear(x, wb * std_w + mean_w, None)


def ref_adapter(x, down, up, bits, relu=True, p=0.1, training=False):
    """adaptformer.py Adapter.forward (bit 32: plain bias-free Linear layers)."""
    lin = ref_qlinear if bits == 1 else (lambda v, w: F.linear(v, w))
    h = lin(x, down)
    h = F.relu(h) if relu else h
    h = F.dropout(h, p, training)
    return lin(h, up)


def ref_checkerboard_split(x, protected):
    x_others = x
    if protected:
        x_cls = x_others[:, :1, :]
        x_others = x_others[:, 1:, :]
    B, N, C = x_others.shape
    width = 14 if N == 196 else int(math.floor(math.sqrt(N)))
    height = int(N / width)
    x_others = x_others.view(B, height, width, C)
    x_tl = x_others[..., ::2, :][:, ::2, :, :].reshape(B, -1, C)
    x_br = x_others[..., 1::2, :][:, 1::2, :, :].reshape(B, -1, C)
    x_tr = x_others[..., ::2, :][:, 1::2, :, :].reshape(B, -1, C)
    x_bl = x_others[..., 1::2, :][:, ::2, :, :].reshape(B, -1, C)
    a = torch.cat([x_tl, x_br], dim=1)
    b = torch.cat(([x_cls] if protected else []) + [x_tr, x_bl], dim=1)
    return a, b


def ref_matching(metric):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = ref_checkerboard_split(metric, 1)
    scores = a @ b.transpose(-1, -2)
    scores[..., :, 0] = -math.inf
    v, _ = torch.topk(scores, 2, dim=-1)
    soft = torch.sigmoid(scores - v.mean(dim=-1, keepdim=True))
    hard = (soft > 0.5).float()
    matching = soft + (hard - soft).detach()

    def merge(x):
        x_a, x_b = ref_checkerboard_split(x, 1)
        return x_b + torch.einsum("bik,bij->bkj", matching, x_a)
    return merge


def ref_merge_wavg(merge, x, size):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def ref_attention(attn, x, size, lora=None):
    """FPETAttention.forward, or with ``lora=(bits, scale, training)`` apply_fpet.py's forward_attn (lora.py's
    q and v adapters: identity activation, dropout on the hidden)."""
    B, N, C = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, C // attn.num_heads)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if lora is not None:
        bits, scale, training = lora
        A, Bw = attn.qkv.lora_A, attn.qkv.lora_B
        delta_q = ref_adapter(x, A[0], Bw[0], bits, relu=False, training=training) * scale
        delta_v = ref_adapter(x, A[1], Bw[1], bits, relu=False, training=training) * scale
        heads = lambda d: d.reshape(B, N, attn.num_heads, C // attn.num_heads).permute(0, 2, 1, 3)  # noqa: E731
        q, v = q + heads(delta_q), v + heads(delta_v)
    a = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        a = a + size.log()[:, None, None, :, 0]
    a = a.softmax(dim=-1)
    x = (a @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(x), k.mean(1)


def ref_forward(model, images, r_layer, bits, scale, training=False, lora=False):
    """main.py's adaptformer (or lora) + apply_patch(prop_attn=True): FPET's forward_block (FPETBlock) on every block."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = None
    for i, blk in enumerate(model.blocks):
        x_attn, metric = ref_attention(blk.attn, blk.norm1(x), size, (bits, scale, training) if lora else None)
        x = x + x_attn
        if i == r_layer:
            ref = blk.merge.refinement
            metric = metric.detach()
            metric = metric + 1 * ref_adapter(metric, ref.down_proj.weight, ref.up_proj.weight, ref.bits,
                                              training=training)
            x, size = ref_merge_wavg(ref_matching(metric), x, size)
        if lora:
            x = x + blk.mlp(blk.norm2(x))
            continue
        ad = blk.adapter
        x = x + blk.mlp(blk.norm2(x)) + ref_adapter(x, ad.down_proj.weight, ad.up_proj.weight, bits,
                                                     training=training) * scale
    return model.forward_head(model.norm(x)), size


def _fpet(bits=1, r_layer=2, img=32, scale=0.1, seed=0, lora=False, **kw):
    torch.manual_seed(seed)
    if lora:     # FPET's LoRA: q and v, rank = --dim, scale s = alpha / rank, dropout on the hidden
        peft = dict(method="lora+fpet", lora_targets=("q", "v"), lora_rank=8, lora_alpha=8 * scale, lora_bits=bits,
                    lora_hidden_dropout=True)
    else:
        peft = dict(method="adapter+fpet", adapter_bits=bits, adapter_bias=False, adapter_bottleneck=8,
                    adapter_scale=scale)
    model = tokentune.create_model(MODEL, num_classes=5, fpet_r_layer=r_layer, **peft, **tiny(img_size=img), **kw)
    with torch.no_grad():                   # float up projections start at zero: move every weight
        for name, p in model.named_parameters():
            if p.requires_grad and ("up_proj" in name or "lora_B" in name):
                p.add_(torch.randn_like(p) * 0.3)
    return model


# ----------------------------------------------------------------------------- the split
def test_checkerboard_is_the_reference_order_and_a_true_checkerboard():
    for h, w in [(4, 4), (5, 5), (14, 14), (3, 6), (7, 4)]:
        a, b = checkerboard(h, w)
        assert sorted(torch.cat([a, b]).tolist()) == list(range(h * w))
        assert all((i // w + i % w) % 2 == 0 for i in a.tolist())          # A: row + column even
        assert all((i // w + i % w) % 2 == 1 for i in b.tolist())
        if h == w:                            # square grids: the reference's own split, token for token
            idx = torch.arange(1 + h * w, dtype=torch.float)[None, :, None]
            ra, rb = ref_checkerboard_split(idx, 1)
            assert ra.flatten().long().tolist() == (a + 1).tolist()
            assert rb.flatten().long().tolist() == [0] + (b + 1).tolist()
    a, b = checkerboard(14, 14)
    assert (len(a), len(b)) == (98, 98)                                  # ViT-B/16: 197 -> 1 + 98 = 99


# ----------------------------------------------------------------------------- binary layers
def test_binary_linear_equals_the_reference_qlinear_with_its_gradient():
    torch.manual_seed(3)
    layer = BinaryLinear(6, 5, bits=1)
    ref_w = layer.weight.detach().clone().requires_grad_(True)
    x = torch.randn(4, 6)
    g = torch.randn(4, 5)
    (layer(x) * g).sum().backward()
    (ref_qlinear(x, ref_w) * g).sum().backward()
    assert torch.allclose(layer(x), ref_qlinear(x, ref_w), atol=1e-6)
    assert torch.allclose(layer.weight.grad, ref_w.grad, atol=1e-6)
    w = layer.weight.detach()
    want = torch.sign(w - w.mean()) * LEVEL_1BIT * w.std() + w.mean()
    assert torch.allclose(binarized_weight(w, 1), want, atol=1e-6)
    folded = layer.fold()
    assert type(folded) is torch.nn.Linear and torch.allclose(folded(x), layer(x), atol=1e-6)
    assert layer.storage_bits() == {layer.weight: 30 + 64}


def test_binary_adapter_option_and_storage_as_the_paper_counts():
    model = tokentune.create_model(MODEL, method="adapter", num_classes=5, adapter_bits=1, adapter_bottleneck=8,
                                   **tiny())
    ad = model.blocks[0].adapter
    assert isinstance(ad.down_proj, BinaryLinear) and ad.down_proj.bias is None and ad.up_proj.bias is None
    assert 0 < ad.up_proj.weight.abs().max() <= 0.002                  # not zero at init (adaptformer.py:24)
    n = 2 * 48 * 8                                                      # weights per adapter
    stored = storage_bytes(model, lambda name: ".adapter." in name)
    assert stored == 4 * (n + 2 * 64) / 8                               # 1 bit each + mu, sigma per layer
    line = tokentune.print_trainable_parameters(model)
    assert "storage" in line
    lora = _fpet(lora=True)                                             # 1-bit LoRA q, v: A and B per part
    assert tokentune.count_parameters(lora)["paper_storage_bytes"] == (
        4 * 2 * (2 * 48 * 8 + 2 * 64) / 8 + (2 * 16 * 32 + 2 * 64) / 8)        # + the 1-bit refinement (head 16)
    with pytest.raises(TokenTuneError, match="adapter_bits"):
        tokentune.create_model(MODEL, method="adapter", adapter_bits=3, **tiny())


# ----------------------------------------------------------------------------- reference parity
@pytest.mark.parametrize("bits,img,lora", [(1, 32, False), (32, 32, False), (1, 40, False), (1, 32, True),
                                           (32, 40, True)])   # 4x4 and odd 5x5 grids, AdaptFormer and LoRA
def test_eval_equals_the_reference(bits, img, lora):
    model = _fpet(bits=bits, img=img, lora=lora).eval()
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        out, state = model(x, return_state=True)
        want, size = ref_forward(model, x, 2, bits, 0.1, lora=lora)
    n = (img // 8) ** 2
    assert state.size.shape[1] == 1 + n // 2                             # prefix + |B| tokens
    assert torch.allclose(state.size, size, atol=1e-6)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_training_and_straight_through_gradients_equal_the_reference(lora):
    model = _fpet(bits=1, lora=lora).train()
    x = torch.randn(4, 3, 32, 32)
    g = torch.randn(4, 5)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    out = model(x)
    ours = torch.autograd.grad((out * g).sum(), params)
    torch.manual_seed(7)                                                 # the same dropout draws, in the same order
    want, _ = ref_forward(model, x, 2, 1, 0.1, training=True, lora=lora)
    ref = torch.autograd.grad((want * g).sum(), params)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    refine = [i for i, n in enumerate(names) if ".merge.refinement." in n]
    assert refine and all(ours[i].abs().sum() > 0 for i in refine)      # the matching trains the refinement
    for name, a, b in zip(names, ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("lora", [False, True])
def test_deployed_equals_the_training_time_model_and_keeps_static_shapes(lora):
    model = _fpet(bits=1, lora=lora).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    fast = tokentune.deploy(model)
    merge = merges_of(fast)[0]
    assert not merge.straight_through and not any(isinstance(m, BinaryLinear) for m in fast.modules())
    with torch.no_grad():
        got, state = fast(x, return_state=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert state.size.shape == (3, 9, 1) and torch.equal(state.size.sum(1), torch.full((3, 1), 17.0))


def test_tie_drops_the_token_as_the_reference_does():
    # two identical B tokens: every A token's top-1 and top-2 tie, nothing passes 0.5 (merge_fpet.py:92-95)
    merge = FPETMerge(4, (2, 2), tokentune.methods.fpet.FPETConfig(refine_bits=32)).eval()
    with torch.no_grad():
        merge.refinement.up_proj.weight.zero_()
    keys = torch.tensor([[[1.0, 0, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [3, 1, 0, 0]]])
    x = torch.randn(1, 5, 6)
    state = tokentune.core.state.TokenState(num_prefix=1)
    out, st = merge(x, keys, state)
    assert out.shape == (1, 3, 6) and torch.equal(st.size.flatten(), torch.ones(3))   # both A tokens dropped


# ----------------------------------------------------------------------------- options, composition
def test_r_layer_zero_is_the_plain_adapter_model():
    base = _fpet(r_layer=0).eval()
    assert not merges_of(base)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, state = base(x, return_state=True)
    assert state.size is None


def test_bad_options_fail_in_one_line():
    for kw, match in [(dict(fpet_r_layer=4), "fpet_r_layer=4 but the model has 4 blocks"),
                      (dict(fpet_r_layer=-1), "fpet_r_layer"), (dict(fpet_refine_bits=3), "fpet_refine_bits"),
                      (dict(fpet_refine_dim=0), "fpet_refine_dim")]:
        with pytest.raises(TokenTuneError, match=match) as e:
            tokentune.create_model(MODEL, method="adapter+fpet", **kw, **tiny())
        assert "\n" not in str(e.value)
    with pytest.raises(TokenTuneError, match="lora_bits"):
        tokentune.create_model(MODEL, method="lora+fpet", lora_bits=3, **tiny())
    with pytest.raises(TokenTuneError, match="both 'qkv' and its part"):
        tokentune.create_model(MODEL, method="lora", lora_targets=("qkv", "q"), **tiny())
    with pytest.raises(TokenTuneError, match="peft's LoRA format cannot hold a LoRA on q/k/v parts"):
        tokentune.save_peft(_fpet(lora=True), "unused")
    with pytest.raises(TokenTuneError, match="cannot be combined"):
        tokentune.create_model(MODEL, method="lora+tome+fpet", **tiny())
    with pytest.raises(TokenTuneError, match="cannot split a 1x2"):
        tokentune.create_model(MODEL, method="fpet", fpet_r_layer=1, **tiny(img_size=(8, 16)))


@pytest.mark.parametrize("spec", ["lora+fpet", pytest.param("vpt+fpet", marks=pytest.mark.slow),
                                  pytest.param("full+fpet", marks=pytest.mark.slow)])
def test_compositions_train_and_deploy(spec):
    torch.manual_seed(0)
    model = tokentune.create_model(MODEL, method=spec, num_classes=5, fpet_r_layer=1, **tiny())
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "refinement" in n)
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = tokentune.deploy(model)(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_sources_and_unmerged_features():
    model = _fpet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, state = model(x, return_state=True, trace_source=True)
        feats = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert state.source.shape == (2, 9, 17)
    assert torch.equal(state.source.sum(1), torch.ones(2, 17))          # every patch in exactly one token
    assert torch.equal(state.source.sum(2, keepdim=True), state.size)
    assert [f.shape for f in feats] == [(2, 48, 4, 4)] * 2


@pytest.mark.parametrize("name", ["fpet-vtab", "fpet-vtab-lora", "fpet-vtab-1bit", "fpet-vtab-lora-1bit"])
def test_recipes_build(name):
    recipe = tokentune.get_recipe(name)
    tokentune.TrainConfig(**recipe.train_options)
    opts = dict(recipe.model_options, fpet_r_layer=2)          # the tiny model has 4 blocks
    model = tokentune.create_model(MODEL, method=recipe.method, num_classes=3, **opts, **tiny())
    assert len(merges_of(model)) == 1 and recipe.train_options["lr"] == 1e-3


# ----------------------------------------------------------------------------- the other capabilities
@pytest.mark.slow
def test_merge_picture_groups_segmentation_video_and_half_precision():
    from tokentune.tools import viz

    model = _fpet().eval()
    x = torch.randn(2, 3, 32, 32)
    groups = viz.token_groups(model, x)
    g, tokens = groups[4]
    assert tokens == 9 and g.shape == (2, 4, 4)                     # every patch in one of the 8 B groups
    seg = tokentune.create_model(MODEL, method="adapter+fpet", fpet_r_layer=2, num_classes=3, task="segmentation",
                                 segmentation_channels=16, segmentation_scale=(64, 32), **tiny()).eval()
    with torch.no_grad():
        assert torch.allclose(tokentune.deploy(seg)(x), seg(x), atol=1e-5)
        assert seg(x).shape == (2, 3, 32, 32)
    video = tokentune.create_model(MODEL, method="adapter+fpet", fpet_r_layer=2, num_classes=3, task="video",
                                   video_frames=2, **tiny()).eval()
    with torch.no_grad():
        assert video(torch.randn(2, 2, 3, 32, 32)).shape == (2, 3)
    half = tokentune.deploy(model).to(torch.bfloat16)
    with torch.no_grad():
        out = half(x.to(torch.bfloat16)).float()
        assert torch.allclose(out, model(x), atol=0.1, rtol=0.1)
