"""DyT: reference parity, skip == mask for every variant, STE, losses, MoE-adapter, ToMe, stats."""
import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize_dyt as _randomize
from conftest import randomize_lora, tiny
from torch.utils.flop_counter import FlopCounterMode

import tokentune
from tokentune import TrainConfig, get_recipe
from tokentune.errors import TokenTuneError
from tokentune.methods import dyt
from tokentune.methods.adapter import Adapter, MoEAdapter

VARIANTS = ["mlp", "attn", "attn_mlp", "layer"]
PREFIX = {
    "cls": dict(),
    "registers": dict(reg_tokens=2, no_embed_class=True),
    "no_prefix": dict(global_pool="avg", class_token=False, fc_norm=True),
}


def _model(variant="mlp", method="dyt", num_classes=5, kw=None, **options):
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=num_classes,
                                  dyt_variant=variant, dyt_bottleneck=8, **options, **tiny(**(kw or {})))


@torch.no_grad()
def _force(model, rate):
    """Every dispatcher activates all (rate 1) or no (rate 0) patch tokens."""
    for d in dyt.dispatchers(model):
        d.linear.weight.zero_()
        d.linear.bias.fill_(50.0 if rate == 1 else -50.0)


# ----------------------------------------------------------------------------- reference parity
def _reference_dyt(vit, ref, images, scale=1.0, tau=5.0, training=False, complete=False):
    """The reference DyT (MLP Dispatch) written out from its published behaviour, on reference names.

    Per block: attention on all tokens; dispatcher on the patch tokens (Gumbel noise as the
    difference of two Gumbel samples, sigmoid at temperature tau, hard threshold 0.5, STE);
    CLS gets mask 1; x + mask * mlp(norm2(x)) + scale * up(dropout(relu(down(x)))).
    ``complete``: the complete model (every mask 1). Returns the logits and the [B, layers, N - 1] masks.
    """
    x = vit._pos_embed(vit.patch_embed(images))
    masks = []
    for i, blk in enumerate(vit.blocks):
        B, N, C = x.shape
        H = blk.attn.num_heads
        qkv = F.linear(blk.norm1(x), blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, N, 3, H, C // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q * (C // H) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, N, C), blk.attn.proj.weight, blk.attn.proj.bias)
        logits = F.linear(x[:, 1:], ref[f"blocks.{i}.mlp_token_select.mlp_head.weight"],
                          ref[f"blocks.{i}.mlp_token_select.mlp_head.bias"])
        if training:
            g1 = -torch.empty_like(logits).exponential_().log()
            g2 = -torch.empty_like(logits).exponential_().log()
            soft = ((logits + g1 - g2) / tau).sigmoid()
        else:
            soft = logits.sigmoid()
        hard = (soft > 0.5).float()
        select = torch.cat([torch.ones(B, 1, 1), hard - soft.detach() + soft], dim=1)
        if complete:
            select = torch.ones_like(select)
        masks.append(select[:, 1:, 0])
        down = F.relu(F.linear(x, ref[f"blocks.{i}.adaptmlp.down_proj.weight"], ref[f"blocks.{i}.adaptmlp.down_proj.bias"]))
        down = F.dropout(down, p=0.1, training=training)
        adapt = F.linear(down, ref[f"blocks.{i}.adaptmlp.up_proj.weight"], ref[f"blocks.{i}.adaptmlp.up_proj.bias"]) * scale
        mlp = blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        x = x + select * mlp + adapt
    x = vit.norm(x)
    return vit.head(x[:, 0]), torch.stack(masks, dim=1)


def _reference_pair(scale=1.0):
    """A plain timm ViT plus reference-named DyT tensors, and our model loaded from them."""
    torch.manual_seed(11)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, **tiny()).eval()
    ref = {}
    for i in range(4):
        ref[f"blocks.{i}.adaptmlp.down_proj.weight"] = torch.randn(8, 48) * 0.2
        ref[f"blocks.{i}.adaptmlp.down_proj.bias"] = torch.randn(8) * 0.1
        ref[f"blocks.{i}.adaptmlp.up_proj.weight"] = torch.randn(48, 8) * 0.2
        ref[f"blocks.{i}.adaptmlp.up_proj.bias"] = torch.randn(48) * 0.1
        ref[f"blocks.{i}.mlp_token_select.mlp_head.weight"] = torch.randn(1, 48) * 0.3
        ref[f"blocks.{i}.mlp_token_select.mlp_head.bias"] = torch.randn(1) * 0.1
    checkpoint = {"model": dict(vit.state_dict(), **ref), "epoch": 3}
    ours = _model(dyt_adapter_scale=scale)
    dyt.load_reference_checkpoint(ours, checkpoint)
    return vit, ref, ours.eval()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("execution", ["skip", "mask"])
def test_eval_matches_reference(batch, execution):
    vit, ref, ours = _reference_pair(scale=0.7)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        want, masks = _reference_dyt(vit, ref, x, scale=0.7)
        got, state = ours(x, return_state=True, dyt_execution=execution)
    assert 0.2 < masks.mean() < 0.8                      # a real mix of active and skipped tokens
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    ours_masks = torch.stack([r.patch_mask() for r in dyt.dispatch_records(state)], dim=1)
    assert torch.equal(ours_masks, masks)


def test_training_forward_and_gradients_match_reference():
    """Same seed -> same Gumbel noise and adapter dropout draws -> same outputs and STE gradients."""
    vit, ref, ours = _reference_pair()
    ours.train()
    ref = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(5)
    got, state = ours(x, return_state=True)
    torch.manual_seed(5)
    want, masks = _reference_dyt(vit, ref, x, training=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    ours_masks = torch.stack([r.patch_mask() for r in dyt.dispatch_records(state)], dim=1)
    assert torch.equal(ours_masks.detach(), masks.detach())
    (got.square().sum() + ours_masks.mean()).backward()
    (want.square().sum() + masks.mean()).backward()
    for i in range(4):
        g_ours = ours.blocks[i].mlp_dispatcher.linear.weight.grad
        g_ref = ref[f"blocks.{i}.mlp_token_select.mlp_head.weight"].grad
        assert g_ours.abs().sum() > 0
        assert torch.allclose(g_ours, g_ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(ours.blocks[i].adapter.up_proj.weight.grad,
                              ref[f"blocks.{i}.adaptmlp.up_proj.weight"].grad, atol=1e-5, rtol=1e-4)


def test_reference_state_dict_conversion_round_trip():
    vit, ref, ours = _reference_pair()
    sd = ours.state_dict()
    back = dyt.to_reference_state_dict(sd)
    assert "blocks.2.mlp_token_select.mlp_head.weight" in back and "blocks.2.adaptmlp.up_proj.bias" in back
    assert not any(".adapter." in k or "dispatcher" in k for k in back)
    assert torch.equal(back["blocks.1.adaptmlp.down_proj.weight"], ref["blocks.1.adaptmlp.down_proj.weight"])
    again = dyt.from_reference_state_dict(dict(back, **{"pre_logits.fc.weight": torch.zeros(1)}))
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    with pytest.raises(TokenTuneError, match="no counterpart in the DyT reference"):
        dyt.to_reference_state_dict(_model("attn").state_dict())
    with pytest.raises(TokenTuneError, match="lacks"):
        dyt.load_reference_checkpoint(_model(), vit.state_dict())


def test_reference_checkpoint_file_loads_safely(tmp_path):
    """A file as the reference's training script saves it: model, optimizer, epoch, scaler and argparse args."""
    import argparse
    vit, ref, ours = _reference_pair()
    trained = [v.clone().requires_grad_() for v in ref.values()]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=1e-4)
    sum(v.sum() for v in trained).backward()
    optimizer.step()                        # optimizer state as saved after training: tensors and numbers
    torch.save({"model": dict(vit.state_dict(), **ref), "optimizer": optimizer.state_dict(),
                "epoch": 99, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                        "growth_interval": 2000, "_growth_tracker": 0},
                "args": argparse.Namespace(batch_size=64, epochs=100, lr=1e-3, ffn_num=8, dataset="cifar",
                                           output_dir="./output", world_size=1, distributed=False)},
               tmp_path / "checkpoint-99.pth")
    loaded = _model()
    dyt.load_reference_checkpoint(loaded, tmp_path / "checkpoint-99.pth")    # no trust_checkpoint needed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), ours(x))


# ----------------------------------------------------------------------------- skip == mask
@pytest.mark.parametrize("prefix", list(PREFIX))
@pytest.mark.parametrize("variant", VARIANTS)
def test_skip_equals_mask(variant, prefix):
    model = _model(variant, kw=PREFIX[prefix]).eval()
    _randomize(model)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            for rate in (0.0, 0.5, 1.0):
                if rate == 0.5:
                    _randomize(model)
                    dyt.calibrate_activation(model, x, 0.5)
                else:
                    _force(model, rate)
                skip, state = model(x, return_state=True)
                mask = model(x, dyt_execution="mask")
                assert dyt.activation_rate(state).item() == pytest.approx(rate, abs=0.1)
                assert torch.isfinite(skip).all()
                assert torch.allclose(skip, mask, atol=1e-5, rtol=0), (variant, prefix, batch, rate)


@pytest.mark.parametrize("variant", ["attn", "layer"])
def test_attention_skip_with_uneven_counts(variant):
    """Images with very different active counts (padding in the batched gather) and proportional
    attention sizes: skip == mask, and a fully active image equals the complete model."""
    model = _model(variant).eval()
    _randomize(model)
    x = torch.randn(4, 3, 32, 32)
    rows = torch.tensor([True, False, False, True])
    with torch.no_grad():
        dyt.calibrate_activation(model, x, 0.3)
        skip = model(x, dyt_complete=rows)
        mask = model(x, dyt_complete=rows, dyt_execution="mask")
        full = model(x, dyt_complete=True)
    assert torch.allclose(skip, mask, atol=1e-5, rtol=0)
    assert torch.allclose(skip[rows], full[rows], atol=1e-5, rtol=0)
    assert not torch.allclose(skip[~rows], full[~rows], atol=1e-3)


def test_attention_dispatch_hides_inactive_tokens():
    """An inactive token is neither a query nor a key/value: changing it leaves active tokens alone."""
    model = _model("attn").eval()
    _randomize(model)
    blk = model.blocks[0]
    with torch.no_grad():
        blk.attn_dispatcher.linear.weight.zero_()
        blk.attn_dispatcher.linear.weight[0, 0] = 10.0        # decision = sign of channel 0
    x = torch.randn(2, 17, 48)
    active = x[..., 0] > 0
    active[:, 0] = True
    x2 = x.clone()
    x2[..., 1:] += 3.0 * (~active).unsqueeze(-1) * torch.randn(2, 17, 47)
    for execution in ("skip", "mask"):
        state = model.initial_state(x, dyt_execution=execution)
        with torch.no_grad():
            y1, _ = blk(x, state)
            y2, _ = blk(x2, state)
        assert torch.allclose(y1[active], y2[active], atol=1e-5), execution
        assert not torch.allclose(y1[~active], y2[~active], atol=1e-2)


def test_skip_really_skips_flops():
    """The skipped MLP rows are not computed: FLOPs drop by exactly the skipped MLP work."""
    model = _model("mlp").eval()
    x = torch.randn(3, 3, 32, 32)

    def flops(**opt):
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            model(x, **opt)
        return c.get_total_flops()

    _force(model, 0)
    none = flops()
    full = flops(dyt_complete=True)
    C, depth, patches = 48, 4, 16
    mlp_per_token = 2 * (C * 4 * C) * 2            # fc1 + fc2, 2 FLOPs per multiply-add
    dispatcher_per_token = 2 * C
    assert full - none == depth * 3 * patches * mlp_per_token - depth * 3 * 17 * dispatcher_per_token
    for variant in ("attn", "attn_mlp", "layer"):
        model = _model(variant).eval()
        _randomize(model)
        counts = []
        for rate in (0.0, 0.5, 1.0):
            dyt.calibrate_activation(model, x, rate)
            counts.append(flops())
        assert counts[0] < counts[1] < counts[2], variant


# ----------------------------------------------------------------------------- dispatcher / STE
def test_ste_forward_hard_backward_soft():
    model = _model("attn_mlp").train()
    _randomize(model)
    x = torch.randn(4, 3, 32, 32)
    out, state = model(x, return_state=True)
    records = dyt.dispatch_records(state)
    assert len(records) == 8 and {r.kind for r in records} == {"attn", "mlp"}
    for r in records:
        assert set(r.mask.detach().unique().tolist()) <= {0.0, 1.0}     # hard 0/1 forward values
        assert torch.equal(r.mask[:, 0].detach(), torch.ones(4))        # CLS always active
    # the CLS entry is a constant (no gradient reaches the dispatcher through it), patch entries are soft
    mlp_record = records[1]
    weight = model.blocks[0].mlp_dispatcher.linear.weight
    assert mlp_record.kind == "mlp" and mlp_record.layer == 0
    g_cls, = torch.autograd.grad(mlp_record.mask[:, 0].sum(), weight, retain_graph=True)
    g_patch, = torch.autograd.grad(mlp_record.mask[:, 1:].sum(), weight, retain_graph=True)
    assert torch.count_nonzero(g_cls) == 0 and torch.count_nonzero(g_patch) > 0
    (out.square().mean() + dyt.rate_loss(state, 0.2)).backward()
    for d in dyt.dispatchers(model):
        assert d.linear.weight.grad is not None and d.linear.weight.grad.abs().sum() > 0


def test_eval_is_deterministic_and_noise_free():
    model = _model().eval()
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, s1 = model(x, return_state=True)
        _, s2 = model(x, return_state=True)
    for a, b in zip(dyt.dispatch_records(s1), dyt.dispatch_records(s2)):
        assert torch.equal(a.mask, b.mask)
    blk = model.blocks[1]
    y = torch.randn(2, 17, 48)
    d, _ = blk.mlp_dispatcher(y, model.initial_state(y))
    logits = blk.mlp_dispatcher.linear(y)[:, 1:, 0]
    assert torch.equal(d.active[:, 1:], logits.sigmoid() > 0.5)


def test_temperature_schedule_and_setters():
    cfg = dyt.DyTConfig()
    assert dyt.temperature_at(0.0, cfg) == dyt.temperature_at(0.7, cfg) == 5.0
    lin = dataclasses.replace(cfg, tau_end=1.0)
    assert dyt.temperature_at(0.0, lin) == 5.0 and dyt.temperature_at(1.0, lin) == 1.0
    assert dyt.temperature_at(0.5, lin) == pytest.approx(3.0)
    cos = dataclasses.replace(cfg, tau_end=1.0, tau_schedule="cosine")
    assert dyt.temperature_at(0.5, cos) == pytest.approx(3.0) and dyt.temperature_at(0.25, cos) > 3.0
    exp = dataclasses.replace(cfg, tau_end=0.5, tau_schedule="exponential")
    assert dyt.temperature_at(0.5, exp) == pytest.approx(math.sqrt(2.5))
    model = _model(dyt_tau_end=1.0)
    assert dyt.update_temperature(model, 0.5) == pytest.approx(3.0)
    assert all(d.tau == pytest.approx(3.0) for d in dyt.dispatchers(model))
    dyt.set_temperature(model, 0.1)
    assert all(d.tau == 0.1 for d in dyt.dispatchers(model))
    with pytest.raises(TokenTuneError):
        dyt.set_temperature(model, 0.0)


# ----------------------------------------------------------------------------- losses / training
def test_loss_matches_reference_composition():
    """L = CE + 2 (rate - r)^2 + CE(complete) + KL(complete || dynamic), reference formulas."""
    vit, ref, ours = _reference_pair()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seen = []
    hook = ours.patch_embed.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    with torch.no_grad():
        loss, logs = dyt.dyt_loss(ours, x, y, F.cross_entropy)
        dyn, masks = _reference_dyt(vit, ref, x)
        full, _ = _reference_dyt(vit, ref, x, complete=True)
    want = (F.cross_entropy(dyn, y) + 2 * (masks.mean() - 0.5) ** 2 + F.cross_entropy(full, y)
            + F.kl_div(F.log_softmax(dyn, -1), F.log_softmax(full, -1), reduction="batchmean", log_target=True))
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert logs["rate"] == pytest.approx(masks.mean().item(), abs=1e-6)
    assert seen == [8]                             # one forward over [x; x]
    # the complete-model pass only when its terms are enabled
    seen.clear()
    ours.tokentune.state["dyt"] = dataclasses.replace(dyt.config_of(ours), complete_weight=0.0, distill_weight=0.0)
    with torch.no_grad():
        loss, logs = dyt.dyt_loss(ours, x, y, F.cross_entropy)
    assert seen == [4] and set(logs) == {"ce", "rate", "rate_loss"}
    assert loss.item() == pytest.approx((F.cross_entropy(dyn, y) + 2 * (masks.mean() - 0.5) ** 2).item(), abs=1e-5)
    hook.remove()


def test_loss_reads_config_through_wrappers():
    class Wrapper(torch.nn.Module):      # DDP-like: the config lives on .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = _model().train()
    loss, logs = dyt.dyt_loss(Wrapper(model), torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), F.cross_entropy)
    loss.backward()
    assert math.isfinite(loss.item()) and "kl" in logs


def test_short_training_moves_rate_to_target():
    torch.manual_seed(0)
    model = _model(num_classes=3, dyt_target_rate=0.15).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    start = dyt.activation_stats(model, [x]).overall
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.03)
    for _ in range(25):
        loss, logs = dyt.dyt_loss(model, x, y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = dyt.activation_stats(model, [x]).overall
    assert start > 0.35
    assert abs(end - 0.15) < abs(start - 0.15) - 0.15, (start, end)
    assert model.training                          # activation_stats restores the mode


def test_gradient_checkpointing_same_gradients():
    kw = tiny(drop_path_rate=0.1)
    a = tokentune.create_model("vit_tiny_patch16_224", method="dyt", num_classes=4, **kw)
    b = tokentune.create_model("vit_tiny_patch16_224", method="dyt", num_classes=4, **kw)
    _randomize(a)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    grads = []
    for m in (a, b):
        m.train()
        torch.manual_seed(9)
        dyt.dyt_loss(m, x, y, F.cross_entropy)[0].backward()
        grads.append(m.blocks[2].mlp_dispatcher.linear.weight.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ----------------------------------------------------------------------------- adapters
def test_moe_with_one_expert_equals_adapter():
    torch.manual_seed(2)
    plain = Adapter(48, 8, scale=0.5, dropout=0.1)
    moe = MoEAdapter(48, 8, num_experts=1, scale=0.5, dropout=0.1)
    with torch.no_grad():
        plain.up_proj.weight.normal_()
        plain.up_proj.bias.normal_()
        plain.down_proj.bias.normal_()
        moe.down_weight[0].copy_(plain.down_proj.weight)
        moe.down_bias[0].copy_(plain.down_proj.bias)
        moe.up_weight[0].copy_(plain.up_proj.weight)
        moe.up_bias[0].copy_(plain.up_proj.bias)
        moe.router.weight.normal_()
    x = torch.randn(3, 17, 48)
    assert torch.allclose(moe.eval()(x), plain.eval()(x), atol=1e-6)
    torch.manual_seed(4)
    a = moe.train()(x)
    torch.manual_seed(4)
    assert torch.allclose(a, plain.train()(x), atol=1e-6)       # same dropout draws


def test_moe_routes_per_image_in_weight_space():
    torch.manual_seed(3)
    moe = MoEAdapter(48, 8, num_experts=4, scale=1.0, dropout=0.0).eval()
    with torch.no_grad():
        for p in (moe.up_weight, moe.up_bias, moe.down_bias, moe.router.weight):
            p.normal_()
    x = torch.randn(3, 17, 48)
    out = moe(x)
    for b in range(3):
        alpha = torch.softmax(moe.router(x[b].mean(0)), -1)
        wd = sum(alpha[e] * moe.down_weight[e] for e in range(4))
        bd = sum(alpha[e] * moe.down_bias[e] for e in range(4))
        wu = sum(alpha[e] * moe.up_weight[e] for e in range(4))
        bu = sum(alpha[e] * moe.up_bias[e] for e in range(4))
        want = F.linear(F.relu(F.linear(x[b], wd, bd)), wu, bu)
        assert torch.allclose(out[b], want, atol=1e-5)
    # zero-initialised experts: the adapter starts as the identity of the block
    assert torch.count_nonzero(MoEAdapter(48, 8, 4)(x)) == 0


def test_moe_in_dyt_model_and_counts():
    model = _model(dyt_experts=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.adapter.down_weight", "blocks.0.adapter.router.weight", "blocks.3.mlp_dispatcher.linear.bias"} <= names
    per_block = 4 * (2 * 48 * 8 + 8 + 48) + (48 * 4 + 4) + 49
    assert tokentune.count_parameters(model)["per_method"]["dyt"] == 4 * per_block
    x = torch.randn(2, 3, 32, 32)
    _randomize(model)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), model(x, dyt_execution="mask"), atol=1e-5)


def test_parameter_count_vit_b_bottleneck16():
    model = tokentune.create_model("vit_base_patch16_224", method="dyt", num_classes=100)
    c = tokentune.count_parameters(model)
    assert c["per_method"]["dyt"] == 313_548 == 12 * (2 * 768 * 16 + 16 + 768 + 769)
    assert c["paper_trainable"] == 313_548
    assert c["trainable"] == 313_548 + 76_900


def test_variant_structure_and_keep_layers():
    expect = {"mlp": {"adapter", "mlp_dispatcher"}, "attn": {"attn_adapter", "attn_dispatcher"},
              "attn_mlp": {"adapter", "mlp_dispatcher", "attn_adapter", "attn_dispatcher"},
              "layer": {"layer_adapter", "layer_dispatcher"}}
    for variant, plugins in expect.items():
        model = _model(variant, dyt_keep_layers=1)
        assert set(model.blocks[0].plugins()) == {p for p in plugins if "adapter" in p}
        assert set(model.blocks[1].plugins()) == plugins
        _, state = model.eval()(torch.randn(1, 3, 32, 32), return_state=True)
        assert [r.layer for r in dyt.dispatch_records(state)][0] == 1
    # adapters are zero-initialised: a fresh DyT model at 100% activation is the backbone
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, **tiny()).eval()
    for variant in VARIANTS:
        torch.manual_seed(1)
        model = _model(variant).eval()
        with torch.no_grad():
            x = torch.randn(2, 3, 32, 32)
            assert torch.allclose(model(x, dyt_complete=True), ref(x), atol=1e-5)


def test_errors_are_clear():
    with pytest.raises(TokenTuneError, match="unknown dyt variant"):
        _model("token")
    with pytest.raises(TokenTuneError, match="brings its own adapters"):
        _model(method="adapter+dyt")
    with pytest.raises(TokenTuneError, match="MLP Dispatch only"):
        _model("attn", method="dyt+tome", tome_r=2)
    with pytest.raises(TokenTuneError, match="keep_layers=9"):
        _model(dyt_keep_layers=9)


# ----------------------------------------------------------------------------- deploy
@pytest.mark.parametrize("method", ["dyt", "lora+dyt"])
def test_deployed_equals_training_model_in_eval(method):
    model = _model("attn_mlp", method=method, dyt_inference="mask").eval()
    _randomize(model)
    randomize_lora(model)
    x = torch.randn(4, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    deployed = tokentune.deploy(model)
    assert all(d.inference == "skip" for d in dyt.dispatchers(deployed))
    assert all(d.inference == "mask" for d in dyt.dispatchers(model))
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5, rtol=0)
        assert torch.allclose(deployed(x[:1]), model(x[:1]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- DyT + ToMe
def test_dyt_tome_order_and_equivalence():
    model = _model(method="dyt+tome", tome_r=[3, 2, 2, 1]).eval()
    _randomize(model)
    counts = tokentune.methods.tome.token_counts([3, 2, 2, 1], 17)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dyt.calibrate_activation(model, x, 0.5)
        skip, state = model(x, return_state=True)
        mask = model(x, dyt_execution="mask")
    assert torch.allclose(skip, mask, atol=1e-5, rtol=0)
    # the dispatcher of block i sees the tokens left after that block's merge
    assert [r.mask.shape[1] for r in dyt.dispatch_records(state)] == counts[1:]
    # in a block, skipping does not change the merge: same sizes whatever the activation
    blk = model.blocks[0]
    tokens = torch.randn(2, 17, 48)
    results = []
    for rate in (0, 1):
        _force(model, rate)
        with torch.no_grad():
            results.append(blk(tokens, model.initial_state(tokens))[1])
    assert torch.equal(results[0].size, results[1].size)
    # dyt + tome at 100% equals adapter + tome with the same weights
    _randomize(model)
    with torch.no_grad():
        full = model(x, dyt_complete=True)
        twin = tokentune.create_model("vit_tiny_patch16_224", method="adapter+tome", num_classes=5,
                                      adapter_bottleneck=8, tome_r=[3, 2, 2, 1], **tiny()).eval()
        twin.load_state_dict({k: v for k, v in model.state_dict().items() if "dispatcher" not in k})
        assert torch.allclose(full, twin(x), atol=1e-5)


# ----------------------------------------------------------------------------- statistics
def test_activation_stats_and_masks():
    model = _model(method="dyt+tome", tome_r=2).eval()
    _randomize(model)
    data = [(torch.randn(3, 3, 32, 32), torch.zeros(3)), (torch.randn(2, 3, 32, 32), torch.zeros(2))]
    stats = dyt.activation_stats(model, data, keep_masks=True)
    assert stats.num_images == 5 and stats.names == [f"blocks.{i}.mlp" for i in range(4)]
    assert stats.masks.shape == (5, 4, 16) and stats.grid == (4, 4)
    assert model.tokentune.trace_source is False                 # a per-forward option: the model is unchanged
    # recompute independently: per-layer rates and the patch masks through the source map
    active_sum, total = torch.zeros(4), torch.zeros(4)
    for b, (images, _) in enumerate(data):
        with torch.no_grad():
            _, state = model(images, return_state=True, trace_source=True)
        for j, rec in enumerate(dyt.dispatch_records(state)):
            m = rec.mask[:, 1:]
            active_sum[j] += m.sum()
            total[j] += m.numel()
            offset = 3 * b
            for i in range(images.shape[0]):
                src = rec.source[i] if rec.source is not None else torch.eye(17)
                for t in range(rec.mask.shape[1]):
                    for patch in src[t].nonzero().flatten().tolist():
                        if patch >= 1:
                            assert stats.masks[offset + i, j, patch - 1] == bool(rec.mask[i, t] > 0.5)
    assert stats.per_layer == pytest.approx((active_sum / total).tolist(), abs=1e-6)
    assert stats.overall == pytest.approx(sum(stats.per_layer) / 4)
    assert "overall activation" in stats.summary()


def test_calibration_hits_the_rate():
    model = _model("layer").eval()
    _randomize(model)
    x = torch.randn(6, 3, 32, 32)
    for rate in (0.25, 0.5, 0.75):
        assert dyt.calibrate_activation(model, x, rate) == pytest.approx(rate, abs=0.02)


def test_recipe_is_valid():
    recipe = get_recipe("dyt-vtab")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(recipe.train_options) <= fields
    cfg = TrainConfig(**recipe.train_options)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (1e-3, 1e-4, 64, 100)
    assert (cfg.warmup_epochs, cfg.min_lr) == (10, 1e-5)
    assert cfg.normalization == "inception"
    model = tokentune.create_model("vit_tiny_patch16_224", method=recipe.method, num_classes=5,
                                   **dict(recipe.model_options, **tiny()))
    assert dyt.config_of(model).bottleneck == 16 and dyt.config_of(model).target_rate == 0.5
    assert model.head.weight.std().item() == pytest.approx(0.01, rel=0.3)


def test_save_and_load_trained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model("attn_mlp", dyt_experts=2, dyt_tau_end=1.0).eval()
    _randomize(model)
    tokentune.save_trained(model, str(tmp_path))
    torch.manual_seed(0)                       # same random backbone
    loaded = tokentune.load_trained(str(tmp_path)).eval()
    assert dyt.config_of(loaded) == dyt.config_of(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
