"""ToMe: equivalence with timm at r=0, the algorithm as specified, schedules, protection."""
import math

import pytest
import timm
import torch
from conftest import randomize_lora, tiny

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.pyra.modulator import PYRAModulator
from tokentune.methods.tome import bipartite_soft_matching, fit_schedule, merge_weighted, parse_schedule, token_counts

VARIANTS = {
    "plain": dict(),
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "avgpool": dict(global_pool="avg", class_token=False, fc_norm=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["tome", "lora+tome", "adapter+tome"])
def test_r0_equals_timm(variant, method):
    kw = tiny(**VARIANTS[variant])
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, **kw).eval()
    torch.manual_seed(1)
    ours = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, tome_r=0, **kw).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=0)


def _slow_tome_step(x, keys, size, r, num_prefix):
    """ToMe step written directly from the description, one image at a time, with Python loops."""
    out_x, out_size = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        k = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        best = []
        for i in a_idx:
            if i < num_prefix:           # protected source
                continue
            sims = [(float(k[i] @ k[j]), j) for j in b_idx if j >= num_prefix]
            s, j = max(sims)
            best.append((s, i, j))
        best.sort(key=lambda t: -t[0])
        merged = {i: j for _, i, j in best[:r]}
        tok = {i: x[b, i] * size[b, i] for i in range(n)}
        sz = {i: size[b, i].clone() for i in range(n)}
        for i, j in merged.items():
            tok[j] = tok[j] + tok[i]
            sz[j] = sz[j] + sz[i]
        order = list(range(num_prefix)) + [i for i in a_idx if i >= num_prefix and i not in merged] + \
            [j for j in b_idx if j >= num_prefix]
        out_x.append(torch.stack([tok[i] / sz[i] for i in order]))
        out_size.append(torch.stack([sz[i] for i in order]))
    return torch.stack(out_x), torch.stack(out_size)


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
def test_matching_equals_slow_reference(num_prefix):
    torch.manual_seed(num_prefix)
    x = torch.randn(3, 23, 8)
    keys = torch.randn(3, 23, 6)
    size = torch.randint(1, 4, (3, 23, 1)).float()
    r = 6
    m = bipartite_soft_matching(keys, r, num_prefix)
    got_x, got_size = merge_weighted(x, size, m)
    want_x, want_size = _slow_tome_step(x, keys, size, r, num_prefix)
    assert torch.allclose(got_x, want_x, atol=1e-6)
    assert torch.equal(got_size, want_size)


def test_model_block_equals_spec():
    """One ToMe block of the model == attention, then the specified merge, then the MLP."""
    model = tokentune.create_model("vit_tiny_patch16_224", method="tome", num_classes=3, tome_r=[5, 3], **tiny()).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 17, 48)
    state = model.initial_state(x)
    got, st = blk(x, state)
    with torch.no_grad():
        h, keys = tokentune.attention(blk.attn, blk.norm1(x), return_keys=True)
        y = x + h
        y, size = _slow_tome_step(y, keys, torch.ones(2, 17, 1), 5, 1)
        y = y + blk.mlp(blk.norm2(y))
    assert torch.allclose(got, y, atol=1e-5)
    assert torch.equal(st.size, size)


def test_schedule_token_counts_and_prefix_protected():
    model = tokentune.create_model("vit_tiny_patch16_224", method="tome", num_classes=3,
                                   tome_r=[4, 3, 2, 1], tome_trace_source=True,
                                   **tiny(reg_tokens=2, no_embed_class=True)).eval()
    seen = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda mod, args, out, i=i: seen.append((args[0].shape[1], out[0].shape[1])))
    _, state = model(torch.randn(2, 3, 32, 32), return_state=True)
    assert [s[1] for s in seen] == token_counts([4, 3, 2, 1], 19)[1:]
    assert [s[0] for s in seen] == token_counts([4, 3, 2, 1], 19)[:-1]
    src = state.source            # [B, N, N0]
    assert src.shape == (2, 19 - 10, 19)
    for p in range(3):            # CLS and both registers: still alone, still at the front
        assert torch.equal(src[:, p], torch.nn.functional.one_hot(torch.tensor(p), 19).float().expand(2, 19))
    assert torch.equal(src.sum(1), torch.ones(2, 19))   # every input token lands in exactly one output
    assert torch.equal(state.size[..., 0], src.sum(-1))


def test_fused_equals_explicit_attention():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=3, tome_r=3,
                                   **tiny(qk_norm=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_one_image_of_few_tokens_runs_the_explicit_softmax(monkeypatch):
    """Batch 1, at most EXPLICIT_MAX_TOKENS tokens, no autograd: the explicit softmax replaces SDPA
    (faster there on the CPU) and gives the same logits as SDPA on the same image in a batch."""
    from tokentune.core import attention as attention_module
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=3, tome_r=3,
                                   **tiny(qk_norm=True)).eval()
    randomize_lora(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        batched = model(images)
        assert len(calls) == len(model.blocks)            # two images: SDPA in every block
        calls.clear()
        one = model(images[:1])
        assert calls == []                                 # one image of 17 tokens: never SDPA
    assert torch.allclose(one[0], batched[0], atol=1e-5, rtol=0)
    model(images[:1])                                      # autograd on: SDPA (no attention map kept)
    assert len(calls) == len(model.blocks)
    q = torch.zeros(1, 2, attention_module.EXPLICIT_MAX_TOKENS + 1, 4)
    with torch.no_grad():
        assert not attention_module.explicit_is_faster(q)                     # too many tokens
        assert attention_module.explicit_is_faster(q[:, :, :-1])
        assert not attention_module.explicit_is_faster(q[:, :, :-1].bfloat16())   # only float32 was measured


def test_proportional_attention_changes_output():
    kw = tiny()
    torch.manual_seed(3)
    a = tokentune.create_model("vit_tiny_patch16_224", method="tome", tome_r=3, tome_prop_attn=True, **kw).eval()
    b = tokentune.create_model("vit_tiny_patch16_224", method="tome", tome_r=3, tome_prop_attn=False, **kw).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x), atol=1e-4)


def test_parse_schedule_forms():
    assert parse_schedule(3, 4) == [3, 3, 3, 3]
    assert parse_schedule([5, 2], 4) == [5, 2, 0, 0]
    assert parse_schedule((8, -1.0), 3) == [16, 8, 0]
    assert parse_schedule((8, 0.0), 3) == [8, 8, 8]
    with pytest.raises(TokenTuneError):
        parse_schedule([1] * 5, 4)
    with pytest.raises(TokenTuneError):
        parse_schedule([-1], 4)


def test_int_schedule_is_capped_like_tome():
    # ViT-B/16 at 224: r=16 in every block merges only 10 in the last one
    assert fit_schedule([16] * 12, 197, 1, strict=False) == [16] * 11 + [10]


def test_schedule_too_large_is_clear_error():
    with pytest.raises(TokenTuneError, match="merge schedule asks for r=9 in block 1"):
        tokentune.create_model("vit_tiny_patch16_224", method="tome", tome_r=[8, 9], **tiny())


def test_named_schedule_vit_b():
    from tokentune.methods.tome import named_schedule
    assert named_schedule("vit_base_patch16_224.orig_in21k", "low", 12) == [16] * 11 + [10]
    assert token_counts(named_schedule("vit_base_patch16_224", "high", 12), 197)[-1] == 5
    with pytest.raises(TokenTuneError, match="no 'low' merge schedule"):
        named_schedule("vit_small_patch16_224", "low", 12)


def test_gradient_checkpointing_with_tome_trains():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=4, tome_r=3,
                                   drop_path_rate=0.1, **tiny())
    model.set_grad_checkpointing(True)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(5):
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert model.blocks[0].attn.qkv.lora_B.abs().sum() > 0


def test_checkpointing_gives_same_gradients():
    """Checkpointing re-runs blocks in backward; the token state must not be consumed twice."""
    kw = tiny(drop_path_rate=0.2)
    a = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=4, tome_r=3, **kw)
    b = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=4, tome_r=3, **kw)
    randomize_lora(a)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    a.train(), b.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    a(x).square().sum().backward()
    torch.manual_seed(5)
    b(x).square().sum().backward()   # same dropout / drop-path draws, preserved across recompute
    for name in ("blocks.1.attn.qkv.lora_A", "blocks.3.attn.qkv.lora_A", "head.weight"):
        ga = a.get_parameter(name).grad
        gb = b.get_parameter(name).grad
        assert ga.abs().sum() > 0
        assert torch.allclose(ga, gb, atol=1e-6), name


def _reference_merge_weighted(x, size, keys, r, num_prefix, modulate=None):
    """ToMe's published formulation: gather/scatter_reduce on the A/B halves, then cat (PYRA: the
    weighted sources are modulated, given their weighted destinations, before the scatter)."""
    import math as _m
    B, N, C = x.shape
    k = keys / keys.norm(dim=-1, keepdim=True)
    a, b = k[:, ::2], k[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, : (num_prefix + 1) // 2, :] = -_m.inf
    scores[:, :, : num_prefix // 2] = -_m.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)[..., None]
    unm, src_i = edge[:, r:], edge[:, :r]
    dst_i = node_idx[..., None].gather(1, src_i)
    unm = unm.sort(dim=1)[0]

    def mrg(t, hook=None):
        c = t.shape[-1]
        ta, tb = t[:, ::2], t[:, 1::2]
        u = ta.gather(1, unm.expand(B, unm.shape[1], c))
        s = ta.gather(1, src_i.expand(B, r, c))
        if hook is not None:
            s = hook(s, tb.gather(1, dst_i.expand(B, r, c)))
        tb = tb.scatter_reduce(1, dst_i.expand(B, r, c), s, reduce="sum")
        return torch.cat([u, tb], dim=1)
    xs = mrg(x * size, modulate)
    ss = mrg(size)
    return xs / ss, ss


def test_merge_values_and_gradients_equal_reference_formulation():
    """Many sources share a destination here (few B tokens): values AND gradients must match."""
    torch.manual_seed(0)
    B, N, C, r = 2, 21, 5, 8
    keys = torch.randn(B, N, 4, dtype=torch.float64)
    # B tokens nearly identical, so sources pile onto few destinations
    keys[:, 1::2] = keys[:, 1:2] + 1e-3 * torch.randn(B, N // 2, 4, dtype=torch.float64)
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(B, N, 1, dtype=torch.float64) + 0.5).requires_grad_(True)
    m = bipartite_soft_matching(keys, r, 1)
    assert len(set(m.dst_out.tolist())) < len(m.dst_out)          # duplicates really occur
    got_x, got_s = merge_weighted(x, size, m)
    want_x, want_s = _reference_merge_weighted(x, size, keys, r, 1)
    assert torch.allclose(got_x, want_x, atol=1e-12) and torch.allclose(got_s, want_s, atol=1e-12)
    w1, w2 = torch.randn_like(got_x), torch.randn_like(got_s)
    g_got = torch.autograd.grad((got_x * w1).sum() + (got_s * w2).sum(), (x, size))
    g_want = torch.autograd.grad((want_x * w1).sum() + (want_s * w2).sum(), (x, size))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-10)


def test_modulated_merge_equals_reference_formulation():
    """PYRA's path through the merge (the modulator's change enters as an extra increment) equals
    modulating the weighted sources and scatter-summing them, with shared destinations: values and
    gradients, including the gradients that reach the modulator's parameters."""
    torch.manual_seed(1)
    B, N, C, r = 2, 21, 6, 8
    keys = torch.randn(B, N, 4, dtype=torch.float64)
    keys[:, 1::2] = keys[:, 1:2] + 1e-3 * torch.randn(B, N // 2, 4, dtype=torch.float64)
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (B, N, 1)).double()
    mod = PYRAModulator(r, C).double()
    with torch.no_grad():
        mod.W_D.normal_(0, 1.0)
    m = bipartite_soft_matching(keys, r, 1)
    assert len(set(m.dst_out.tolist())) < len(m.dst_out)
    got_x, got_s = merge_weighted(x, size, m, mod)
    want_x, want_s = _reference_merge_weighted(x, size, keys, r, 1, mod)
    assert torch.allclose(got_s, want_s)
    assert torch.allclose(got_x, want_x, atol=1e-12)
    plain, _ = merge_weighted(x, size, m)
    assert (plain - got_x).abs().max() > 1e-2                     # the modulator really changes the merge
    w = torch.randn_like(got_x)
    params = (x, mod.W_r, mod.W_D, mod.norm.weight)
    g_got = torch.autograd.grad((got_x * w).sum(), params)
    g_want = torch.autograd.grad((want_x * w).sum(), params)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora+tome", "pyra"])
def test_compiled_deploy_equals_eager(method):
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=3, tome_r=[4, 3, 2, 1],
                                   **tiny()).eval()
    randomize_lora(model)
    eager = tokentune.deploy(model)
    compiled = tokentune.deploy(model, compile=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", [dict(class_token=False), dict(class_token=True),
                                    dict(class_token=False, reg_tokens=2, pool_include_prefix=True)],
                         ids=["no_prefix", "cls", "registers_pooled"])
def test_average_pool_weights_merged_tokens_by_size_as_tome_mae(prefix):
    """ToMe's MAE patch pools ``(x * size)[:, prefix:].sum(1) / N`` (N patches): the mean over the
    patches, each merged token counted as often as it has patches (prefix tokens too where timm's
    ``pool_include_prefix`` pools them). ``tome_pool_by_size=False`` keeps timm's unweighted mean
    over the tokens left."""
    kw = tiny(global_pool="avg", fc_norm=True, **prefix)
    x = torch.randn(3, 3, 32, 32)
    for by_size in (True, False):
        torch.manual_seed(2)
        model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=5, tome_r=[4, 3],
                                       tome_pool_by_size=by_size, **kw).eval()
        randomize_lora(model)
        with torch.no_grad():
            logits, state, tokens = model(x, return_state=True, return_tokens=True)
            p = 0 if prefix.get("pool_include_prefix") else model.num_prefix_tokens
            size, patches = state.size[:, p:], model.patch_embed.num_patches + model.num_prefix_tokens - p
            assert torch.equal(size.sum(dim=1), torch.full((3, 1), float(patches)))
            pooled = (tokens[:, p:] * size).sum(dim=1) / patches if by_size else tokens[:, p:].mean(dim=1)
            want = model.head(model.fc_norm(pooled))
            assert torch.allclose(logits, want, atol=1e-5, rtol=0)
            other = (tokens[:, p:].mean(dim=1) if by_size else (tokens[:, p:] * size).sum(dim=1) / patches)
            assert (model.head(model.fc_norm(other)) - logits).abs().max() > 1e-3      # the weighting matters
        deployed = tokentune.deploy(model)
        with torch.no_grad():
            assert torch.allclose(deployed(x), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_one_image_path_equals_the_batched_path(num_prefix):
    """An image alone (flat positions without batch offsets) merges as it does inside a batch."""
    torch.manual_seed(7)
    B, N, C, r = 3, 25, 8, 7
    x, keys = torch.randn(B, N, C), torch.randn(B, N, 6)
    size = torch.randint(1, 4, (B, N, 1)).float()
    batched = bipartite_soft_matching(keys, r, num_prefix)
    want_x, want_s = merge_weighted(x, size, batched)
    for i in range(B):
        one = bipartite_soft_matching(keys[i:i + 1], r, num_prefix)
        got_x, got_s = merge_weighted(x[i:i + 1], size[i:i + 1], one)
        assert torch.allclose(got_x[0], want_x[i], atol=1e-6, rtol=0)
        assert torch.equal(got_s[0], want_s[i])
        rows = slice(i * r, (i + 1) * r)
        assert torch.equal(one.src + i * N, batched.src[rows]) and torch.equal(one.dst + i * N, batched.dst[rows])
        assert torch.equal(one.dst_out + i * (N - r), batched.dst_out[rows])
        assert torch.equal(one.keep + i * N, batched.keep[i * (N - r):(i + 1) * (N - r)])
    with torch.no_grad():                   # the model at batch 1 equals the same image in a batch
        model = tokentune.create_model("vit_tiny_patch16_224", method="tome", num_classes=3, tome_r=[4, 3],
                                       **tiny()).eval()
        images = torch.randn(3, 3, 32, 32)
        full = model(images)
        for i in range(3):
            assert torch.allclose(model(images[i:i + 1])[0], full[i], atol=1e-5, rtol=0)
