"""PiToMe and ToFu: a literal reimplementation of the reference code's behaviour (hchautran/PiToMe @ 550b5dee,
``algo/pitome`` and ``algo/tofu``) on timm's modules agrees with ours, in eval and in training; rates,
schedules, composition, deployment, off-the-shelf use (create_model on a checkpoint, eval --add-method)."""
import math

import pytest
import timm
import torch
from conftest import randomize_lora, tiny
from safetensors.torch import save_file

import tokentune
from tokentune.core.factory import added_methods
from tokentune.errors import TokenTuneError
from tokentune.methods.tofu import ToFuMerging
from tokentune.methods.tome import schedule_for_keep_ratio

NAME = "vit_tiny_patch16_224"
WIDE = tiny(img_size=48)           # 36 patches + CLS: enough tokens for both PiToMe variants to matter


# ----------------------------------------------------------------------------- the reference, literally
def ref_attention(blk, x):
    """timm's attention written out (the reference's PiToMeAttention/ToFuAttention without sizes); k averaged over heads."""
    B, N, C = x.shape
    H = blk.attn.num_heads
    qkv = blk.attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
    out = blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    return out, k.mean(1)


def ref_energy(metric, margin):
    """Eq. 4 with alpha = 1: mean over j (i included) of (w - m) if w >= m else exp(w - m) - 1."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    sim = m @ m.transpose(-1, -2)
    shifted = sim - margin
    energy = torch.where(shifted >= 0, shifted, torch.exp(shifted) - 1).mean(dim=-1)
    return sim, torch.argsort(energy, dim=-1, descending=True)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_energy_order_is_eq4_for_any_alpha(alpha):
    """The energy (Eq. 4, ELU-shaped with slope ``alpha`` below the margin) gives the order of
    ``F.elu(W - m, alpha).mean(-1)``, at margins that put some, most and none of the graph below it."""
    from tokentune.methods.pitome import energy_order

    torch.manual_seed(0)
    metric = torch.randn(3, 50, 16)
    for margin in (0.75, 0.3, -1.5):
        sim, order = energy_order(metric, margin, alpha)
        m = metric / metric.norm(dim=-1, keepdim=True)
        expected = torch.nn.functional.elu(m @ m.transpose(-1, -2) - margin, alpha=alpha).mean(dim=-1)
        ranked = expected.gather(1, order)                 # F.elu's energies in our order: descending
        assert torch.equal(order.sort(dim=-1)[0], torch.arange(50).expand(3, 50))       # a permutation
        assert (ranked[:, 1:] <= ranked[:, :-1] + 1e-6).all()                            # ties within rounding only
        assert torch.allclose(sim, m @ m.transpose(-1, -2), atol=1e-6)


def ref_pitome_groups(metric, r, margin, bsm):
    """Per image: the output tokens as lists of input (non-CLS) token indices, in the reference's output order."""
    sim, order = ref_energy(metric, margin)
    groups = []
    for s, o in zip(sim, order):
        o = o.tolist()
        if bsm:                                                  # pitome_bsm: alternate over all tokens
            a, b = o[0::2], o[1::2]
            scores = s[a][:, b]
            best, best_j = scores.max(dim=-1)
            edges = best.argsort(descending=True).tolist()
            kept = [[a[i]] for i in edges[r:]]                   # not re-sorted
            merged = {i: best_j[i].item() for i in edges[:r]}
        else:                                                    # pitome: the 2r high-energy tokens
            a, b = o[0:2 * r:2], o[1:2 * r:2]
            best_j = s[a][:, b].max(dim=-1)[1]
            kept = [[t] for t in o[2 * r:]]
            merged = {i: best_j[i].item() for i in range(r)}
        dst = [[t] for t in b]
        for i, j in merged.items():
            dst[j].append(a[i])
        groups.append(kept + dst)
    return groups


def ref_merge_wavg(x, size, groups):
    """merge_wavg: x * size summed per group / size summed per group; CLS (token 0) first."""
    out_x, out_s = [], []
    for xb, sb, gb in zip(x, size, groups):
        rows = [xb[:1]] + [(xb[1:][g] * sb[1:][g]).sum(0, keepdim=True) / sb[1:][g].sum(0, keepdim=True) for g in gb]
        sizes = [sb[:1]] + [sb[1:][g].sum(0, keepdim=True) for g in gb]
        out_x.append(torch.cat(rows))
        out_s.append(torch.cat(sizes))
    return torch.stack(out_x), torch.stack(out_s)


def ref_pitome_forward(model, images, ratio):
    """The reference's patched ViT (CLS token model): ratio per block, margins 0.75 - 0.75 i / L, bsm in the first half."""
    L = len(model.blocks)
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    size = torch.ones_like(x[..., :1])
    for i, blk in enumerate(model.blocks):
        h, metric = ref_attention(blk, blk.norm1(x))
        x = x + h
        T = x.shape[1] - 1
        r = math.floor(T - T * ratio)
        if ratio < 1.0 and r > 0:
            groups = ref_pitome_groups(metric[:, 1:], r, 0.75 - 0.75 * (i / L), i < math.ceil(L * 0.5))
            x, size = ref_merge_wavg(x, size, groups)
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def ref_tofu_step(x, metric, r, mode):
    """PiToMe's algo/tofu: bipartite matching with CLS in A never a source, then prune or MLERP (unweighted)."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    outs = []
    for xb, nm, ni in zip(x, node_max, node_idx):
        xa, xd = xb[::2], xb[1::2]
        edges = nm.argsort(descending=True).tolist()
        src, unm = edges[:r], sorted(edges[r:])
        dst = [xd[j] for j in range(xd.shape[0])]
        if mode == "tofu":
            into = {}
            for i in src:
                into.setdefault(ni[i].item(), []).append(i)
            for j, members in into.items():
                group = torch.stack([xd[j]] + [xa[i] for i in members])
                top = group.norm(dim=-1).max()
                dst[j] = group.mean(0) / xd[j].norm() * top
        outs.append(torch.cat([xa[unm], torch.stack(dst)]))
    return torch.stack(outs)


def ref_tofu_forward(model, images, ratio):
    L = len(model.blocks)
    x = model._pos_embed(model.patch_embed(images))
    for i, blk in enumerate(model.blocks):
        h, metric = ref_attention(blk, blk.norm1(x))
        x = x + h
        T = x.shape[1]
        r = math.floor(T - T * ratio)
        if r > 0:
            x = ref_tofu_step(x, metric, r, "tofu" if i > L // 2 else "prune")
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def _model(spec, **options):
    torch.manual_seed(0)
    model = tokentune.create_model(NAME, method=spec, num_classes=5, **WIDE, **options)
    randomize_lora(model, 0.2)
    return model


# ----------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.5])
def test_pitome_equals_the_reference_in_eval(ratio):
    model = _model("lora+pitome", pitome_r=ratio).eval()
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        ours = model(images)
        ref = ref_pitome_forward(model, images, ratio)
    assert (ours - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max())
    assert not torch.allclose(ours, _model("lora").eval()(images), atol=1e-3)       # it merged something


def test_pitome_output_tokens_come_in_the_reference_order():
    model = _model("pitome", pitome_r=0.75).eval()
    images = torch.randn(2, 3, 48, 48)
    x = model._pos_embed(model.patch_embed(images))
    blk = model.blocks[0]
    with torch.no_grad():
        h, metric = ref_attention(blk, blk.norm1(x))
        x = x + h
        for bsm in (True, False):
            blk.merge.bipartite = bsm
            ours, state = blk.merge(x, metric, tokentune.TokenState(num_prefix=1))
            groups = ref_pitome_groups(metric[:, 1:], blk.merge.r, blk.merge.margin, bsm)
            ref, size = ref_merge_wavg(x, torch.ones_like(x[..., :1]), groups)
            assert torch.allclose(ours, ref, atol=1e-5) and torch.equal(state.size, size)


def test_pitome_gradients_equal_the_reference_in_training():
    model = _model("full+pitome", pitome_r=0.75).train()
    images = torch.randn(2, 3, 48, 48)
    model(images).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_pitome_forward(model, images, 0.75).square().sum().backward()
    for n, p in model.named_parameters():
        if n in ours:
            assert torch.allclose(ours[n], p.grad, atol=1e-4, rtol=1e-3), n
    assert ours["blocks.0.attn.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("ratio", [0.9, 0.7])
def test_tofu_equals_the_reference(ratio):
    model = _model("lora+tofu", tofu_r=ratio).eval()
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        ours = model(images)
        ref = ref_tofu_forward(model, images, ratio)
    assert (ours - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max())
    # the last blocks merge with MLERP, the first ones prune
    kinds = [b.merge.prune for b in model.blocks if b.merge is not None]
    assert kinds == [True, True, True, False]


@pytest.mark.parametrize("mode", ["tofu", "prune"])
def test_tofu_step_equals_the_reference_on_spread_tokens(mode):
    x = torch.randn(3, 17, 8) * torch.rand(3, 17, 1) * 4            # norms that differ a lot
    metric = x[..., :4] + 0.3 * torch.randn(3, 17, 4)
    step = ToFuMerging(5, prune=mode == "prune")
    ours, _ = step(x, metric, tokentune.TokenState(num_prefix=1))
    assert torch.allclose(ours, ref_tofu_step(x, metric, 5, mode), atol=1e-5)


def test_tofu_gradients_equal_the_reference_in_training():
    model = _model("full+tofu", tofu_r=0.8).train()
    images = torch.randn(2, 3, 48, 48)
    model(images).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_tofu_forward(model, images, 0.8).square().sum().backward()
    for n, p in model.named_parameters():
        if n in ours:
            assert torch.allclose(ours[n], p.grad, atol=1e-4, rtol=1e-3), n


def test_tofu_paper_mlerp_gives_the_largest_norm():
    model = _model("tofu", tofu_r=[0, 0, 0, 6], tofu_mlerp="paper").eval()
    images = torch.randn(2, 3, 48, 48)
    seen = {}
    blk = model.blocks[3]
    blk.merge.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o[0]))
    with torch.no_grad():
        model(images)
    norms_in = seen["x"].norm(dim=-1)
    # every output token's norm is one of its group's norms: at most the largest input norm, unmerged ones unchanged
    assert seen["out"].norm(dim=-1).max() <= norms_in.max() + 1e-4


# ----------------------------------------------------------------------------- rates and schedules
def test_keep_ratio_counts_follow_the_reference_formula():
    # ViT-B/16: 196 patches + CLS; PiToMe does not count CLS, ToFu does
    pitome = schedule_for_keep_ratio(0.9, 197, 12, 1)
    assert pitome[:3] == [19, 17, 16]              # floor(196 - 176.4), floor(177 - 159.3), floor(160 - 144)
    tofu = schedule_for_keep_ratio(0.9, 197, 12, 1, count_prefix=True)
    assert tofu[:2] == [math.floor(197 - 197 * 0.9), math.floor(178 - 178 * 0.9)]
    model = _model("pitome")                       # the official default 0.9125
    assert model.tokentune.spec["configs"]["pitome"]["r"] == schedule_for_keep_ratio(0.9125, 37, 4, 1)


def test_schedule_targets_and_counts():
    tome = _model("tome", tome_r="flops:1.4").tokentune.state["tome"]
    assert _model("pitome", pitome_r="flops:1.4").tokentune.state["pitome"] == tome
    assert _model("tofu", tofu_r="tokens:9").tokentune.state["tofu"] == _model("tome", tome_r="tokens:9").tokentune.state["tome"]
    model = _model("pitome", pitome_r=[4, 3, 2, 1]).eval()
    _, state = model(torch.randn(1, 3, 48, 48), return_state=True)
    assert state.size.shape[1] == 37 - 10 and state.size.sum() == 36 + 1


def test_identity_rate_is_the_plain_model():
    images = torch.randn(2, 3, 48, 48)
    plain = _model("lora").eval()
    for spec, opts in (("lora+pitome", dict(pitome_r=1.0)), ("lora+tofu", dict(tofu_r=0))):
        model = _model(spec, **opts).eval()
        assert all(b.merge is None for b in model.blocks)
        assert torch.allclose(model(images), plain(images), atol=1e-6)


# ----------------------------------------------------------------------------- capabilities
@pytest.mark.parametrize("spec", ["adapter+pitome", "vpt+pitome", "lora+tofu"])
def test_deployed_equals_eval_model_and_traces_sources(spec):
    model = _model(spec).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model(images)
        _, state = model(images, trace_source=True, return_state=True)
    cols = state.source[:, :, -36:].sum(dim=1)
    assert torch.all(cols == 1)                    # every patch belongs to exactly one token
    deployed = tokentune.deploy(model)
    with torch.no_grad():
        assert torch.allclose(deployed(images), want, atol=1e-5)


def test_forward_intermediates_unmerge_to_the_patch_grid():
    model = _model("lora+pitome", pitome_r=0.75).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(2, 3, 48, 48), indices=2, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 48, 6, 6)] * 2


@pytest.mark.parametrize("task,shape", [("segmentation", (2, 3, 48, 48)), ("video", (2, 2, 3, 48, 48))])
def test_segmentation_and_video_tasks_run(task, shape):
    opts = dict(video_frames=2) if task == "video" else {}
    for spec in ("lora+pitome", "lora+tofu"):
        torch.manual_seed(0)
        model = tokentune.create_model(NAME, method=spec, num_classes=3, task=task, **WIDE, **opts).eval()
        with torch.no_grad():
            out = model(torch.randn(*shape))
        assert out.shape[:2] == (2, 3) and torch.isfinite(out).all()


def test_viz_token_groups_follow_the_merges():
    import numpy as np

    from tokentune.tools import viz

    model = _model("lora+pitome", pitome_r=0.75).eval()
    x = torch.randn(2, 3, 48, 48)
    groups = viz.token_groups(model, x)
    with torch.no_grad():
        _, state = model(x, return_state=True, trace_source=True)
    g, tokens = groups[max(groups)]
    assert tokens == state.size.shape[1]
    for b in range(2):
        ids, sizes = np.unique(g[b].numpy(), return_counts=True)
        assert torch.equal(torch.from_numpy(sizes).float(), state.size[b, 1 + torch.from_numpy(ids), 0])


def test_bf16_runs():
    model = _model("pitome", pitome_r=0.75).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 48, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_options_fail_in_one_line():
    cases = [
        (dict(method="pitome", pitome_r=0.3), "keep ratio per block"),
        (dict(method="pitome", pitome_margin=1.5), "pitome_margin"),
        (dict(method="pitome", pitome_alpha=0.0), "pitome_alpha"),
        (dict(method="tofu", tofu_mlerp="other"), "tofu_mlerp"),
        (dict(method="pitome+tome"), "cannot be combined"),
        (dict(method="tofu+evit"), "cannot be combined"),
        (dict(method="pitome", pitome_r=[20, 1]), "merge schedule asks"),
    ]
    for kwargs, match in cases:
        with pytest.raises(TokenTuneError, match=match) as e:
            tokentune.create_model(NAME, num_classes=5, **WIDE, **kwargs)
        assert "\n" not in str(e.value)


def test_registry_marks_them_training_free_with_a_rate():
    for name in ("pitome", "tofu", "tome"):
        method = tokentune.core.method.get_method(name)
        assert method.training_free and method.rate_option == "r"
    assert not tokentune.core.method.get_method("lora").training_free


# ----------------------------------------------------------------------------- off the shelf
def test_create_model_on_a_checkpoint_equals_the_reference(tmp_path):
    torch.manual_seed(1)
    timm_model = timm.create_model(NAME, num_classes=5, **WIDE)
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, path)
    model = tokentune.create_model(NAME, method="pitome", pretrained=path, pitome_r=0.8, **WIDE).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(images), ref_pitome_forward(timm_model.eval(), images, 0.8), atol=1e-4)


def test_added_methods_parse_and_refuse_in_one_line():
    assert added_methods("pitome:pitome_r=0.9,margin=0.5") == (["pitome"], dict(pitome_r=0.9, pitome_margin=0.5))
    assert added_methods(["tome:r=16x2,10", "tofu"]) == (["tome", "tofu"], dict(tome_r=[16, 16, 10]))
    assert added_methods("tome:r=flops:2.0+tofu:mlerp=paper")[1] == dict(tome_r="flops:2.0", tofu_mlerp="paper")
    for bad, match in (("lora", "needs training.*pitome, tofu, tome"), ("pitome:foo=1", "FIELD one of r, margin"),
                       ("pitome:alpha=x", "pitome_alpha")):
        with pytest.raises(TokenTuneError, match=match) as e:
            added_methods(bad)
        assert "\n" not in str(e.value)


def test_eval_add_method_on_a_finished_run(tmp_path, capsys):
    import json

    from test_data import make_folder

    from tokentune import TrainConfig, cli
    from tokentune.engine.data import load_datasets, set_transforms
    from tokentune.engine.training import train

    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=3, splits=("train", "val"))
    train_ds, test_ds = load_datasets(image_folder=str(folder))
    torch.manual_seed(0)
    model = tokentune.create_model(NAME, method="lora", num_classes=2, **tiny())
    set_transforms([train_ds, test_ds], model)
    train(model, train_ds, test_ds, TrainConfig(epochs=1, batch_size=2, warmup_epochs=0, num_workers=0),
          out_dir=str(tmp_path / "run"), log=None)
    base = ["eval", str(tmp_path / "run"), "--num-workers", "0", "--no-progress"]
    code = cli.main(base + ["--add-method", "pitome:pitome_r=0.75", "--json", str(tmp_path / "e.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["evaluated_method"] == "lora+pitome" and record["method"] == "lora" and "[lora+pitome]" in out
    added = tokentune.load_trained(str(tmp_path / "run"), add_method="pitome:r=0.75")
    assert added.tokentune.state["pitome"] == schedule_for_keep_ratio(0.75, 17, 4, 1)
    plain = tokentune.load_trained(str(tmp_path / "run"))
    assert torch.equal(added.blocks[0].attn.qkv.lora_B, plain.blocks[0].attn.qkv.lora_B)
    code = cli.main(base + ["--add-method", "lora"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "training-free method: pitome, tofu, tome" in err
    code = cli.main(base + ["--add-method", "tome", "--add-method", "tofu"])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot be combined" in err and err.count("\n") == 1
