"""PYRA: identity at init, the two-step modulation, reference parity, training, ablations, counts."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny

import tokentune
from tokentune import TrainConfig, get_recipe
from tokentune.errors import TokenTuneError
from tokentune.methods.lora import LoRALinear
from tokentune.methods.pyra import (
    GENERATOR,
    NORM,
    PYRAConfig,
    PYRAModulator,
    from_reference_state_dict,
    load_reference_checkpoint,
    modulators,
    param_groups,
    parameter_report,
    reference_schedule,
    to_reference_state_dict,
)
from tokentune.methods.tome import schedule_of

SCHEDULE = [5, 3, 2, 1]          # tiny ViT: 17 -> 12 -> 9 -> 7 -> 6 tokens
MODEL = "vit_tiny_patch16_224"


def _pyra(method="pyra", schedule=SCHEDULE, **kw):
    schedule = schedule if isinstance(schedule, str) else list(schedule)
    return tokentune.create_model(MODEL, method=method, num_classes=5, tome_r=schedule, **tiny(), **kw)


def randomize_pyra(model, scale=0.5):
    """Non-trivial PYRA weights (W_D is zero at init, which would hide most of the math)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".merge.modulator." in name:
                p.add_(torch.randn_like(p) * scale)


# ----------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("variant,activation", [("pyra", True), ("pyra", False), ("wr", True), ("wr", False),
                                                ("wd", True), ("wd", False), ("matrix", True),
                                                ("gated_mlp", True)])
def test_init_equals_lora_tome(variant, activation):
    torch.manual_seed(1)
    base = _pyra("lora+tome").eval()
    randomize_lora(base)
    model = _pyra(pyra_variant=variant, pyra_activation=activation).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".merge.modulator." in k for k in missing) and missing
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = base(x), model(x)
    assert (a - b).abs().max() <= 1e-6
    if variant == "pyra":
        assert torch.equal(a, b)     # 2 sigmoid(0) - 1 == 0 exactly: bit-identical


# ----------------------------------------------------------------------------- the math
def test_hand_computed_two_step_modulation():
    mod = PYRAModulator(r=2, dim=2)
    with torch.no_grad():
        mod.W_r.copy_(torch.tensor([[0.5], [2.0]]))
        mod.W_D.copy_(torch.tensor([[1.0, -1.0]]))
    m_s = torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])
    m_t = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    # M_s + M_t = [[2, 4], [2, 2]]; LayerNorm (eps 1e-5) rows: [-c, c] and [0, 0], c = 1/sqrt(1 + 1e-5)
    c = 1 / math.sqrt(1 + 1e-5)
    sig = lambda v: 1 / (1 + math.exp(-v))               # noqa: E731
    d_D = [0.5 * -c + 2.0 * 0, 0.5 * c + 2.0 * 0]         # W_r^T M_info
    d_r = [-c * 1.0 + c * -1.0, 0.0]                      # M_info W_D^T
    m_hat = [[2 * sig(d_D[j]) * m_s[0, i, j].item() for j in range(2)] for i in range(2)]
    want = [[m_s[0, i, j].item() + (2 * sig(d_r[i]) - 1) * m_hat[i][j] for j in range(2)] for i in range(2)]
    got = mod(m_s, m_t)
    assert torch.allclose(got, torch.tensor([want]), atol=1e-6)
    assert torch.equal(got[0, 1], m_s[0, 1])              # delta_r = 0 there: the row is untouched
    assert not torch.allclose(got[0, 0], m_s[0, 0])


def test_modulator_matches_elementwise_formula():
    torch.manual_seed(3)
    mod = PYRAModulator(r=4, dim=6)
    with torch.no_grad():
        mod.W_D.normal_()
        mod.norm.weight.normal_()
        mod.norm.bias.normal_()
    src, dst = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    got = mod(src, dst)
    for b in range(2):
        info = F.layer_norm(src[b] + dst[b], (6,), mod.norm.weight, mod.norm.bias, eps=1e-5)
        for k in range(4):
            d_r = sum(info[k, c] * mod.W_D[0, c] for c in range(6))
            for c in range(6):
                d_D = sum(mod.W_r[j, 0] * info[j, c] for j in range(4))
                want = src[b, k, c] + (2 * torch.sigmoid(d_r) - 1) * (2 * torch.sigmoid(d_D) * src[b, k, c])
                assert abs(got[b, k, c] - want) < 1e-5


def test_init_distributions():
    torch.manual_seed(0)
    mod = PYRAModulator(r=4000, dim=8)
    assert torch.count_nonzero(mod.W_D) == 0
    assert mod.W_r.abs().max() <= 1.0 and mod.W_r.abs().max() > 0.99      # U(-1, 1)
    assert abs(mod.W_r.std().item() - 1 / math.sqrt(3)) < 0.02
    gauss = PYRAModulator(r=4000, dim=8, cfg=PYRAConfig(wr_init="gaussian", wr_std=0.5))
    assert abs(gauss.W_r.std().item() - 0.5) < 0.02 and gauss.W_r.abs().max() > 1.0
    assert mod.norm.eps == 1e-5 and mod.norm.weight.shape == (8,) and mod.norm.bias is not None
    assert mod.W_r.shape == (4000, 1) and mod.W_D.shape == (1, 8)


def test_modulator_refuses_other_r():
    mod = PYRAModulator(r=3, dim=4)
    with pytest.raises(TokenTuneError, match="built for r=3"):
        mod(torch.randn(1, 2, 4), torch.randn(1, 2, 4))


# ----------------------------------------------------------------------------- reference parity
def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=eps)


def _reference_forward(sd, images, schedule, heads, patch, num_prefix):
    """A literal, loop-based rendering of the reference PYRA model (eval mode, prop_attn=True).

    Written from the reference's behaviour on reference parameter names: LoRA delta added to
    q, k, v; explicit softmax with log(size); ToMe matching per image (A = even, B = odd
    positions, protected CLS source / distillation destination, sources in descending
    similarity); PYRA on the size-weighted pairs; sizes merged unmodulated.
    """
    depth = len(schedule)
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    prefix = [sd["cls_token"]] + ([sd["dist_token"]] if num_prefix == 2 else [])
    x = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [x], dim=1) + sd["pos_embed"]
    B, _, D = x.shape
    hd = D // heads
    size = None
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(x, sd, p + "norm1", 1e-6)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        qkv = qkv + (h @ sd[p + "attn.LoRA_a.weight"].T) @ sd[p + "attn.LoRA_b.weight"].T
        N = x.shape[1]
        q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * hd ** -0.5
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        x = x + out @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        r = schedule[i]
        if r > 0:
            metric = k.mean(1)
            sizes = size if size is not None else torch.ones(B, N, 1)
            new_x, new_size = [], []
            for b in range(B):
                met = metric[b] / metric[b].norm(dim=-1, keepdim=True)
                a_pos, b_pos = list(range(0, N, 2)), list(range(1, N, 2))
                best = []
                for ai, a in enumerate(a_pos):
                    sims = [float(met[a] @ met[bb]) if not (num_prefix == 2 and bj == 0) else -math.inf
                            for bj, bb in enumerate(b_pos)]
                    if ai == 0:
                        sims = [-math.inf] * len(b_pos)          # CLS never a source
                    j = max(range(len(b_pos)), key=lambda t: sims[t])
                    best.append((sims[j], ai, j))
                order = sorted(best, key=lambda t: -t[0])
                src = order[:r]
                unm = sorted(ai for _, ai, _ in order[r:])
                xs = x[b] * sizes[b]
                m_s = torch.stack([xs[a_pos[ai]] for _, ai, _ in src])
                m_t = torch.stack([xs[b_pos[j]] for _, _, j in src])
                info = _ln(m_s + m_t, sd, p + "pyra_norm", 1e-5)
                w_r, w_d = sd[p + "pyra_a"], sd[p + "pyra_b"]
                d_D = sum(w_r[t, 0] * info[t] for t in range(r))                  # [D]
                modulated = []
                for t in range(r):
                    d_r = (info[t] * w_d[0]).sum()
                    modulated.append(m_s[t] + (2 * torch.sigmoid(d_r) - 1) * (2 * torch.sigmoid(d_D) * m_s[t]))
                dst_tok = [xs[bb].clone() for bb in b_pos]
                dst_size = [sizes[b, bb].clone() for bb in b_pos]
                for t, (_, ai, j) in enumerate(src):
                    dst_tok[j] = dst_tok[j] + modulated[t]
                    dst_size[j] = dst_size[j] + sizes[b, a_pos[ai]]
                unm_tok = [xs[a_pos[ai]] for ai in unm]
                unm_size = [sizes[b, a_pos[ai]] for ai in unm]
                if num_prefix == 2:
                    toks = [unm_tok[0], dst_tok[0]] + unm_tok[1:] + dst_tok[1:]
                    szs = [unm_size[0], dst_size[0]] + unm_size[1:] + dst_size[1:]
                else:
                    toks, szs = unm_tok + dst_tok, unm_size + dst_size
                szs = torch.stack(szs)
                new_x.append(torch.stack(toks) / szs)
                new_size.append(szs)
            x, size = torch.stack(new_x), torch.stack(new_size)
        h = _ln(x, sd, p + "norm2", 1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = _ln(x, sd, "norm", 1e-6)
    logits = x[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    if num_prefix == 2:
        logits = (logits + x[:, 1] @ sd["head_dist.weight"].T + sd["head_dist.bias"]) / 2
    return logits


@pytest.mark.parametrize("name,num_prefix,schedule", [(MODEL, 1, SCHEDULE),
                                                      ("deit_tiny_distilled_patch16_224", 2, [4, 4, 2, 1])])
def test_parity_with_reference_math(name, num_prefix, schedule):
    torch.manual_seed(2)
    model = tokentune.create_model(name, method="pyra", num_classes=5, tome_r=schedule, **tiny()).eval()
    randomize_lora(model)
    randomize_pyra(model)
    sd = to_reference_state_dict(model.state_dict())
    assert "blocks.0.pyra_a" in sd and "blocks.0.attn.LoRA_b.weight" in sd
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _reference_forward(sd, x, schedule, heads=3, patch=8, num_prefix=num_prefix)
        got = model(x)
        deployed = tokentune.deploy(model)(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.allclose(deployed, want, atol=1e-5, rtol=0)


def test_reference_state_dict_roundtrip_and_loading():
    torch.manual_seed(4)
    model = _pyra().eval()
    randomize_lora(model)
    randomize_pyra(model)
    ours = model.state_dict()
    ref = to_reference_state_dict(ours)
    assert ref["blocks.2.pyra_a"].shape == (2, 1) and ref["blocks.2.pyra_b"].shape == (1, 48)
    assert set(ref) >= {"blocks.1.pyra_norm.weight", "blocks.1.pyra_norm.bias", "blocks.1.attn.LoRA_a.weight"}
    assert not any("modulator" in k or "lora_" in k for k in ref)
    back = from_reference_state_dict({"model": {"module." + k: v for k, v in ref.items()}})
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    assert reference_schedule(ref) == SCHEDULE
    fresh = _pyra().eval()
    info = load_reference_checkpoint(fresh, ref)
    assert info == {"missing": [], "unexpected": []}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    other = _pyra(schedule=[4, 3, 2, 1])
    with pytest.raises(TokenTuneError, match=r"tome_r=\[5, 3, 2, 1\]"):
        load_reference_checkpoint(other, ref)
    with pytest.raises(TokenTuneError, match="no counterpart"):
        to_reference_state_dict(_pyra(pyra_variant="matrix").state_dict())


# ----------------------------------------------------------------------------- training
def _mod_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if ".merge.modulator." in n}


def test_gradients_reach_wr_wd_and_norm():
    model = _pyra()
    randomize_lora(model)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    grads = _mod_grads(model)
    # at init only W_D receives a gradient: step 2 multiplies everything else by 2 sigmoid(0) - 1 = 0
    assert all(grads[f"blocks.{i}.merge.modulator.W_D"].abs().sum() > 0 for i in range(3))
    assert all(g.abs().sum() == 0 for n, g in grads.items() if not n.endswith("W_D"))
    model.zero_grad()
    randomize_pyra(model)
    F.cross_entropy(model(x), y).backward()
    for name, g in _mod_grads(model).items():
        if name.startswith("blocks.3."):
            # the last block's merge never reaches the CLS token (only the per-token MLP follows):
            # with token pooling its modulator cannot influence the logits (as in the reference)
            assert g is None or g.abs().sum() == 0, name
        else:
            assert g is not None and g.abs().sum() > 0, name
    assert model.blocks[0].attn.qkv.lora_A.grad.abs().sum() > 0


def test_last_block_modulator_matters_with_average_pooling():
    model = tokentune.create_model(MODEL, method="pyra", num_classes=5, tome_r=SCHEDULE,
                                   **tiny(global_pool="avg", class_token=False, fc_norm=True))
    randomize_pyra(model)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert model.blocks[3].merge.modulator.W_D.grad.abs().sum() > 0


def test_short_training_lowers_loss_and_moves_wd():
    torch.manual_seed(0)
    model = _pyra(drop_path_rate=0.0)
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    for i in range(3):       # the last block's modulator cannot reach the CLS token (see above)
        assert model.blocks[i].merge.modulator.W_D.abs().max() > 1e-3


def test_deployed_equals_training_model():
    model = _pyra().eval()
    randomize_lora(model)
    randomize_pyra(model)
    deployed = tokentune.deploy(model)
    assert not any(isinstance(m, LoRALinear) for m in deployed.modules())
    assert len(modulators(deployed)) == 4 and not any(p.requires_grad for p in deployed.parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- ablations and counts
def _expected_generator(variant, schedule, dim=48, hidden=4):
    active = [r for r in schedule if r > 0]
    return {"pyra": sum(r + dim for r in active), "wr": sum(active), "wd": dim * len(active),
            "matrix": sum(r * dim for r in active), "gated_mlp": 2 * dim * hidden * len(active)}[variant]


@pytest.mark.parametrize("variant", ["pyra", "wr", "wd", "matrix", "gated_mlp"])
@pytest.mark.parametrize("activation", [True, False])
def test_ablation_builds_trains_and_counts(variant, activation):
    model = _pyra(pyra_variant=variant, pyra_activation=activation)
    randomize_lora(model)
    report = parameter_report(model)
    assert report["variant"] == variant
    assert report["generator"] == _expected_generator(variant, SCHEDULE)
    assert report["norm"] == (0 if variant == "matrix" else 2 * 48 * 4)
    lora = 4 * 8 * (48 + 3 * 48)
    assert report["peft"] == lora and report["paper_trainable"] == lora + report["generator"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".merge.modulator." in n}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "no modulator parameter changed after a step"


def test_unknown_options_are_clear():
    with pytest.raises(TokenTuneError, match="unknown pyra_variant"):
        _pyra(pyra_variant="full")
    with pytest.raises(TokenTuneError, match="unknown pyra_wr_init"):
        _pyra(pyra_wr_init="normal")


@pytest.mark.parametrize("backbone,rank,schedule,generator,lora,pct", [
    ("vit_base_patch16_224", 8, "low", 9_402, 294_912, 0.35),
    ("vit_base_patch16_224", 8, "high", 9_408, 294_912, 0.35),
    ("vit_large_patch16_224", 12, "low", 24_766, 1_179_648, 0.40),
    ("vit_large_patch16_224", 12, "high", 24_768, 1_179_648, 0.40),
])
def test_paper_parameter_counts(backbone, rank, schedule, generator, lora, pct):
    with torch.device("meta"):     # the real modules, no memory or init time
        model = tokentune.create_model(backbone, method="pyra", num_classes=100, lora_rank=rank, tome_r=schedule)
    report = parameter_report(model)
    dim = model.embed_dim
    assert report["generator"] == generator
    assert report["norm"] == 2 * dim * len(model.blocks)
    assert report["peft"] == lora
    assert round(report["paper_pct"], 2) == pct
    counts = tokentune.count_parameters(model)
    assert counts["paper_trainable"] == lora + generator
    assert counts["per_method"] == {"lora": lora, "pyra": generator + 2 * dim * len(model.blocks)}
    if backbone == "vit_base_patch16_224":
        assert counts["backbone"] == 85_798_656 and generator + report["norm"] in (27_834, 27_840)
    else:
        assert counts["backbone"] == 303_301_632


def test_paper_count_on_a_real_cpu_model():
    model = tokentune.create_model("vit_base_patch16_224", method="pyra", num_classes=100, tome_r="low")
    line = tokentune.print_trainable_parameters(model)
    assert "paper count (backbone, no head): 304,314 of 85,798,656 = 0.355%" in line
    assert "pyra: 27,834" in line


# ----------------------------------------------------------------------------- method specs, recipe
def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_method_specs_and_trainable_sets():
    pyra = _pyra()
    assert pyra.tokentune_spec["method"] == "lora+tome+pyra"
    names = _trainable(pyra)
    assert {n for n in names if ".merge." in n} == {f"blocks.{i}.merge.modulator.{p}" for i in range(4)
                                                  for p in ("W_r", "W_D", "norm.weight", "norm.bias")}
    assert {n for n in names if "lora_" in n} == {f"blocks.{i}.attn.qkv.lora_{p}" for i in range(4) for p in "AB"}
    assert names - {n for n in names if ".merge." in n or "lora_" in n} == {"head.weight", "head.bias"}
    adapter = _pyra("adapter+pyra")
    assert adapter.tokentune_spec["method"] == "adapter+tome+pyra"
    assert any(".adapter." in n for n in _trainable(adapter)) and not any("lora_" in n for n in _trainable(adapter))
    assert len(modulators(adapter)) == 4
    full = _pyra("full+pyra")
    assert all(p.requires_grad for p in full.parameters()) and len(modulators(full)) == 4


def test_zero_entries_get_no_modulator_and_missing_schedule_is_clear():
    model = _pyra(schedule=[4, 0, 2, 0])
    assert sorted(modulators(model)) == [0, 2]
    assert parameter_report(model)["generator"] == 4 + 2 + 2 * 48
    with pytest.raises(TokenTuneError, match="PYRA needs a merge schedule"):
        tokentune.create_model(MODEL, method="pyra", **tiny())
    with pytest.raises(TokenTuneError, match="merge schedule asks for r=9 in block 1"):
        _pyra(schedule=[8, 9])
    with pytest.raises(TokenTuneError, match="no 'low' merge schedule"):
        _pyra(schedule="low")


def test_save_and_load_trained_roundtrip(tmp_path):
    model = _pyra(pyra_variant="gated_mlp").eval()
    randomize_lora(model)
    randomize_pyra(model)
    tokentune.save_trained(model, str(tmp_path))
    loaded = tokentune.load_trained(str(tmp_path)).eval()
    loaded.load_state_dict(model.state_dict())   # frozen backbone weights are random here
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert schedule_of(loaded) == SCHEDULE and modulators(loaded)[0].variant == "gated_mlp"


def test_recipe_is_the_reference_setting():
    recipe = get_recipe("pyra-vtab")
    cfg = TrainConfig(**recipe.train_options)        # only existing fields
    assert (cfg.lr, cfg.weight_decay, cfg.opt_eps, cfg.epochs, cfg.warmup_epochs) == (1e-3, 1e-4, 1e-8, 100, 10)
    assert (cfg.warmup_lr, cfg.min_lr, cfg.schedule_step, cfg.batch_size) == (1e-6, 1e-5, "epoch", 32)
    assert (cfg.label_smoothing, cfg.amp, cfg.drop_last, cfg.seed, cfg.eval_every) == (0.0, "off", True, 0, 10)
    assert (cfg.train_split, cfg.test_split, cfg.normalization, cfg.interpolation) == \
        ("train800val200", "test", "imagenet", "bicubic")
    assert cfg.param_groups == {} and cfg.no_decay_norm_bias       # PYRA at the main lr, as published
    with torch.device("meta"):
        model = tokentune.create_model("vit_base_patch16_224", method=recipe.method, num_classes=10,
                                       **recipe.model_options)
    assert schedule_of(model) == [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]
    assert model.blocks[0].attn.qkv.rank == 8 and model.blocks[0].attn.qkv.lora_dropout.p == 0.1
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert get_recipe("pyra-vtab-large").model_options["lora_rank"] == 12


def test_param_groups_select_exactly_pyra():
    import re
    model = _pyra()
    groups = param_groups(lr=1e-4, weight_decay=1e-4)
    assert groups[GENERATOR] == {"lr": 1e-4, "weight_decay": 1e-4}
    assert groups[NORM] == {"lr": 1e-4, "weight_decay": 0.0}
    gen = {n for n, _ in model.named_parameters() if re.search(GENERATOR, n)}
    norm = {n for n, _ in model.named_parameters() if re.search(NORM, n)}
    assert gen == {f"blocks.{i}.merge.modulator.W_{s}" for i in range(4) for s in "rD"}
    assert norm == {f"blocks.{i}.merge.modulator.norm.{s}" for i in range(4) for s in ("weight", "bias")}
    assert param_groups() == {NORM: {"weight_decay": 0.0}}
