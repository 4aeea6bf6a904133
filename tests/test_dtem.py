"""DTEM: a literal reimplementation of the official code's math (eval and training, forward and
gradients) on timm's modules, the identity setting, deployment, composition, FLOPs, errors."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny

import tokentune
from tokentune import cli
from tokentune.core.flops import count_flops
from tokentune.errors import TokenTuneError
from tokentune.methods import get_method
from tokentune.methods.dtem import DTEMMerging, load_reference_checkpoint, soft_assignment
from tokentune.methods.tome import ViTDims, vit_flops
from tokentune.tools import viz

KW = tiny(img_size=48)            # 36 patches + CLS
SCHEDULE = [6, 5, 4, 3]


# ----------------------------------------------------------------------------- the reference, literally
# movinghoon/DTEM @ 13f20463, dtem/dtem.py and dtem/utils.py, rewritten line by line on timm's
# modules (the reference patches timm's Attention/Block classes; here the same lines run on the
# adapted blocks' own submodules). k2=3, tau1=tau2=0.1 as its train.py.
def _ref_bipartite(metric, r):
    """utils.py:10-77, class_token=True: merge(x, mode) of ToMe's reference."""
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)
    return merge


def _ref_attention(blk, x, size, training, prop_attn=True):
    """DTEMLinear + DTEMAttention.forward (dtem.py:11-99); the eval path uses the fused Linear."""
    attn, embed = blk.attn, blk.merge.embed
    B, N, C = x.shape
    feat = embed.out_features
    if not training:   # DTEMLinear.update(): qkv rows then the metric rows, one F.linear
        weight = torch.cat([attn.qkv.weight, embed.weight])
        bias = torch.cat([attn.qkv.bias, embed.bias])
        out = F.linear(x, weight, bias)
        out1, out2 = out[..., :-feat], out[..., -feat:]
    else:
        out1, out2 = attn.qkv(x), embed(x.detach())
    qkv = out1.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.type(torch.float32), k.type(torch.float32), v.type(torch.float32)
    q = q * attn.scale
    a = q @ k.transpose(-2, -1)
    if size is None or (not prop_attn):
        a = a.softmax(dim=-1)
    else:
        _a = a - torch.max(a, dim=-1, keepdim=True)[0]
        _a = _a.exp_() * size[:, None, None, :].type(torch.float32)
        a = _a / _a.sum(dim=-1, keepdim=True)
    a = attn.attn_drop(a)
    out = (a @ v).type(x.dtype)
    out = out.transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(attn.proj(out)), out2


def _ref_select(x, k, k2=3, tau1=0.1, tau2=0.1):
    """DTEMBlock._select (dtem.py:113-148)."""
    EPSILON = torch.finfo(torch.float32).eps
    x = x.type(torch.float32)
    _idx = x.argsort(dim=-1, descending=True)[..., :k2]
    _x = x.gather(dim=-1, index=_idx)
    _x = _x / tau1
    B, N, M = _x.shape
    khot = torch.zeros_like(_x)
    for _ in range(k):
        onehot_approx = F.softmax(_x.view(B, -1) / tau2, dim=-1).view(B, N, M)
        khot += onehot_approx
        khot_mask = torch.clamp(1 - onehot_approx.sum(dim=-1, keepdim=True), min=EPSILON)
        _x = _x + torch.log(khot_mask)
    tmp = torch.clamp(khot.sum(dim=-1, keepdim=True).detach() - 1, min=0.) + 1.
    nkhot = khot / tmp
    return torch.zeros_like(x).scatter_reduce(-1, _idx, nkhot, reduce='sum')


def _ref_merge_train(x, size, r, n, metric):
    """DTEMBlock._merge_train (dtem.py:150-191)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    r = min(r, (n - 1) // 2)
    xa, xb = x[..., 1:n:2, :], x[..., 2:n:2, :]
    a, b = metric[..., 1:n:2, :], metric[..., 2:n:2, :]
    wa, wb = size[..., 1:n:2], size[..., 2:n:2]
    scores = a @ b.transpose(-1, -2)
    assign = _ref_select(scores, k=r)
    xb = wb[..., None] * xb + assign.transpose(-1, -2) @ (wa[..., None] * xa)
    wb = wb + (assign.transpose(-1, -2) @ wa[..., None])[..., 0]
    tmp = 1 - assign.sum(dim=-1)
    wa = wa * (tmp + (torch.clamp(tmp, min=0., max=1.) - tmp).detach())
    xb = xb / wb[..., None]
    w = torch.cat([wa, wb], dim=-1)
    nx = torch.cat([xa, xb], dim=1)
    nidxs = w.argsort(dim=-1, descending=True)
    w = w.gather(dim=-1, index=nidxs)
    nx = nx.gather(dim=-2, index=nidxs[..., None].expand_as(nx))
    x_output = torch.cat([x[:, :1], nx, x[:, n:]], dim=1)
    size_output = torch.cat([size[:, :1], w, size[:, n:]], dim=-1)
    return x_output, size_output, n - r


def _ref_merge_eval(x, size, r, metric):
    """DTEMBlock._merge_eval (dtem.py:193-201): the metric normalised, then ToMe's merge."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    merge = _ref_bipartite(metric, r=r)
    x = merge(x * size[..., None], mode='sum')
    size = merge(size[..., None], mode='sum')
    return x / size, size[..., 0], x.size(1)


def _reference_forward(model, images, schedule, training):
    """DTEM.forward_features + forward_head (dtem.py:206-243) on ``model``'s own modules."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    n = x.size(1)
    size = torch.ones_like(x[..., 0])
    for blk, r in zip(model.blocks, schedule):
        tmp, metric = _ref_attention(blk, blk.norm1(x), size, training)
        x = x + blk.drop_path1(blk.ls1(tmp))
        if size is not None and r > 0 and n > 0:
            if training:
                x, size, n = _ref_merge_train(x, size, r, n, metric)
            else:
                x, size, n = _ref_merge_eval(x, size, r, metric)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def _model(method="dtem", schedule=SCHEDULE, **kw):
    torch.manual_seed(3)
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, dtem_r=schedule,
                                   **dict(KW, **kw))
    with torch.no_grad():                    # an embedding that differs from a fresh Linear's
        for blk in model.blocks:
            if blk.merge is not None:
                blk.merge.embed.weight.normal_(0, 0.3)
                blk.merge.embed.bias.normal_(0, 0.1)
    return model


def _images(batch=3):
    return torch.randn(batch, 3, 48, 48, generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------------- equivalence
def test_eval_equals_reference():
    model = _model().eval()
    x = _images()
    with torch.no_grad():
        ours = model(x)
        ref = _reference_forward(model, x, SCHEDULE, training=False)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


@pytest.mark.parametrize("method", [pytest.param("dtem", marks=pytest.mark.slow), "full+dtem"])
def test_training_forward_and_gradients_equal_reference(method):
    """Soft grouping: no token removed, soft sizes in attention, the sort; the same gradients
    reach every trained parameter (the embedding through the soft assignment only)."""
    model = _model(method).train()
    x = _images()
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(".merge.embed." in n for n, _ in params)

    ours = model(x)
    grads = torch.autograd.grad((ours * weight).sum(), [p for _, p in params])
    ref = _reference_forward(model, x, SCHEDULE, training=True)
    ref_grads = torch.autograd.grad((ref * weight).sum(), [p for _, p in params])
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()
    for (name, _), g, rg in zip(params, grads, ref_grads):
        scale = rg.abs().max().item()
        # the last block's grouping reaches nothing a CLS head reads: no gradient there, in both
        assert scale > 0 or name.startswith("blocks.3.merge."), name
        assert torch.allclose(g, rg, atol=1e-3 * scale, rtol=1e-3), (name, (g - rg).abs().max().item(), scale)


def test_soft_assignment_equals_reference_select():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(2, 9, 5), dim=-1) @ F.normalize(torch.randn(2, 8, 5), dim=-1).transpose(1, 2)
    scores.requires_grad_(True)
    ours = soft_assignment(scores, 4, 3, 0.1, 0.1)
    ref = _ref_select(scores, k=4)
    assert torch.allclose(ours, ref, atol=1e-6)
    g, = torch.autograd.grad((ours * torch.arange(72.).view(1, 9, 8)).sum(), scores)
    rg, = torch.autograd.grad((ref * torch.arange(72.).view(1, 9, 8)).sum(), scores)
    assert torch.allclose(g, rg, atol=1e-4)
    assert (ours.sum(dim=-1) <= 1 + 1e-5).all() and (ours.sum(dim=(1, 2)) <= 4 + 1e-4).all()


def test_training_keeps_every_token_and_traces_a_permutation():
    model = _model().train()
    out, state = model(_images(), return_state=True, trace_source=True)
    assert state.size.shape[1] == 37 and state.soft_tokens == 37 - sum(SCHEDULE)
    assert torch.allclose(state.size.sum(dim=1), torch.full((3, 1), 37.0), atol=1e-3)   # sizes are conserved
    src = state.source
    assert torch.equal(src.sum(dim=1), torch.ones(3, 37)) and torch.equal(src.sum(dim=2), torch.ones(3, 37))
    feats = model.forward_intermediates(_images(), indices=[1, 3], intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(3, 48, 6, 6)] * 2


def test_embedding_is_read_live_not_copied_at_eval():
    """The reference copies the embedding into a fused Linear only on .eval(); ours reads it at every forward."""
    model = _model().eval()
    x = _images()
    with torch.no_grad():
        before = model(x)
        for blk in model.blocks:
            blk.merge.embed.weight.mul_(-1.5)
        after = model(x)
        ref = _reference_forward(model, x, SCHEDULE, training=False)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- identity, deployment
def test_r0_equals_timm():
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, **KW).eval()
    torch.manual_seed(1)
    ours = tokentune.create_model("vit_tiny_patch16_224", method="lora+dtem", num_classes=5, dtem_r=0, **KW).eval()
    assert not any(b.merge is not None for b in ours.blocks)
    with torch.no_grad():
        assert torch.allclose(ours(_images()), ref(_images()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora+dtem", "adapter+dtem", pytest.param("vpt+dtem", marks=pytest.mark.slow),
                                    pytest.param("full+dtem", marks=pytest.mark.slow)])
def test_composes_deploys_and_trains(method):
    model = _model(method)
    randomize_lora(model)
    x = _images(2)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".merge.embed." in n)
    model.eval()
    fast = tokentune.deploy(model)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", ["dtem+tome", "dtem+evit", "dtem+dyt", "dtem+pyra"])
def test_other_token_reducers_are_refused_in_one_line(spec):
    with pytest.raises(TokenTuneError, match="cannot be combined") as err:
        tokentune.create_model("vit_tiny_patch16_224", method=spec, num_classes=5, **KW)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("options, match", [
    (dict(dtem_k2=0), "dtem_k2"), (dict(dtem_tau1=0.0), "dtem_tau1"), (dict(dtem_tau2=-1.0), "dtem_tau2"),
    (dict(dtem_feat_dim=-1), "dtem_feat_dim"), (dict(dtem_r="flops:100"), "out of reach"),
    (dict(dtem_r="fast"), "dtem|schedule|named"),
])
def test_bad_options_fail_in_one_line(options, match):
    with pytest.raises(TokenTuneError, match=match) as err:
        tokentune.create_model("vit_tiny_patch16_224", method="dtem", num_classes=5, **KW, **options)
    assert "\n" not in str(err.value)


def test_registration():
    m = get_method("dtem")
    assert m.rate_option == "r" and not m.training_free and m.reduces_tokens


# ----------------------------------------------------------------------------- FLOPs, schedules, sizes
def test_flops_model_counts_the_embedding():
    model = _model().eval()
    dims = ViTDims.from_model(model)
    feat = model.blocks[0].merge.embed.out_features
    analytic = vit_flops(type(dims)(**{**dims.__dict__, "metric_dim": feat, "metric_macs": dims.dim * feat}), SCHEDULE)
    counted = count_flops(model, _images(1))
    assert analytic == pytest.approx(counted, rel=0.01)
    assert analytic > vit_flops(dims, SCHEDULE)


def test_flops_target_includes_the_embedding_cost():
    dtem = tokentune.create_model("vit_tiny_patch16_224", method="dtem", num_classes=5, dtem_r="flops:1.6", **KW)
    x = _images(1)
    base = count_flops(tokentune.create_model("vit_tiny_patch16_224", method="dtem", num_classes=5, dtem_r=0, **KW), x)
    assert base / count_flops(dtem.eval(), x) >= 1.6 * 0.99


def test_feat_dim_defaults_to_the_head_size():
    model = tokentune.create_model("vit_tiny_patch16_224", method="dtem", num_classes=5, dtem_r=2, **KW)
    assert model.blocks[0].merge.embed.out_features == model.blocks[0].attn.head_dim
    assert isinstance(model.blocks[0].merge, DTEMMerging)
    model = tokentune.create_model("vit_tiny_patch16_224", method="dtem", num_classes=5, dtem_r=2, dtem_feat_dim=7, **KW)
    assert model.blocks[0].merge.embed.out_features == 7


def test_reference_checkpoint_loads():
    model = _model().eval()
    ref_sd = {}
    for key, value in model.state_dict().items():
        if ".merge.embed." in key:
            ref_sd[key.replace(".merge.embed.", ".attn.qkv.metric_layer.")] = value
        elif ".attn.qkv." in key:
            ref_sd[key.replace(".attn.qkv.", ".attn.qkv.qkv_layer.")] = value
            ref_sd[key] = torch.zeros(1)                         # the fused copy: dropped
        else:
            ref_sd[key] = value
    fresh = tokentune.create_model("vit_tiny_patch16_224", method="dtem", num_classes=5, dtem_r=SCHEDULE, **KW).eval()
    load_reference_checkpoint(fresh, {"state_dict": {"module." + k: v for k, v in ref_sd.items()}})
    x = _images()
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_half_precision_runs(dtype):
    model = _model().to(dtype)
    x = _images(2).to(dtype)
    model.train()
    out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x).float()).all()


# ----------------------------------------------------------------------------- tasks and pictures
@pytest.mark.parametrize("task, options, shape", [
    ("segmentation", dict(segmentation_channels=16, segmentation_scale=(64, 32)), (2, 5, 32, 32)),
    ("video", dict(video_frames=2, video_pool="mean"), (1, 5)),
])
def test_segmentation_and_video_train_and_deploy(task, options, shape):
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+dtem", num_classes=5, task=task, dtem_r=[3, 2, 2, 1],
                                   **options, **tiny())
    x = torch.randn(2, 3, 32, 32) if task == "segmentation" else torch.randn(1, 2, 3, 32, 32)
    model.train()
    out = model(x)                                  # soft grouping: every level is on the grid
    assert out.shape == shape
    out.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".merge.embed." in n and "blocks.3" not in n)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(tokentune.deploy(model)(x), model(x), atol=1e-5)


def test_token_groups_of_the_merged_model():
    model = _model().eval()
    groups = viz.token_groups(model, _images(2))
    assert [groups[d][1] for d in sorted(groups)] == [31, 26, 22, 19]


def test_rotary_models_train_and_deploy():
    """timm's Eva (EVA-02: RoPE, SwiGLU): the rotary rows follow the tokens DTEM re-orders in training."""
    torch.manual_seed(0)
    model = tokentune.create_model("eva02_tiny_patch14_224", method="lora+dtem", num_classes=5, dtem_r=[4, 3, 2],
                                   img_size=56, depth=3, embed_dim=48, num_heads=3)
    x = torch.randn(2, 3, 56, 56)
    model.train()
    out, state = model(x, return_state=True)
    assert state.rope_pos is not None and sorted(state.rope_pos[0, 1:].tolist()) == list(range(16))
    out.sum().backward()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(tokentune.deploy(model)(x), model(x), atol=1e-5)


def test_bench_times_and_sweeps_dtem(tmp_path, capsys):
    argv = ["bench", "--model", "vit_tiny_patch16_224", "--timm", "patch_size=8", "--timm", "embed_dim=48", "--timm",
            "depth=4", "--timm", "num_heads=3", "--image-size", "32", "--batch-size", "2", "--rounds", "1", "--warmup",
            "1", "--device", "cpu", "--quiet", "--no-train", "--no-latency", "--sweep", "1,2", "--out", str(tmp_path),
            "--name", "d", "--config", "lora", "--config", "lora+dtem:dtem_r=2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert (rows[1]["tokens_in"], rows[1]["tokens_out"]) == (17, 9) and rows[1]["flops"] < rows[0]["flops"]
    assert list(rows[1]["sweep"]) == ["1", "2"] and rows[1]["deployed"] is True
