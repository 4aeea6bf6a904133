"""EViT: the reference code's math on identical weights, identity at keep rate 1, prefix tokens kept,
SDPA's single CLS row equals the full softmax, deployment, the keep-rate schedule, PYRA on the fused
token, clear errors."""
import math

import pytest
import torch
from conftest import tiny

import tokentune
from tokentune.core.flops import count_flops
from tokentune.core.method import get_method
from tokentune.errors import TokenTuneError
from tokentune.methods.evit import EViTConfig, evit_flops, evit_reducers, shrink_keep_rate, token_path, update_keep_rate
from tokentune.methods.pyra import modulators, parameter_report
from tokentune.methods.tome.flops import ViTDims

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _model(method="evit", seed=0, **kw):
    torch.manual_seed(seed)
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, **tiny(), **kw)
    return model.eval()


# ----------------------------------------------------------------------------- the reference's math
def ref_complement_idx(idx, dim):
    """The reference's helpers.complement_idx: set(range(dim)) - set(idx), ascending, batched."""
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for _ in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def ref_evit(model, images, keep_rate, fuse):
    """Literal reimplementation of the reference EViT forward (evit.py: Attention, Block,
    forward_features) on a timm ViT's weights (CLS only, no LayerScale, no dropout)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    for blk in model.blocks:
        B, N, C = x.shape
        h = blk.norm1(x)
        H = blk.attn.num_heads
        qkv = blk.attn.qkv(h).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * blk.attn.scale
        attn = attn.softmax(dim=-1)
        out = blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        x = x + out
        rate = keep_rate if blk.reduce is not None else 1.0
        if rate < 1:
            left_tokens = math.ceil(rate * (N - 1))
            if left_tokens != N - 1:
                cls_attn = attn[:, :, 0, 1:].mean(dim=1)
                _, idx = torch.topk(cls_attn, left_tokens, dim=1, largest=True, sorted=True)
                index = idx.unsqueeze(-1).expand(-1, -1, C)
                non_cls = x[:, 1:]
                x_others = torch.gather(non_cls, dim=1, index=index)
                if fuse:
                    compl = ref_complement_idx(idx, N - 1)
                    non_topk = torch.gather(non_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
                    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
                    extra_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
                    x = torch.cat([x[:, 0:1], x_others, extra_token], dim=1)
                else:
                    x = torch.cat([x[:, 0:1], x_others], dim=1)
        x = x + blk.mlp(blk.norm2(x))
    x = model.norm(x)
    return model.head(x[:, 0]), x


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_equals_reference_math(fuse, fused_attn):
    model = _model(evit_fuse=fuse, evit_keep_rate=0.6)
    for blk in model.blocks:
        blk.attn.fused_attn = fused_attn
    with torch.no_grad():
        want, want_tokens = ref_evit(model, X, 0.6, fuse)
        got, tokens = model(X, return_tokens=True)
    assert tokens.shape == want_tokens.shape                       # same token path (17 -> 12 -> 9 -> 7 with fusion)
    assert torch.allclose(tokens, want_tokens, atol=1e-5, rtol=0)  # same tokens, same order
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert tokens.shape[1] == token_path(17, 1, [1, 2, 3], 0.6, fuse, 4)[0][-1]


def test_keep_rate_one_is_the_plain_model():
    plain, evit = _model("full"), _model("evit", evit_keep_rate=1.0)
    with torch.no_grad():
        assert torch.equal(plain(X), evit(X))


def test_prefix_tokens_are_always_kept_and_the_fused_token_is_appended():
    model = _model(reg_tokens=2, evit_keep_rate=0.5)
    seen = []
    hooks = [r.register_forward_hook(lambda m, args, out: seen.append((args[0], out[0]))) for r in evit_reducers(model)]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for before, after in seen:
        assert torch.equal(after[:, :3], before[:, :3])           # CLS + 2 registers, in place
        n = before.shape[1] - 3
        assert after.shape[1] == 3 + math.ceil(0.5 * n) + 1


def test_train_and_eval_run_the_same_pruned_computation_and_deploy_equals_eval():
    model = _model("lora+evit")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    for blk in model.blocks:        # no dropout: training mode computes what eval mode computes
        blk.attn.qkv.lora_dropout.p = 0.0
    with torch.no_grad():
        want = model(X)
        assert torch.allclose(model.train()(X), want, atol=1e-6, rtol=0)
        deployed = tokentune.deploy(model.eval())
        assert torch.allclose(deployed(X), want, atol=1e-5, rtol=0)
    assert not any("lora_" in n for n, _ in deployed.named_parameters())


def test_gradients_reach_the_trained_parameters():
    model = _model("adapter+evit").train()
    model(X).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert set(tokentune.count_parameters(model)["per_method"]) == {"adapter"}   # EViT has no parameters


def test_keep_rate_schedule_follows_the_reference_and_is_applied_per_step():
    def adjust_keep_rate(iters, epoch, warmup_epochs, total_epochs, iters_per_epoch, base_keep_rate, max_keep_rate=1):
        # the reference's helpers.adjust_keep_rate
        if epoch < warmup_epochs:
            return 1
        if epoch >= total_epochs:
            return base_keep_rate
        total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
        iters = iters - iters_per_epoch * warmup_epochs
        return base_keep_rate + (max_keep_rate - base_keep_rate) * (math.cos(iters / total_iters * math.pi) + 1) * 0.5

    cfg = EViTConfig(keep_rate=0.7, shrink_start=10 / 300, shrink_end=110 / 300)
    for epoch in (0, 9, 10, 37, 60, 109, 110, 299):
        it = epoch * 4
        want = adjust_keep_rate(it, epoch, 10, 110, 4, 0.7)
        assert shrink_keep_rate(it / (300 * 4), cfg) == pytest.approx(want, abs=1e-9), epoch
    assert shrink_keep_rate(0.5, EViTConfig()) == 0.7                # no schedule: the keep rate
    model = _model(evit_shrink_start=0.1, evit_shrink_end=0.5).train()
    assert update_keep_rate(model, 0.05) == 1.0
    with torch.no_grad():
        assert model(X, return_tokens=True)[1].shape[1] == 17        # training keeps every token
        assert model.eval()(X, return_tokens=True)[1].shape[1] == 10  # eval uses the keep rate
    update_keep_rate(model, 0.3)
    assert all(r.keep_rate == pytest.approx(0.85) for r in evit_reducers(model))


def test_keep_rate_forward_option():
    model = _model()
    with torch.no_grad():
        assert model(X, return_tokens=True)[1].shape[1] == 10
        assert model(X, return_tokens=True, evit_keep_rate=1.0)[1].shape[1] == 17
        assert model(X, return_tokens=True, evit_keep_rate=0.3)[1].shape[1] < 10
        for rate in (0.0, 1.5, -0.2):       # outside (0, 1]: 1.5 would otherwise keep every token silently
            with pytest.raises(TokenTuneError, match=rf"evit_keep_rate={rate}.*\(0, 1\]") as e:
                model(X, evit_keep_rate=rate)
            assert "\n" not in str(e.value)


def test_pyra_on_the_fused_token_starts_as_evit_and_trains_and_deploys():
    evit, pyra = _model("lora+evit", evit_keep_rate=0.6), _model("evit+pyra", evit_keep_rate=0.6)
    assert pyra.tokentune.spec["method"] == "lora+evit+pyra"
    mods = modulators(pyra)
    assert sorted(mods) == [1, 2, 3] and [m.r for m in mods.values()] == [6, 4, 3]   # 16-10, 11-7, 8-5 fused
    report = parameter_report(pyra)
    assert report["generator"] == sum(m.r + 48 for m in mods.values())
    with torch.no_grad():
        assert torch.equal(pyra(X), evit(X))                          # W_D = 0: exactly EViT at init
        for m in mods.values():
            m.W_D.normal_(0, 0.5)
        moved = pyra(X)
        assert not torch.allclose(moved, evit(X), atol=1e-4)
        assert torch.allclose(tokentune.deploy(pyra)(X), moved, atol=1e-5, rtol=0)
    pyra.train()
    pyra(X).sum().backward()
    assert all(m.W_D.grad is not None and m.W_r.grad is not None for m in mods.values())
    with pytest.raises(TokenTuneError, match="built for r=6 merged .or fused. tokens but got 11"):
        pyra.eval()(X, evit_keep_rate=0.3)


@pytest.mark.parametrize("options, match", [
    (dict(evit_keep_rate=0.0), r"evit_keep_rate=0.0.*\(0, 1\]"),
    (dict(evit_keep_rate=1.5), r"evit_keep_rate=1.5.*\(0, 1\]"),
    (dict(evit_locations=[1, 4]), r"block 4 but the model has 4 blocks"),
    (dict(evit_locations=[2, 1]), r"increasing"),
    (dict(evit_shrink_start=0.5, evit_shrink_end=0.2), r"shrink_start=0.5 is after"),
    (dict(class_token=False, global_pool="avg"), r"no class token"),
])
def test_bad_options_fail_in_one_line(options, match):
    with pytest.raises(TokenTuneError, match=match) as e:
        _model(**options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["evit+tome", "tome+evit", "dyt+evit", "lora+evit+tome"])
def test_evit_does_not_compose_with_other_reducers(spec):
    with pytest.raises(TokenTuneError, match=r"both reduce tokens and cannot be combined") as e:
        _model(spec)
    assert "\n" not in str(e.value)


def test_pyra_refuses_a_keep_rate_schedule():
    with pytest.raises(TokenTuneError, match="evit_shrink_end=0"):
        _model("evit+pyra", evit_shrink_end=0.5)


# ----------------------------------------------------------------------------- keep-rate targets
def test_flops_and_token_targets_resolve_to_the_largest_keep_rate_that_meets_them():
    assert get_method("evit").training_free and get_method("evit").rate_option == "keep_rate"
    assert get_method("evit").rate_profiles == ()          # one keep rate at fixed blocks: no schedule profile
    full = count_flops(_model(evit_keep_rate=1.0), X[:1])
    model = _model(evit_keep_rate="flops:1.4")
    rate = model.tokentune.spec["configs"]["evit"]["keep_rate"]
    dims, locs = ViTDims.from_model(model), model.tokentune.state["evit"].locations
    ratio = evit_flops(dims, 1.0, locs, True) / evit_flops(dims, rate, locs, True)
    assert ratio >= 1.4 and evit_flops(dims, 1.0, locs, True) / evit_flops(dims, rate + 0.02, locs, True) < 1.4
    # the analytic count agrees with the counter on the real forward (it leaves out the CLS row's ranking)
    assert abs(full / count_flops(model, X[:1]) - ratio) < 0.02 * ratio
    counts, _ = token_path(dims.num_tokens, dims.num_prefix, locs,
                           _model(evit_keep_rate="tokens:20").tokentune.state["evit"].keep_rate, True, dims.depth)
    assert counts[-1] <= 20


@pytest.mark.parametrize("rate, match", [("flops:50", "out of reach.*prune earlier"), ("tokens:0", "invalid evit_keep_rate"),
                                         ("speed:2", "invalid evit_keep_rate"),
                                         ("flops:1.4:geometric", "one keep rate at fixed blocks.*drop ':geometric'")])
def test_bad_keep_rate_targets_fail_in_one_line(rate, match):
    with pytest.raises(TokenTuneError, match=match):
        _model(evit_keep_rate=rate)
