"""MCTF: equal to a literal reimplementation of the official code (mlvlab/MCTF @ 2004da0c, MIT)
on timm's modules, in eval and in training (teacher with a random r, consistency loss); FLOPs,
targets, source tracing, composition and bad options."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

import tokentune
from tokentune.core.flops import count_flops
from tokentune.errors import TokenTuneError
from tokentune.methods import get_method
from tokentune.methods.mctf import config_of, mctf_flops, mctf_loss, merge_count, token_counts
from tokentune.methods.tome import ViTDims

# 8x8 patches of 64 px: 64 patches + CLS, so several blocks merge and the size term acts
MID = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3)


# ----------------------------------------------------------------------------- the reference, literally
# utils/mctf.py (mctf, bipartite_soft_matching, merge_wavg, merge_source), models/SA/MHSA.py,
# models/modules/blocks.py (Block_DEIT.forward), models/deit.py (resetInfo, forward) and
# engine.py:41-59, transcribed on timm's modules (``blk.attn.qkv`` etc.), unused branches left out.
def ref_mctf(x, attn, info, prefix, train=False):
    num_protected = info["num_protected"]
    if not train and info["r_eval"] is not None:
        r = info["r_eval"]
    elif prefix == "student_":
        r = info["r_student"]
    else:
        r = info["r_teacher"]
    t = x.shape[1]
    if t - r < 10:
        r = t - 10
    r = min(int((x.shape[1] - num_protected) * r) if r < 1 else r, (x.shape[1] - num_protected) // 2)
    if r == 0:
        return x, False
    merge = ref_matching(x, attn=attn, r=r, num_protected=num_protected, tau_sim=info["tau_sim"],
                         tau_info=info["tau_info"], tau_size=info["tau_size"], size=info[prefix + "size"],
                         bidirection=info["bidirection"])
    if info["trace_source"]:
        source = info[prefix + "source"]
        if source is None:
            n, t, _ = x.shape
            source = torch.eye(t, dtype=x.dtype)[None, ...].expand(n, t, t)
        info[prefix + "source"] = merge(source, mode="amax")
    x, info[prefix + "size"], attn_n = ref_merge_wavg(merge, x, info[prefix + "size"], attn,
                                                      one_step_ahead=info["one_step_ahead"],
                                                      pooling_type=info["pooling_type"])
    return x, attn_n


def ref_matching(metric, attn, size, r, num_protected, tau_sim, tau_info, tau_size, bidirection):
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        if tau_sim:
            W_sim = a @ b.transpose(-1, -2)
            W_sim = ((W_sim + 1) / 2) ** (1 / tau_sim)
        else:
            W_sim = torch.ones((a.shape[0], a.shape[1], b.shape[1]), dtype=a.dtype)
        if tau_info > 0 and attn is not None:
            attn = 1 / attn.mean(dim=[1, 2])
            attn = attn / attn.max(1, keepdim=True)[0]
            attn_a, attn_b = attn[..., ::2, None], attn[..., 1::2, None].transpose(1, 2)
            W_info = (attn_a * attn_b) ** (1 / tau_info)
        else:
            W_info = 1
        if tau_size and size is not None:
            size = 1 / size
            size = size / size.max(1, keepdim=True)[0]
            size_a, size_b = size[..., ::2, :], size[..., 1::2, :].transpose(1, 2)
            W_size = (size_a * size_b) ** (1 / tau_size)
        else:
            W_size = 1
        scores = W_sim * W_info * W_size
        if num_protected:
            scores[..., :num_protected, :] = -math.inf
        n, t1, t2 = scores.shape
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r1:, :]
        src_idx = edge_idx[..., :r1, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if num_protected:
            unm_idx = unm_idx.sort(dim=1)[0]
        if bidirection:
            new_scores = scores.gather(dim=-2, index=unm_idx.repeat(1, 1, t2)).transpose(1, 2)
            node_max2, node_idx2 = new_scores.max(dim=-1)
            edge_max2, edge_idx2 = node_max2.sort(dim=-1, descending=True)
            edge_idx2 = edge_idx2[..., None]
            unm_idx2 = edge_idx2[..., r2:, :]
            src_idx2 = edge_idx2[..., :r2, :]
            dst_idx2 = node_idx2[..., None].gather(dim=-2, index=src_idx2)

    def dim_match(src, dim=1, dim_num=5):
        while len(src.shape) < dim_num:
            src = src.unsqueeze(dim)
        return src

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        b, mid, c = src.shape[0], src.shape[1:-2], src.shape[-1]
        dim_num = len(src.shape)
        unm_idx_ = dim_match(unm_idx, dim=1, dim_num=dim_num)
        src_idx_ = dim_match(src_idx, dim=1, dim_num=dim_num)
        dst_idx_ = dim_match(dst_idx, dim=1, dim_num=dim_num)
        unm = src.gather(dim=-2, index=unm_idx_.expand(b, *mid, t1 - r1, c))
        src = src.gather(dim=-2, index=src_idx_.expand(b, *mid, r1, c))
        dst = dst.scatter_reduce(-2, dst_idx_.expand(b, *mid, r1, c), src, reduce=mode)
        if bidirection:
            unm_idx2_ = dim_match(unm_idx2, dim=1, dim_num=dim_num)
            src_idx2_ = dim_match(src_idx2, dim=1, dim_num=dim_num)
            dst_idx2_ = dim_match(dst_idx2, dim=1, dim_num=dim_num)
            src2, dst2 = dst, unm
            unm2 = src2.gather(dim=-2, index=unm_idx2_.expand(b, *mid, t2 - r2, c))
            src2 = src2.gather(dim=-2, index=src_idx2_.expand(b, *mid, r2, c))
            dst2 = dst2.scatter_reduce(-2, dst_idx2_.expand(b, *mid, r2, c), src2, reduce=mode)
            return torch.cat([dst2, unm2], dim=-2)
        return torch.cat([unm, dst], dim=-2)

    return merge


def ref_merge_wavg(merge, x, size=None, attn=None, one_step_ahead=0, pooling_type=0):
    attn_n = False
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    if pooling_type == 1:
        size_max = size.amax(dim=-2, keepdim=True)
        with torch.no_grad():
            attn_m = attn.mean(dim=[1, 2]).unsqueeze(-1)
            norm = merge(attn_m * (size / size_max), mode="sum")
        if one_step_ahead:
            attn_n = merge(attn[..., None], mode="sum").squeeze(-1)
            attn_n = merge(attn_n * attn_m[:, None] * (size / size_max)[:, None], mode="sum").squeeze(-1)
            attn_n = attn_n / norm[:, None]
        x = merge(x * attn_m * (size / size_max), mode="sum")
        with torch.no_grad():
            size = merge(size, mode="sum")
        x = x / norm
    elif pooling_type == 3:
        size_mean = torch.ones_like(size)
        x = merge(x, mode="sum")
        if one_step_ahead:
            attn_n = merge(attn[..., None], mode="sum").squeeze(-1)
            attn_n = merge(attn_n, mode="sum").squeeze(-1)
        with torch.no_grad():
            size = merge(size, mode="sum")
            size_mean = merge(size_mean, mode="sum")
        if one_step_ahead:
            attn_n = attn_n / size_mean[:, None]
        x = x / size_mean
    else:
        x = merge(x * size, mode="sum")
        if one_step_ahead:
            attn_n = merge(attn[..., None], mode="sum").squeeze(-1)
            attn_n = merge(attn_n * size[:, None], mode="sum").squeeze(-1)
        with torch.no_grad():
            size = merge(size, mode="sum")
        if one_step_ahead:
            attn_n = attn_n / size[:, None]
        x = x / size
    return x, size, attn_n


def ref_mhsa(attn_mod, x, size=None, _attn=False):
    B, N, C = x.shape
    H = attn_mod.num_heads
    qkv_w, qkv_b = attn_mod.qkv.weight, attn_mod.qkv.bias
    if type(_attn) is bool:
        if _attn:
            qk = (x @ qkv_w.T[:, : 2 * C] + qkv_b[:2 * C]).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
            q, k = qk[0], qk[1]
        else:
            qkv = attn_mod.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * attn_mod.scale
        if size is not None:
            attn = attn + size.log()[:, None, None, :, 0]
        attn = attn.softmax(dim=-1)
        attn_ = attn
        if _attn:
            return attn_
    else:
        v = (x @ qkv_w.T[:, 2 * C:] + qkv_b[2 * C:]).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        attn = _attn
        attn_ = attn.detach()
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return attn_mod.proj(x), attn_


def ref_block(blk, layer, x, info, prefix, training):
    size = info[prefix + "size"] if info["prop_attn"] else None
    if layer in info["activate"] and info["one_step_ahead"]:
        if info["one_step_ahead"] == 1:
            attn = ref_mhsa(blk.attn, blk.norm1(x), size, _attn=True)
            x, _attn = ref_mctf(x, attn, info, prefix, training)
            x_attn, _ = ref_mhsa(blk.attn, blk.norm1(x), size, _attn=_attn)
        else:
            with torch.no_grad():
                attn = ref_mhsa(blk.attn, blk.norm1(x), size, _attn=True)
            x, _ = ref_mctf(x, attn, info, prefix, training)
            size = info[prefix + "size"] if info["prop_attn"] else None
            x_attn, _ = ref_mhsa(blk.attn, blk.norm1(x), size)
    else:
        x_attn, attn = ref_mhsa(blk.attn, blk.norm1(x), size)
    x = x + x_attn
    return x + blk.mlp(blk.norm2(x))


def ref_info(r, activate, one_step_ahead=1, pooling_type=1, bidirection=1, taus=(1, 20, 40), r_teacher=0,
             num_protected=1, trace_source=False):
    return {"activate": activate, "r_student": r, "r_teacher": r_teacher, "r_eval": None, "trace_source": trace_source,
            "prop_attn": 1, "one_step_ahead": one_step_ahead, "tau_sim": taus[0], "tau_info": taus[1],
            "tau_size": taus[2], "bidirection": bidirection, "pooling_type": pooling_type,
            "num_protected": num_protected, "student_size": None, "teacher_size": None,
            "student_source": None, "teacher_source": None}


def ref_forward(model, images, info, prefix="student_", training=False):
    """deit.py's forward on the timm model: blocks, final norm, the class token's head."""
    x = model._pos_embed(model.patch_embed(images))
    for i, blk in enumerate(model.blocks):
        x = ref_block(blk, i, x, info, prefix, training)
    x = model.norm(x)
    return model.forward_head(x), x


# ----------------------------------------------------------------------------- helpers
def build(spec="mctf", seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(MID)
    opts.update({k: v for k, v in kw.items() if not k.startswith("mctf_")})
    model = tokentune.create_model("vit_tiny_patch16_224", method=spec, num_classes=5,
                                   **{k: v for k, v in kw.items() if k.startswith("mctf_")}, **opts)
    return model.double()


def images(n=3, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- fidelity in eval
@pytest.mark.parametrize("r,one_step_ahead,pooling,bidirection", [
    (8, 1, "attention", True), (0.3, 1, "attention", True), (8, 2, "attention", True),
    (7, 1, "size", True), (8, 1, "mean", False)])
def test_eval_equals_reference(r, one_step_ahead, pooling, bidirection):
    model = build(mctf_r=r, mctf_one_step_ahead=one_step_ahead, mctf_pooling=pooling,
                  mctf_bidirection=bidirection).eval()
    x = images()
    pooling_type = {"size": 0, "attention": 1, "mean": 3}[pooling]
    info = ref_info(r, [1, 2, 3], one_step_ahead, pooling_type, int(bidirection), trace_source=True)
    with torch.no_grad():
        want, _ = ref_forward(model, x, info)
        got, state = model(x, return_state=True, trace_source=True)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.equal(state.size, info["student_size"])               # same tokens, same order
    assert torch.equal(state.source, info["student_source"])
    counts = token_counts([0, r, r, r], 65, 1)
    assert state.size.shape[1] == counts[-1] < 65


def test_without_class_token_equals_reference():
    """No prefix token (global average pool): the reference keeps the A tokens in score order."""
    model = build(mctf_r=6, class_token=False, global_pool="avg", mctf_pool_by_size=False).eval()
    x = images()
    info = ref_info(6, [1, 2, 3], num_protected=0)
    with torch.no_grad():
        want, _ = ref_forward(model, x, info)
        got = model(x)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_per_forward_r_overrides_the_built_one():
    model = build(mctf_r=8).eval()
    x = images()
    info = ref_info(8, [1, 2, 3])
    info["r_eval"] = 3
    with torch.no_grad():
        want, _ = ref_forward(model, x, info)
        assert torch.allclose(model(x, mctf_r=3), want, atol=1e-10, rtol=0)


def test_merge_count_rules():
    assert merge_count(16, 197, 1) == 16
    assert merge_count(16, 21, 1) == 10               # at least 10 tokens stay: r = t - 10 ...
    assert merge_count(16, 17, 1) == 7
    assert merge_count(0.35, 197, 1) == 68            # a fraction of the 196 patch tokens
    assert merge_count(100, 197, 1) == 98             # ... and at most half of them merge
    assert merge_count(16, 9, 1) == 0 and merge_count(0.5, 10, 1) == 0


# ----------------------------------------------------------------------------- fidelity in training
def ref_training_loss(model, x, targets, r, r_teacher, threshold, weights=(1.0, 1.0, 3.0)):
    """deit.py's teacher/student forward and engine.py's loss (task_type [1, 1, threshold])."""
    s_info = ref_info(r, [1, 2, 3], r_teacher=r_teacher)
    logits, s_tokens = ref_forward(model, x, s_info, "student_", training=True)
    t_logits, t_tokens = ref_forward(model, x, s_info, "teacher_", training=True)
    loss_consistency = ((t_tokens[:, 0].detach() - s_tokens[:, 0]) ** 2).mean(dim=1)
    loss_student = F.cross_entropy(logits, targets) * weights[0]
    loss_teacher = F.cross_entropy(t_logits, targets) * weights[1]
    probs = torch.softmax(logits, dim=-1)
    confidence_score = probs[range(len(targets)), targets]
    confidence_pass = (confidence_score > threshold).float()
    loss = loss_student + loss_teacher
    if confidence_pass.sum():
        loss = loss + (loss_consistency * confidence_pass).sum() / confidence_pass.sum() * weights[2]
    return loss, confidence_pass


def test_training_loss_and_gradients_equal_reference():
    model = build("full+mctf", mctf_r=8, mctf_teacher_r=6).train()
    x, targets = images(6), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        with torch.no_grad():
            conf = model(x).softmax(-1)[range(6), targets]
    # some images pass, some not: halfway between two confidences, so that a rounding-level difference
    # between two correct code paths cannot move an image across it (the median itself is one image's)
    threshold = float(conf.sort()[0][2:4].mean())
    model.tokentune.state["mctf"].consistency_threshold = threshold
    torch.manual_seed(5)
    r_teacher = int(torch.randint(0, 6, size=(1,)))                     # the draw the loss will make
    want, passed = ref_training_loss(model, x, targets, 8, r_teacher, threshold)
    assert 0 < passed.sum() < 6
    grads_want = torch.autograd.grad(want, [p for p in model.parameters()])
    torch.manual_seed(5)
    got, logs = mctf_loss(model, x, targets, F.cross_entropy)
    grads = torch.autograd.grad(got, [p for p in model.parameters()])
    assert logs["teacher_r"] == r_teacher and "consistency" in logs
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    for g, w in zip(grads, grads_want):
        assert torch.allclose(g, w, atol=1e-9, rtol=1e-7)


def test_training_loss_is_plain_ce_without_teacher():
    model = build("full+mctf", mctf_teacher_weight=0.0, mctf_consistency_weight=0.0).train()
    x, targets = images(2), torch.tensor([0, 1])
    loss, logs = mctf_loss(model, x, targets, F.cross_entropy)
    assert torch.allclose(loss, F.cross_entropy(model(x), targets)) and set(logs) == {"ce"}


# ----------------------------------------------------------------------------- the method around it
def test_defaults_are_the_reference_readme():
    cfg = config_of(build())
    assert (cfg.r, cfg.one_step_ahead, cfg.tau_sim, cfg.tau_info, cfg.tau_size, cfg.bidirection) == (16, 1, 1, 20, 40, True)
    assert (cfg.pooling, cfg.prop_attn, cfg.teacher_r, cfg.teacher_weight, cfg.consistency_weight,
            cfg.consistency_threshold) == ("attention", True, 8, 1.0, 3.0, 0.4)
    method = get_method("mctf")
    assert method.training_free and method.rate_option == "r"


def test_zero_r_is_the_plain_model():
    torch.manual_seed(0)
    plain = tokentune.create_model("vit_tiny_patch16_224", method="linear", num_classes=5, **tiny()).eval()
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="mctf", mctf_r=0, num_classes=5, **tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-6)


def test_analytic_flops_match_the_counter_and_targets_resolve():
    model = build(mctf_r=8).float().eval()
    dims = ViTDims.from_model(model)
    counted = count_flops(model, torch.randn(1, 3, 64, 64))
    assert mctf_flops(dims, [0, 8, 8, 8]) == counted
    model2 = build(mctf_r=8, mctf_one_step_ahead=2).float().eval()
    assert mctf_flops(dims, [0, 8, 8, 8], 2) == count_flops(model2, torch.randn(1, 3, 64, 64))
    dense = mctf_flops(dims, [0, 0, 0, 0])
    target = build(mctf_r="flops:1.5").float()
    rates = config_of(target).r
    assert dense / mctf_flops(dims, rates) >= 1.5
    assert dense / mctf_flops(dims, [rates[0], rates[1], rates[2], rates[3] - 1]) < 1.5
    tokens = config_of(build(mctf_r="tokens:30")).r
    assert token_counts(tokens, 65, 1)[-1] == 30


def test_geometric_target_resolves_to_the_smallest_fraction():
    """``":geometric"``: one fraction of the tokens in every merging block (the reference's r < 1), the
    smallest (to 4 decimals) whose FLOPs reach the target; recorded as that fraction, counted on the real forward."""
    assert get_method("mctf").rate_profiles == ("constant", "geometric")
    model = build(mctf_r="flops:1.4:geometric").float().eval()
    r = config_of(model).r
    assert isinstance(r, float) and 0 < r < 1 and round(r, 4) == r
    dims = ViTDims.from_model(model)
    dense = mctf_flops(dims, [0, 0, 0, 0])
    assert dense / mctf_flops(dims, [0, r, r, r]) >= 1.4
    assert dense / mctf_flops(dims, [0] + [r - 1e-4] * 3) < 1.4
    assert mctf_flops(dims, [0, r, r, r]) == count_flops(model, torch.randn(1, 3, 64, 64))
    counts = token_counts([0, r, r, r], 65, 1)
    assert counts[2] - counts[3] == int((counts[2] - 1) * r)                           # int((t - p) r) per block
    rebuilt = build(mctf_r=r).float().eval()                                           # the record rebuilds it
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
    few = config_of(build(mctf_r="tokens:30:geometric")).r
    assert token_counts([0, few, few, few], 65, 1)[-1] <= 30 < token_counts([0] + [few - 1e-4] * 3, 65, 1)[-1]


@pytest.mark.parametrize("model_name, published", [
    ("deit_tiny_patch16_224", {"dense": 1.26, "mctf": 0.71, "fast": 0.75}),
    ("deit_small_patch16_224", {"dense": 4.61, "mctf": 2.60, "fast": 2.76}),
])
def test_flops_reproduce_the_reference_model_zoo(model_name, published):
    """The official README's GFLOPs (mlvlab/MCTF@2004da0c, multiply-adds): MCTF r = 16 in blocks 1-11 and
    MCTF-Fast r = 0.35 in blocks 3, 6, 9 (its ``run/eval_deit_*`` scripts). Our count lands within 0.6% of
    every published figure; leaving out the matching (|A| |B| D per merging block: DeiT-T's r = 16 would count
    0.705, 0.8% under 0.71) or counting each merging block's attention map a second time (2% or more) would not."""
    model = tokentune.create_model(model_name, method="linear", num_classes=1000)
    dims = ViTDims.from_model(model)
    dense = mctf_flops(dims, [0] * 12) / 2e9
    mctf = mctf_flops(dims, [0] + [16] * 11) / 2e9
    fast = mctf_flops(dims, [0, 0, 0, 0.35, 0, 0, 0.35, 0, 0, 0.35, 0, 0]) / 2e9
    for ours, key in [(dense, "dense"), (mctf, "mctf"), (fast, "fast")]:
        assert ours == pytest.approx(published[key], rel=6e-3), key


def test_features_unmerge_and_dtype():
    model = build("lora+mctf", mctf_r=8).float().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert all(f.shape == (2, 48, 8, 8) for f in feats)
    with torch.no_grad():
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kw,match", [
    (dict(mctf_r=-1), "mctf_r must be >= 0"), (dict(mctf_r="fast"), "invalid mctf_r"),
    (dict(mctf_pooling="max"), "unknown mctf_pooling"), (dict(mctf_one_step_ahead=0), "not implemented"),
    (dict(mctf_layers=[7]), "mctf_layers has block 7"), (dict(mctf_r=[1, 2]), "one per block"),
    (dict(mctf_r="flops:50"), "out of reach"), (dict(mctf_tau_info=-1.0), "mctf_tau_info must be >= 0"),
    (dict(mctf_r="flops:1.5:decreasing"), "drop ':decreasing'"), (dict(mctf_r="flops:50:geometric"), "out of reach")])
def test_bad_options_fail_in_one_line(kw, match):
    with pytest.raises(TokenTuneError, match=match) as err:
        build(**kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["mctf+tome", "mctf+evit", "dyt+mctf", "pyra+mctf"])
def test_other_token_reducers_are_refused(spec):
    with pytest.raises(TokenTuneError, match="cannot be combined"):
        tokentune.create_model("vit_tiny_patch16_224", method=spec, num_classes=5, **tiny())


@pytest.mark.parametrize("task,options,target", [
    ("segmentation", dict(segmentation_channels=16, segmentation_scale=(64, 32)), (2, 32, 32)),
    ("video", dict(video_frames=2), (2,))])
def test_tasks_train_with_the_teacher_and_deploy(task, options, target):
    """Segmentation (features unmerged to the grid) and video (frames as images): the loss is the
    task's criterion on the student and the teacher (no class token, no consistency term)."""
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+mctf", num_classes=3, task=task, mctf_r=3,
                                   **options, **tiny())
    x = torch.randn(2, 2, 3, 32, 32) if task == "video" else torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 3, target)
    criterion = torch.nn.CrossEntropyLoss()
    loss, logs = mctf_loss(model.train(), x, y, criterion)
    loss.backward()
    assert "teacher_ce" in logs and "consistency" not in logs and torch.isfinite(loss)
    with torch.no_grad():
        assert torch.isfinite(tokentune.deploy(model.eval())(x)).all()


def test_vpt_prompts_stay_out_of_the_fusion():
    model = build("vpt+mctf", mctf_r=8, vpt_deep=True, vpt_tokens=3).eval()
    with torch.no_grad():
        _, state = model(images(2).float().double(), return_state=True)
    assert state.num_prefix == 4 and torch.equal(state.size[:, :4, 0], torch.ones(2, 4, dtype=state.size.dtype))
    assert state.size[:, 4:].sum(1).eq(64).all()


def test_merged_groups_can_be_drawn():
    from tokentune.tools.viz import default_depths, token_groups

    model = build("lora+mctf", mctf_r=8).float()
    groups = token_groups(model, torch.randn(2, 3, 64, 64), depths=default_depths(model))
    last = groups[4]
    assert last[1] == token_counts([0, 8, 8, 8], 65, 1)[-1]
    assert last[0].shape == (2, 8, 8) and int(last[0].max()) < last[1] - 1       # every patch in a group


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
@pytest.mark.parametrize("bidirection", [True, False])
def test_fusion_rows_pool_as_the_token_map(num_prefix, bidirection):
    """The pooling by kept rows plus an index_add of the merged rows (``Fusion.pool``) equals the
    sum over the map ``dest`` of every token (``match``), weighted and unweighted."""
    from tokentune.methods.mctf.matching import fusion, match, scores

    g = torch.Generator().manual_seed(num_prefix)
    for n, r in ((23, 5), (40, 12), (17, 1)):
        x = torch.randn(3, n, 6, generator=g, dtype=torch.float64)
        w = scores(x, torch.rand(3, n, generator=g, dtype=torch.float64) + 0.1, None, num_prefix, 1.0, 20.0, 40.0)
        r = min(r, w.shape[1]) if not bidirection else r
        f = fusion(w, r, n, num_prefix, bidirection)
        dest = match(w, r, n, num_prefix, bidirection)
        out = n - r
        rows = (dest + torch.arange(3)[:, None] * out).reshape(-1)
        assert torch.equal(f.rows, rows) and sorted(dest[0].unique().tolist()) == list(range(out))
        assert torch.equal(dest[:, :num_prefix], torch.arange(num_prefix).expand(3, -1))   # prefix tokens stay
        weight = torch.rand(3 * n, 1, generator=g, dtype=torch.float64)
        want = torch.zeros(3 * out, 6, dtype=torch.float64).index_add_(0, rows, x.reshape(-1, 6) * weight)
        got = f.pool(x, weight.index_select(0, f.keep), weight.index_select(0, f.src))
        assert torch.allclose(got.reshape(-1, 6), want, atol=1e-12, rtol=0)
        plain = torch.zeros(3 * out, 6, dtype=torch.float64).index_add_(0, rows, x.reshape(-1, 6))
        assert torch.allclose(f.pool(x).reshape(-1, 6), plain, atol=1e-12, rtol=0)
