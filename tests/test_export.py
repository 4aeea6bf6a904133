"""Deployment export: export -> load equals the trained model; clear errors; ONNX when installed."""
import json
import os

import pytest
import timm
import torch
from conftest import tiny
from safetensors.torch import load_file, save_file

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.tome import schedule_of
from tokentune.tools.export import (
    DEPLOYED_CONFIG,
    DEPLOYED_WEIGHTS,
    GUARD_TENSOR,
    TIMM_CONFIG,
    export_deployed,
    load_deployed,
    read_deployed_config,
)

# options that make each method act on the tiny model (4 blocks, 17 tokens)
METHOD_OPTIONS = {
    "tome": dict(tome_r=[3, 2, 2, 1]),
    "pyra": dict(tome_r=[3, 2, 2, 1]),
    "diffrate": dict(diffrate_prune_kept=[17, 15, 11, 8], diffrate_merge_kept=[17, 13, 9, 5]),
    "fpet": dict(fpet_r_layer=2),
}


def _options(spec):
    opts = {}
    for name in spec.split("+"):
        opts.update(METHOD_OPTIONS.get(name, {}))
    if "evit" in spec.split("+"):           # PYRA modulates EViT's fused token there: no merge schedule
        opts.pop("tome_r", None)
    return opts


def _cases():
    """(id, method spec, options): the core combinations, every registered method, method variants."""
    cases = [(s, s, {}) for s in ("lora+tome", "adapter+tome", "full+tome")]
    methods = tokentune.available_methods()
    cases += [(name, name, {}) for name in methods if name not in [c[0] for c in cases]]
    if "pyra" in methods:
        from tokentune.methods.pyra import VARIANTS
        cases += [(f"pyra-{v}", "pyra", dict(pyra_variant=v)) for v in VARIANTS if v != "pyra"]
        cases += [("adapter+pyra", "adapter+pyra", {}), ("pyra-targets", "pyra", dict(pyra_modulate_targets=True))]
    if "vpt" in methods:
        cases += [("vpt-deep", "vpt", dict(vpt_deep=True)), ("vpt+pyra", "vpt+pyra", {})]
    if "evit" in methods:
        cases += [("evit+pyra", "evit+pyra", {})]
    if "fpet" in methods:
        cases += [("adapter-1bit+fpet", "adapter+fpet", dict(adapter_bits=1, adapter_bias=False)), ("lora+fpet", "lora+fpet", {})]
    if "dyt" in methods:
        from tokentune.methods.dyt import VARIANTS as DYT_VARIANTS
        cases += [(f"dyt-{v}", "dyt", dict(dyt_variant=v)) for v in DYT_VARIANTS if v != "mlp"]
        cases += [("dyt-moe", "dyt", dict(dyt_experts=3)), ("dyt+tome", "dyt+tome", {})]
        # the static-shape execution: a fixed number of tokens per image and dispatcher
        capacity = dict(dyt_inference="capacity", dyt_capacity=1.0)
        cases += [(f"dyt-{v}-capacity", "dyt", dict(capacity, dyt_variant=v)) for v in DYT_VARIANTS]
        cases += [("dyt+tome-capacity", "dyt+tome", dict(capacity))]
    return cases


def _capacity(case_id):
    return case_id.endswith("-capacity")


CASES = _cases()
CASE_IDS = [c[0] for c in CASES]


def _specs():
    return CASE_IDS


def _case(case_id):
    return next((spec, opts) for cid, spec, opts in CASES if cid == case_id)


def _trained(case_id, seed=0, **kw):
    """A model built for a case whose trainable parameters moved away from their init."""
    spec, opts = _case(case_id) if case_id in CASE_IDS else (case_id, {})
    torch.manual_seed(seed)
    model = tokentune.create_model("vit_tiny_patch16_224", method=spec, num_classes=5, **_options(spec), **opts,
                                   **tiny(**kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("spec", _specs())
def test_round_trip_equals_trained_model(spec, tmp_path):
    model = _trained(spec)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    deployed = export_deployed(model, tmp_path)
    loaded = load_deployed(tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        got = loaded(x)
        assert torch.equal(got, deployed(x))           # the same deployed computation, bit for bit
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert type(loaded) is type(deployed)
    if "dyt" in spec:                 # dispatchers really skip part of the tokens in the loaded model
        from tokentune.methods import dyt
        with torch.no_grad():
            _, state = loaded(x, return_state=True)
        assert 0.1 < float(dyt.activation_rate(state)) < 0.9
        execution = "capacity" if _capacity(spec) else "skip"
        assert all(d.inference == execution for d in dyt.dispatchers(loaded))
    # every tensor of the deployed model is in the one file, nothing else but the guard of a non-timm export
    stored = load_file(str(tmp_path / DEPLOYED_WEIGHTS))
    names = {n for n, _ in deployed.named_parameters()} | {n for n, _ in deployed.named_buffers()}
    plain = type(deployed) is timm.models.vision_transformer.VisionTransformer
    assert set(stored) == names | (set() if plain else {GUARD_TENSOR})
    assert not any("lora_" in n for n in stored)
    assert sorted(os.listdir(tmp_path)) == [TIMM_CONFIG, DEPLOYED_CONFIG, DEPLOYED_WEIGHTS]
    # the model passed in is left as it was
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_plain_lora_loads_as_plain_timm_model(tmp_path):
    model = _trained("lora")
    export_deployed(model, tmp_path)
    config = read_deployed_config(tmp_path)
    assert config["plain_timm"] and config["spec"]["method"] == "lora"
    assert config["format_version"] == 1 and config["versions"]["timm"] == timm.__version__
    loaded = load_deployed(tmp_path)
    assert type(loaded) is timm.models.vision_transformer.VisionTransformer
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_tome_export_keeps_schedule_and_state(tmp_path):
    model = _trained("lora+tome", tome_trace_source=True)
    export_deployed(model, tmp_path)
    loaded = load_deployed(tmp_path)
    assert schedule_of(loaded) == [3, 2, 2, 1] and read_deployed_config(tmp_path)["method_state"]["tome"] == [3, 2, 2, 1]
    _, state = loaded(torch.randn(1, 3, 32, 32), return_state=True)
    assert state.source.shape == (1, 17 - 8, 17)


def test_already_deployed_model_exports_as_is(tmp_path):
    model = _trained("adapter+tome")
    deployed = tokentune.deploy(model)
    assert export_deployed(deployed, tmp_path) is deployed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_deployed(tmp_path)(x), deployed(x))


def test_wrapped_models_export_their_module(tmp_path):
    model = _trained("lora+tome")
    export_deployed(torch.compile(model), tmp_path / "compiled")       # unwrapped, never compiled here
    export_deployed(_Wrapper(model), tmp_path / "wrapped")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name in ("compiled", "wrapped"):
            assert torch.allclose(load_deployed(tmp_path / name)(x), model(x), atol=1e-5)


class _Wrapper(torch.nn.Module):
    """Stands for DistributedDataParallel/DataParallel: the model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_export_from_run_directory_with_pretrained_override(tmp_path):
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, **tiny())
    weights = tmp_path / "backbone.safetensors"
    save_file(backbone.state_dict(), str(weights))
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=5, tome_r=[3, 2],
                                   pretrained=str(weights), **tiny())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    run = tmp_path / "run"
    tokentune.save_trained(model, str(run))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    export_deployed(run, tmp_path / "out", verify=True)
    with torch.no_grad():
        assert torch.allclose(load_deployed(tmp_path / "out")(x), want, atol=1e-5)
    # the recorded backbone file moved: point to its new place
    moved = tmp_path / "moved.safetensors"
    os.replace(weights, moved)
    with pytest.raises(TokenTuneError, match="backbone.safetensors.*pass pretrained=PATH"):
        export_deployed(run, tmp_path / "out2")
    export_deployed(run, tmp_path / "out2", pretrained=str(moved))
    with torch.no_grad():
        assert torch.allclose(load_deployed(tmp_path / "out2")(x), want, atol=1e-5)
    # exporting into the run directory itself overwrites none of its files
    export_deployed(run, run, pretrained=str(moved))
    assert set(load_file(str(run / "model.safetensors"))) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_preprocessing_is_recorded_and_restored(tmp_path):
    from tokentune.engine.data import build_transform

    model = _trained("lora+tome")
    export_deployed(model, tmp_path / "a")
    prep = read_deployed_config(tmp_path / "a")["preprocessing"]
    assert prep == {"image_size": [32, 32], "crop": False, "interpolation": "bicubic", "normalization": "auto",
                    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    # a run trained with ImageNet statistics: its export and the loaded model say so
    tokentune.save_trained(model, str(tmp_path / "run"), extra={"train_config": {"normalization": "imagenet",
                                                                                 "interpolation": "bilinear"}})
    export_deployed(tmp_path / "run", tmp_path / "b")
    prep = read_deployed_config(tmp_path / "b")["preprocessing"]
    assert prep["normalization"] == "imagenet" and prep["mean"] == pytest.approx([0.485, 0.456, 0.406])
    loaded = load_deployed(tmp_path / "b")
    assert loaded.pretrained_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.pretrained_cfg["interpolation"] == "bilinear"
    normalize = build_transform(loaded).transforms[-1]
    assert tuple(normalize.mean) == pytest.approx((0.485, 0.456, 0.406))


def test_half_precision_export(tmp_path):
    model = _trained("lora+tome")
    export_deployed(model, tmp_path, dtype="bfloat16")
    stored = load_file(str(tmp_path / DEPLOYED_WEIGHTS))
    assert {t.dtype for k, t in stored.items() if k != GUARD_TENSOR} == {torch.bfloat16}
    assert (tmp_path / DEPLOYED_WEIGHTS).stat().st_size < 0.6 * sum(p.numel() * 4 for p in model.parameters())
    loaded = load_deployed(tmp_path)
    assert loaded.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.float()(x), model(x), atol=0.1)
    with pytest.raises(TokenTuneError, match="unknown export dtype 'fp8'"):
        export_deployed(model, tmp_path, dtype="fp8")


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(TokenTuneError, match="does not exist") as e:
        load_deployed(tmp_path / "nowhere")
    _one_line(e)
    with pytest.raises(TokenTuneError, match="has no deployed.json") as e:
        load_deployed(tmp_path)
    _one_line(e)
    model = _trained("lora+tome")
    tokentune.save_trained(model, str(tmp_path / "run"))
    with pytest.raises(TokenTuneError, match="is a training run directory") as e:
        load_deployed(tmp_path / "run")
    _one_line(e)
    out = tmp_path / "out"
    export_deployed(model, out)
    config = json.loads((out / DEPLOYED_CONFIG).read_text())

    def write(cfg):
        (out / DEPLOYED_CONFIG).write_text(json.dumps(cfg))

    write(dict(config, format_version=99))
    with pytest.raises(TokenTuneError, match="format version 99.*upgrade tokentune") as e:
        load_deployed(out)
    _one_line(e)
    write(dict(config, format="something-else"))
    with pytest.raises(TokenTuneError, match="not a tokentune deployed-model config") as e:
        load_deployed(out)
    _one_line(e)
    write(dict(config, spec=dict(config["spec"], num_classes=7)))
    with pytest.raises(TokenTuneError, match=r"'head\.(weight|bias)' has shape \((5|5, 48)\) in the file but "
                                             r"\((7|7, 48)\) in the model") as e:
        load_deployed(out)
    _one_line(e)
    write(dict(config, spec=dict(config["spec"], method="lora+tome+nosuchmethod")))
    with pytest.raises(TokenTuneError, match="cannot rebuild the exported model.*unknown method 'nosuchmethod'") as e:
        load_deployed(out)
    _one_line(e)
    write(config)
    tensors = load_file(str(out / DEPLOYED_WEIGHTS))
    save_file({k: v for k, v in tensors.items() if k != "norm.weight"}, str(out / DEPLOYED_WEIGHTS))
    with pytest.raises(TokenTuneError, match="tensor 'norm.weight' .* is missing from the file") as e:
        load_deployed(out)
    _one_line(e)
    save_file(dict(tensors, extra=torch.zeros(2)), str(out / DEPLOYED_WEIGHTS))
    with pytest.raises(TokenTuneError, match="tensor 'extra' .* has no place") as e:
        load_deployed(out)
    _one_line(e)
    (out / DEPLOYED_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(TokenTuneError, match="cannot read .*deployed.safetensors") as e:
        load_deployed(out)
    _one_line(e)
    save_file(tensors, str(out / DEPLOYED_WEIGHTS))
    data = (out / DEPLOYED_WEIGHTS).read_bytes()
    (out / DEPLOYED_WEIGHTS).write_bytes(data[:len(data) // 2])          # an interrupted copy
    with pytest.raises(TokenTuneError, match=r"deployed\.safetensors: it is not a complete safetensors file .*"
                                             r"re-export the model from its run directory") as e:
        load_deployed(out)
    _one_line(e)
    (out / DEPLOYED_CONFIG).write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(TokenTuneError, match=r"deployed\.json is damaged \(not UTF-8 text\); re-export") as e:
        load_deployed(out)
    _one_line(e)
    write(config)
    os.remove(out / DEPLOYED_WEIGHTS)
    with pytest.raises(TokenTuneError, match="has deployed.json but no deployed.safetensors") as e:
        load_deployed(out)
    _one_line(e)


def test_export_errors_are_one_line(tmp_path):
    plain = tokentune.deploy(_trained("lora"))
    with pytest.raises(TokenTuneError, match="pass the model before deploy") as e:
        export_deployed(plain, tmp_path)
    _one_line(e)
    with pytest.raises(TokenTuneError, match="is not a directory") as e:
        export_deployed(tmp_path / "missing", tmp_path / "out")
    _one_line(e)
    with pytest.raises(TokenTuneError, match="has no config.json") as e:
        export_deployed(tmp_path, tmp_path / "out")
    _one_line(e)


def test_meta_leftovers_fall_back_to_a_real_build(tmp_path, monkeypatch):
    """A method holding a plain tensor attribute cannot be built on the meta device; loading still works."""
    from tokentune.tools import export as export_mod

    model = _trained("lora+tome")
    export_deployed(model, tmp_path)
    built = []
    real_build = export_mod.build_deployed_structure

    def build(config, device="meta"):
        m = real_build(config, device=device)
        m.blocks[0].helper = torch.ones(3, device=device)     # stands for a method's derived tensor
        built.append(str(device))
        return m

    monkeypatch.setattr(export_mod, "build_deployed_structure", build)
    loaded = load_deployed(tmp_path)
    assert built == ["meta", "cpu"] and loaded.blocks[0].helper.device.type == "cpu"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


ONNX_SPECS = [s for s in _specs() if s != "lora+tome"]


def _onnx_round_trip(spec, tmp_path, dynamic_batch=True):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from tokentune.tools.onnx import export_onnx

    model = _trained(spec)
    deployed = tokentune.deploy(model)
    mask_form = False if _capacity(spec) else (True if "dyt" in spec else None)   # capacity: traced as it is
    path = export_onnx(model, tmp_path / "model.onnx", dynamic_batch=dynamic_batch, verify=False,
                       dyt_mask_form=mask_form)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in ([1, 2, 5] if dynamic_batch else [1]):
        x = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            assert torch.allclose(got, deployed(x), atol=1e-4, rtol=0), (spec, batch)
            assert torch.allclose(got, model(x), atol=1e-4, rtol=0), (spec, batch)


# ----------------------------------------------------------------------------- torch.export
def _program_round_trip(spec):
    from tokentune.tools.program import export_program

    model = _trained(spec)
    deployed = tokentune.deploy(model)
    mask_form = False if _capacity(spec) else (True if "dyt" in spec else None)
    program = export_program(model, dyt_mask_form=mask_form, verify=False)
    runner = program.module()
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(runner(x), deployed(x), atol=1e-5, rtol=0), (spec, batch)


@pytest.mark.parametrize("spec", ["lora+tome", "dyt-mlp-capacity"])
def test_torch_export_round_trip(spec):
    _program_round_trip(spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in _specs() if s not in ("lora+tome", "dyt-mlp-capacity")])
def test_torch_export_round_trip_every_method(spec):
    _program_round_trip(spec)


def test_torch_export_saves_and_refuses_clearly(tmp_path):
    from tokentune.tools.program import export_program

    model = _trained("lora+tome")
    program = export_program(model, tmp_path / "m.pt2")             # verify: checked at batches 1, 2 and 3
    loaded = torch.export.load(str(tmp_path / "m.pt2"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module()(x), program.module()(x), atol=1e-6, rtol=0)
    with pytest.raises(TokenTuneError, match="data-dependent shapes.*dyt_execution='capacity'") as e:
        export_program(_trained("dyt"), dyt_mask_form=False)
    _one_line(e)


# ----------------------------------------------------------------------------- ONNX
def test_onnx_round_trip_lora_tome(tmp_path):
    _onnx_round_trip("lora+tome", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ONNX_SPECS)
def test_onnx_round_trip(spec, tmp_path):
    _onnx_round_trip(spec, tmp_path)


def test_onnx_static_batch_graph_has_no_shape_arithmetic_left(tmp_path):
    """Exported for one batch size (``--static-batch``), every shape of ToMe's merge steps and of the attention
    with a size bias is a constant: onnxruntime folds their shape arithmetic, which the any-batch graph runs
    in every block (Shape, Gather, Concat, Range ... nodes; docs/deployment.md), and the graph stays exact."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from tokentune.tools.onnx import export_onnx

    deployed = tokentune.deploy(_trained("lora+tome"))
    path = export_onnx(deployed, tmp_path / "m.onnx", batch_size=1, dynamic_batch=False, verify=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "m.opt.onnx")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert "TopK" in ops and not {"Shape", "Size", "ConstantOfShape", "Range"} & set(ops), sorted(set(ops))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), deployed(x), atol=1e-4)


def test_onnx_dyt_skip_form_is_refused_clearly(tmp_path):
    from tokentune.tools.onnx import export_onnx

    with pytest.raises(TokenTuneError, match="data-dependent shapes.*dyt_mask_form=True") as e:
        export_onnx(_trained("dyt"), tmp_path / "m.onnx", dyt_mask_form=False)
    _one_line(e)


def test_onnx_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from tokentune.tools.onnx import export_onnx

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxscript"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(TokenTuneError, match=r"pip install 'tokentune\[onnx\]'"):
        export_onnx(_trained("lora"), tmp_path / "m.onnx")


@pytest.mark.slow
def test_compiled_load_equals_eager_and_does_not_recompile_for_new_images(tmp_path):
    """ToMe's token counts are fixed by the schedule: new images at the same batch reuse the graph."""
    from torch._dynamo.utils import counters

    model = _trained("lora+tome")
    export_deployed(model, tmp_path)
    eager = load_deployed(tmp_path)
    torch._dynamo.reset()
    compiled = load_deployed(tmp_path, compile=True)
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(4, 3, 32, 32)
            assert torch.allclose(compiled(x), eager(x), atol=1e-5, rtol=0)
            if i == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def _cli(argv):
    from tokentune.cli import main
    return main(["export"] + argv)


def test_export_command(tmp_path, capsys):
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, **tiny())
    save_file(backbone.state_dict(), str(tmp_path / "b.safetensors"))
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=5, tome_r=[3, 2],
                                   pretrained=str(tmp_path / "b.safetensors"), **tiny()).eval()
    tokentune.save_trained(model, str(tmp_path / "run"))
    assert _cli([str(tmp_path / "run"), str(tmp_path / "out"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "exported lora+tome (vit_tiny_patch16_224, 5 classes)" in out and "reload verified" in out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_deployed(tmp_path / "out")(x), model(x), atol=1e-5)
    assert _cli([str(tmp_path / "out"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already an export; pass --onnx" in err and err.count("\n") == 1


def test_export_command_deploy_options(tmp_path, capsys):
    """--deploy KEY=VALUE: typed by the method's deploy hook and recorded, so the export reloads the same way."""
    from tokentune.methods import dyt

    model = _trained("dyt")
    tokentune.save_trained(model, str(tmp_path / "run"))
    argv = [str(tmp_path / "run"), str(tmp_path / "out"), "--deploy", "dyt_execution=capacity", "--deploy",
            "dyt_capacity=5,6,7,8"]
    assert _cli(argv) == 0, capsys.readouterr().err
    loaded = load_deployed(tmp_path / "out")
    assert [d.capacity_tokens for d in dyt.dispatchers(loaded)] == [5, 6, 7, 8]
    assert read_deployed_config(tmp_path / "out")["spec"]["configs"]["dyt"]["inference"] == "capacity"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=[5, 6, 7, 8])(x)
        assert torch.allclose(loaded(x), want, atol=1e-5, rtol=0)
    for bad, message in ((["--deploy", "dyt_capacity=many"], "deploy option dyt_capacity='many'"),
                         (["--deploy", "dyt_speed=2"], "unknown deploy option 'dyt_speed'"),
                         (["--deploy", "dyt_execution"], "--deploy expects KEY=VALUE")):
        assert _cli([str(tmp_path / "run"), str(tmp_path / "bad")] + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["lora+tome", "dyt"])
def test_export_command_onnx(spec, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained(spec)
    export_deployed(model, tmp_path / "exp")
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp"), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "any batch" in out and "checked against PyTorch" in out
    assert ("mask form" in out) == (spec == "dyt")
    session = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x), atol=1e-4)


def test_shared_tensors_are_stored_once_and_stay_shared(tmp_path):
    from tokentune.tools.export import _assign, deployed_tensors

    model = _trained("lora+tome")
    model.head_twin = model.head                      # a module reachable under two names
    tensors = deployed_tensors(tokentune.deploy(model))
    assert "head.weight" in tensors and "head_twin.weight" not in tensors
    with torch.device("meta"):
        rebuilt = tokentune.deploy(tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=5,
                                                          tome_r=[3, 2, 2, 1], **tiny()))
    rebuilt.head_twin = rebuilt.head
    _assign(rebuilt, tensors, "test")
    assert rebuilt.head_twin.weight is rebuilt.head.weight and not rebuilt.head.weight.is_meta


def test_loaded_tensors_own_aligned_memory(tmp_path):
    """Loaded tensors must not be views into the file buffer: a misaligned start sends CPU kernels
    down another path (different summation order), so the loaded model would not compute exactly
    what the exported one does."""
    export_deployed(_trained("pyra"), tmp_path)
    loaded = load_deployed(tmp_path)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
