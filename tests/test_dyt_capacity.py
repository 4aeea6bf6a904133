"""DyT's static-shape execution (``dyt_execution="capacity"``): equal to the threshold rule when the
capacity suffices, a literal top-k reimplementation when it does not, FLOPs fixed by the capacity,
no graph breaks, torch.export / meta-device runs, calibration, deploy options and exports."""
import math

import pytest
import torch
from conftest import randomize_dyt, tiny
from torch.utils.flop_counter import FlopCounterMode

import tokentune
from tokentune.core.skip import capacity_index
from tokentune.errors import TokenTuneError
from tokentune.methods import dyt

VARIANTS = ["mlp", "attn", "attn_mlp", "layer"]
PREFIX = {
    "cls": dict(),
    "registers": dict(reg_tokens=2, no_embed_class=True),
    "no_prefix": dict(global_pool="avg", class_token=False, fc_norm=True),
}


def _model(variant="mlp", method="dyt", kw=None, **options):
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, dyt_variant=variant,
                                   dyt_bottleneck=8, **options, **tiny(**(kw or {}))).eval()
    randomize_dyt(model)
    return model


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- equal to the threshold rule
@pytest.mark.parametrize("variant,prefix", [(v, "cls") for v in VARIANTS]
                         + [("layer", "registers"), ("layer", "no_prefix"), ("mlp", "no_prefix")])
def test_capacity_equals_threshold_rule_when_it_suffices(variant, prefix):
    """Capacity >= every image's active count: same decisions and outputs as the threshold rule."""
    model = _model(variant, kw=PREFIX[prefix])
    x = torch.randn(5, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    with torch.no_grad():
        want, want_state = model(x, return_state=True, dyt_execution="skip")
        counts = dyt.calibrate_capacity(model, x)                       # quantile 1: the busiest image
        got, state = model(x, return_state=True)
        every = tokentune.deploy(model, dyt_capacity=2.0)(x)              # 2 * rate 0.5: every token chosen
    for a, b in zip(dyt.dispatch_records(state), dyt.dispatch_records(want_state)):
        assert torch.equal(a.mask, b.mask)
    busiest = [int(r.patch_mask().sum(1).max()) for r in dyt.dispatch_records(want_state)]
    assert counts == busiest and max(counts) < 16                    # some tokens really skip
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(every, want, atol=1e-5, rtol=0)
    with torch.no_grad():                                            # one image alone: its own counts suffice too
        assert torch.allclose(model(x[:1]), model(x[:1], dyt_execution="skip"), atol=1e-5, rtol=0)


def test_capacity_equals_threshold_rule_with_tome():
    model = _model(method="dyt+tome", tome_r=[3, 2, 2, 1])
    x = torch.randn(3, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    with torch.no_grad():
        want = model(x, dyt_execution="skip")
        counts = dyt.calibrate_capacity(model, x)
        got = model(x)
    assert len(counts) == 4 and all(c <= n for c, n in zip(counts, [13, 11, 9, 8]))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- over capacity: literal top-k
@torch.no_grad()
def _literal(model, images, variant, k):
    """DyT with a per-image top-k cap written out on timm's submodules: per block, the dispatcher's
    patch logits; active = above 0.5 after sigmoid AND among the k largest logits; attention
    dispatch hides inactive keys and gates queries, MLP dispatch gates the MLP update."""
    x = model._pos_embed(model.patch_embed(images))
    B, N, C = x.shape
    for blk in model.blocks:
        def decide(disp, tokens):
            logits = disp.linear(tokens)[:, 1:, 0]
            top = logits.argsort(dim=1, descending=True)[:, :k]
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
            return torch.cat([torch.ones(B, 1, dtype=torch.bool), (logits.sigmoid() > 0.5) & chosen], 1)

        if variant == "attn":
            m = decide(blk.attn_dispatcher, x)
            a = blk.attn
            qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
            logits = (qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)
            logits = logits.masked_fill(~m[:, None, None, :], float("-inf"))
            h = a.proj((logits.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(B, N, C))
            x1 = x + m[..., None] * h + blk.attn_adapter(x)
            x = x1 + blk.mlp(blk.norm2(x1))
        else:
            x1 = x + blk.attn(blk.norm1(x))
            m = decide(blk.mlp_dispatcher, x1)
            x = x1 + m[..., None] * blk.mlp(blk.norm2(x1)) + blk.adapter(x1)
    return model.head(model.norm(x)[:, 0])


@pytest.mark.parametrize("variant", ["mlp", "attn"])
def test_over_capacity_matches_literal_top_k(variant):
    model = _model(variant)
    x = torch.randn(4, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.6)
    k = 5                                                   # below most images' active counts
    deployed = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=[k] * 4)
    with torch.no_grad():
        got, state = deployed(x, return_state=True)
        threshold = model(x, dyt_execution="skip")
    assert all(int(r.patch_mask().sum(1).max()) <= k for r in dyt.dispatch_records(state))
    assert torch.allclose(got, _literal(model, x, variant, k), atol=1e-5, rtol=0)
    assert not torch.allclose(got, threshold, atol=1e-5)          # the cap changed something


def test_capacity_index_picks_top_k_in_order():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    index, chosen = capacity_index(scores, 2, num_prefix=1)
    assert index.tolist() == [[0, 2, 4], [0, 1, 2]]                 # prefix, then original order
    assert chosen.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert capacity_index(scores, 9, 0)[0].shape == (2, 5)          # clipped to the patch count


def test_factor_fixes_the_flops():
    """k = ceil(factor * target_rate * M); the MLP runs on exactly (prefix + k) rows per image."""
    model = _model("mlp", dyt_target_rate=0.5)
    x = torch.randn(3, 3, 32, 32)

    def flops(factor):
        deployed = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=factor)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            deployed(x)
        return counter.get_total_flops()

    k1, k2 = math.ceil(0.5 * 0.5 * 16), math.ceil(1.0 * 0.5 * 16)     # 4 and 8 of 16 patch tokens
    mlp_per_token = 2 * (48 * 4 * 48) * 2
    assert flops(1.0) - flops(0.5) == 4 * 3 * (k2 - k1) * mlp_per_token


# ----------------------------------------------------------------------------- static shapes
def _deployed_capacity(variant, factor=1.25):
    model = _model(variant)
    x = torch.randn(3, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    return model, tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=factor), x


def test_no_graph_breaks_and_the_speed_up_is_in_the_exported_graph():
    model, deployed, x = _deployed_capacity("mlp")
    with torch.no_grad():
        assert torch._dynamo.explain(deployed)(x).graph_break_count == 0
        assert torch._dynamo.explain(tokentune.deploy(model))(x).graph_break_count > 0   # the threshold rule breaks
        program = torch.export.export(deployed, (x,))
        assert torch.allclose(program.module()(x), deployed(x), atol=1e-5, rtol=0)
    # every MLP runs on 3 * (1 + k) rows, k = ceil(1.25 * 0.5 * 16) = 10, not on all 3 * 17
    fc1 = [n for n in program.graph.nodes if n.op == "call_function" and len(n.args) > 1
           and "mlp_fc1_weight" in str(n.args[1])]
    assert len(fc1) == 4 and {tuple(n.args[0].meta["val"].shape) for n in fc1} == {(3 * 11, 48)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mlp", "attn_mlp"])
def test_fullgraph_compile_and_dynamic_batch_export(variant):
    _, deployed, x = _deployed_capacity(variant)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(deployed, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(x), deployed(x), atol=1e-5, rtol=0)
        program = torch.export.export(deployed, (x,), dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        for b in (1, 3, 5):
            y = torch.randn(b, 3, 32, 32)
            assert torch.allclose(program.module()(y), deployed(y), atol=1e-5, rtol=0)


def test_capacity_runs_on_the_meta_device():
    """A forward on meta tensors never reads a value on the host: no sync, no data-dependent shape."""
    model = _model("layer")
    x = torch.randn(2, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    meta = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=1.0).to("meta")
    with torch.no_grad():
        assert meta(x.to("meta")).shape == (2, 5)
        with pytest.raises((NotImplementedError, RuntimeError)):   # the threshold rule must read its token counts
            tokentune.deploy(model).to("meta")(x.to("meta"))


# ----------------------------------------------------------------------------- calibration, deploy, export
def test_calibrate_capacity_quantile_and_record():
    model = _model("mlp")
    x = torch.randn(8, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    with torch.no_grad():
        _, state = model(x, return_state=True)
    per_image = torch.stack([r.patch_mask().sum(1) for r in dyt.dispatch_records(state)])    # [4, 8]
    low = dyt.calibrate_capacity(model, [(x[:4], None), (x[4:], None)], quantile=0.5)
    assert low == [math.ceil(float(c.quantile(0.5)) - 1e-6) for c in per_image]
    top = dyt.calibrate_capacity(model, x)
    assert top == [int(c.max()) for c in per_image]
    cfg = dyt.config_of(model)
    assert (cfg.inference, cfg.capacity) == ("capacity", top)
    assert model.tokentune.spec["configs"]["dyt"]["capacity"] == top
    assert dyt.calibrate_activation(model, x, 0.5) == pytest.approx(0.5, abs=0.02)   # still the threshold rule


def test_deploy_keeps_the_execution_and_exports_round_trip(tmp_path):
    model = _model("attn_mlp")
    x = torch.randn(3, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    deployed = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=1.5)
    assert dyt.config_of(model).inference == "skip"                  # the original model is unchanged
    assert all(d.inference == "capacity" and d.capacity_factor == 1.5 for d in dyt.dispatchers(deployed))
    tokentune.export_deployed(model.train(), tmp_path / "plain")      # default deployment: the threshold rule
    assert all(d.inference == "skip" for d in dyt.dispatchers(tokentune.load_deployed(tmp_path / "plain")))
    model.eval()
    dyt.calibrate_capacity(model, x)
    tokentune.export_deployed(model, tmp_path / "cap")
    loaded = tokentune.load_deployed(tmp_path / "cap")
    assert [d.capacity_tokens for d in dyt.dispatchers(loaded)] == [d.capacity_tokens for d in dyt.dispatchers(model)]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)
    options, notes = tokentune.tools.export.trace_options(loaded)
    assert options == {} and notes == []                             # traced as it is: with the speed-up


def test_errors_are_one_line():
    model = _model("mlp")
    with pytest.raises(TokenTuneError, match="needs dyt_capacity") as e:
        tokentune.deploy(model, dyt_execution="capacity")
    _one_line(e)
    with pytest.raises(TokenTuneError, match="unknown deploy option 'dyt_capasity'.*dyt_capacity") as e:
        tokentune.deploy(model, dyt_capasity=1.0)
    _one_line(e)
    with pytest.raises(TokenTuneError, match="one token count >= 0 per dispatcher: this model has 4") as e:
        tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=[3, 3])
    _one_line(e)
    with pytest.raises(TokenTuneError, match="capacity factor must be > 0"):
        tokentune.deploy(model, dyt_capacity=0.0)
    with pytest.raises(TokenTuneError, match="unknown dyt_execution 'fast'"):
        tokentune.deploy(model, dyt_execution="fast")
    with pytest.raises(TokenTuneError, match="needs dyt_capacity"):
        _model("mlp", dyt_inference="capacity")
    with pytest.raises(TokenTuneError, match="needs a capacity"):
        model(torch.randn(1, 3, 32, 32), dyt_execution="capacity")
    with pytest.raises(TokenTuneError, match="its methods take none"):
        tokentune.deploy(tokentune.create_model("vit_tiny_patch16_224", method="lora", **tiny()), dyt_capacity=1.0)


def test_built_with_capacity_trains_with_the_gate():
    """dyt_inference='capacity' changes inference only: training is DyT's straight-through mask."""
    model = _model("mlp", dyt_inference="capacity", dyt_capacity=1.0).train()
    x = torch.randn(2, 3, 32, 32)
    logits, state = model(x, return_state=True)
    assert all(r.mask.requires_grad for r in dyt.dispatch_records(state))
    logits.sum().backward()
    assert model.blocks[0].mlp_dispatcher.linear.weight.grad is not None
    with torch.no_grad():
        y, state = model.eval()(x, return_state=True)
    assert all(int(r.patch_mask().sum(1).max()) <= 8 for r in dyt.dispatch_records(state))


@pytest.mark.slow
def test_onnx_capacity_export_keeps_the_speed_up(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from tokentune.tools.onnx import export_onnx

    model = _model("mlp")
    x = torch.randn(3, 3, 32, 32)
    dyt.calibrate_activation(model, x, 0.5)
    deployed = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=1.0)
    path = export_onnx(deployed, tmp_path / "m.onnx", verify=False, dyt_mask_form=False)   # no mask form needed
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "TopK" in ops and "NonZero" not in ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b in (1, 3, 4):
        y = torch.randn(b, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {"images": y.numpy()})[0])
        with torch.no_grad():
            assert torch.allclose(got, deployed(y), atol=1e-4, rtol=0), b


@pytest.mark.parametrize("variant", ["mlp", "layer"])
def test_one_image_equals_the_same_image_in_a_batch(variant):
    """At batch 1 the gathered rows are the token positions themselves (no batch offsets)."""
    _, deployed, x = _deployed_capacity(variant)
    with torch.no_grad():
        full = deployed(x)
        for i in range(x.shape[0]):
            assert torch.allclose(deployed(x[i:i + 1])[0], full[i], atol=1e-5, rtol=0)
