"""int8 deployment: deploy(quantize="int8-dynamic") for every method, close to the fp32 deployed model."""
import pytest
import torch
from test_export import CASE_IDS, _trained
from torch import nn

import tokentune
from tokentune.core.quantize import quantize_dynamic_int8
from tokentune.errors import TokenTuneError


def _linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


# each registered method once, plus DyT's static-shape execution
SPECS = [c for c in CASE_IDS if c in tokentune.available_methods() or c in ("lora+tome", "dyt-mlp-capacity")]


@pytest.mark.parametrize("spec", SPECS)
def test_int8_dynamic_deploy_is_close_to_fp32(spec):
    model = _trained(spec)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = tokentune.deploy(model)
    int8 = tokentune.deploy(model, quantize="int8-dynamic")
    assert _linears(fp32) and not _linears(int8)            # every Linear layer runs in int8
    with torch.no_grad():
        want, got = fp32(x), int8(x)
    rel = float((got - want).norm() / want.norm())
    # int8 weights (per channel) and inputs (per batch) move the logits of these width-48 random models by
    # 2-8%, up to 17% where a merge decision flips on a quantized metric (DTEM's learned embedding); a
    # wrong scale or zero point moves them by ~100%, a layer left in fp32 is caught above
    assert 0.0 < rel < 0.25, rel


def test_int8_dynamic_weights_have_one_scale_per_output_channel():
    """One scale per output row, as the ONNX route's ``per_channel=True``: a per-tensor scale lets one
    large weight coarsen every row; the per-channel weights reproduce each row's own absmax / 127.5."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    with torch.no_grad():
        layer.weight[0] *= 50                                # one row far larger than the others
    model = _trained("lora")
    int8 = tokentune.deploy(model, quantize="int8-dynamic")
    weights = [m.weight() for m in int8.modules() if hasattr(m, "weight") and callable(m.weight)]
    assert weights and all(w.qscheme() == torch.per_channel_affine for w in weights)
    q = quantize_dynamic_int8(nn.Sequential(layer))[0].weight()
    scales = q.q_per_channel_scales()
    want = layer.weight.detach().abs().amax(dim=1) / 127.5
    torch.testing.assert_close(scales.float(), want, rtol=0.02, atol=0)
    assert scales[0] > 20 * scales[1:].max()                 # the large row does not set the others' step


def test_int8_refuses_what_it_cannot_run():
    model = _trained("lora+tome")
    with pytest.raises(TokenTuneError, match="int8-dynamic"):
        tokentune.deploy(model, quantize="int4")
    with pytest.raises(TokenTuneError, match="CPU fp32"):
        tokentune.deploy(model.to(torch.bfloat16), quantize="int8-dynamic")


# ----------------------------------------------------------------------------- ONNX int8 (onnxruntime)
ONNX_INT8_SPECS = ["lora+tome", "pyra", "dyt-mlp-capacity", "evit", "dynamicvit", "diffrate", "vpt", "lora"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ONNX_INT8_SPECS)
@pytest.mark.parametrize("mode", ["int8", "int8-static"])
def test_onnx_int8_graph_is_close_to_the_fp32_model(spec, mode, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tokentune.tools.onnx import check_onnx, export_onnx, quantize_onnx

    model = _trained(spec)
    deployed = tokentune.deploy(model, **({"dyt_execution": "capacity"} if "capacity" in spec else {}))
    path = export_onnx(deployed, tmp_path / "m.onnx")
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = quantize_onnx(path, mode, calibration=calib, out=tmp_path / "m.int8.onnx")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = float(deployed(x).abs().max())
    diff = check_onnx(out, deployed, x)
    assert 0.0 < diff < 0.5 * scale, (diff, scale)
    assert (tmp_path / "m.int8.onnx").stat().st_size < 0.5 * (tmp_path / "m.onnx").stat().st_size   # int8 weights
    assert _activation_products_in_int8(out) == 0     # q k^T, softmax v and ToMe's similarities stay fp32


def _activation_products_in_int8(path):
    """MatMul/Gemm nodes of an int8 graph whose second input is a quantized activation (not a weight)."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def quantized_activation(name):
        node = producer.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return False
        return node.input[0] not in weights if node.op_type == "DequantizeLinear" else True

    return sum(quantized_activation(n.input[1]) for n in graph.node if n.op_type in ("MatMul", "MatMulInteger", "Gemm"))


def _int8_weight_range(path):
    """The smallest and largest int8 weight value of a quantized graph."""
    import onnx
    from onnx import numpy_helper

    values = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
              if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert values
    return min(int(v.min()) for v in values), max(int(v.max()) for v in values)


def test_dynamic_int8_weights_use_7_bits_unless_asked(tmp_path):
    """reduce_range (default): 7-bit weights, so x86's u8 x s8 kernel without VNNI cannot saturate."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tokentune.tools.onnx import export_onnx, quantize_onnx

    path = export_onnx(tokentune.deploy(_trained("lora")), tmp_path / "m.onnx", verify=False)
    low, high = _int8_weight_range(quantize_onnx(path, "int8", out=tmp_path / "a.onnx"))
    assert -64 <= low and high <= 64 and high - low > 100
    low, high = _int8_weight_range(quantize_onnx(path, "int8", out=tmp_path / "b.onnx", reduce_range=False))
    assert high - low > 200


def test_export_command_writes_an_int8_graph(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_data import write_image
    from test_export import _cli

    from tokentune.tools.export import export_deployed

    export_deployed(_trained("lora+tome"), tmp_path / "exp")
    for i in range(3):
        write_image(str(tmp_path / "calib" / f"{i}.jpg"), value=40 * i, seed=i)
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp"), "--onnx", "--quantize", "int8-static",
                 "--calibration", str(tmp_path / "calib")]) == 0
    out = capsys.readouterr().out
    assert "onnx int8 (int8-static)" in out and "on 3 calibration images" in out
    assert (tmp_path / "exp" / "model.int8.onnx").is_file()
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp2"), "--quantize", "int8"]) == 2
    assert "add --onnx" in capsys.readouterr().err
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp"), "--onnx", "--quantize", "int8-static"]) == 2
    assert "needs calibration images" in capsys.readouterr().err


@pytest.mark.slow
def test_static_calibration_methods_reach_onnxruntime(tmp_path):
    """Each calibration method gives a working int8-static graph, with activation ranges of its own."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx
    from onnx import numpy_helper

    from tokentune.tools.onnx import CALIBRATION_METHODS, check_onnx, export_onnx, quantize_onnx

    deployed = tokentune.deploy(_trained("lora"))
    path = export_onnx(deployed, tmp_path / "m.onnx", verify=False)
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = float(deployed(x).abs().max())
    scales = {}
    for method in CALIBRATION_METHODS:
        out = quantize_onnx(path, "int8-static", calibration=calib, out=tmp_path / f"{method}.onnx",
                            calibration_method=method)
        assert 0.0 < check_onnx(out, deployed, x) < 0.5 * scale, method
        graph = onnx.load(str(out)).graph
        activations = {n.input[1] for n in graph.node if n.op_type == "QuantizeLinear"}
        scales[method] = sorted(float(numpy_helper.to_array(i)) for i in graph.initializer if i.name in activations)
        assert scales[method], method
    assert scales["entropy"] != scales["minmax"] and scales["percentile"] != scales["minmax"]


@pytest.mark.parametrize("mode, method, match", [
    ("int8-static", "kl", r"unknown calibration method 'kl'; choose minmax, entropy, percentile"),
    ("int8", "entropy", r"calibration method 'entropy' is for int8-static quantization only"),
])
def test_bad_calibration_methods_fail_in_one_line(mode, method, match, tmp_path):
    pytest.importorskip("onnxruntime")
    from tokentune.tools.onnx import quantize_onnx

    with pytest.raises(TokenTuneError, match=match) as e:
        quantize_onnx(tmp_path / "m.onnx", mode, calibration=torch.zeros(1, 3, 32, 32), calibration_method=method)
    assert "\n" not in str(e.value)


def test_export_command_calibration_method(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from test_data import write_image
    from test_export import _cli

    from tokentune.tools.export import export_deployed

    export_deployed(_trained("lora"), tmp_path / "exp")
    for i in range(3):
        write_image(str(tmp_path / "calib" / f"{i}.jpg"), value=40 * i, seed=i)
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp"), "--onnx", "--quantize", "int8-static",
                 "--calibration", str(tmp_path / "calib"), "--calibration-method", "entropy"]) == 0
    assert "onnx int8 (int8-static, entropy calibration)" in capsys.readouterr().out
    low, high = _int8_weight_range(tmp_path / "exp" / "model.int8.onnx")
    assert -64 <= low and high <= 64 and high - low > 100          # 7-bit weights (reduce_range), all of it used
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp"), "--onnx", "--quantize", "int8",
                 "--calibration-method", "entropy"]) == 2
    assert "--calibration-method sets int8-static's activation ranges" in capsys.readouterr().err
    assert _cli([str(tmp_path / "exp"), str(tmp_path / "exp"), "--onnx", "--quantize", "int8-static",
                 "--calibration", str(tmp_path / "calib"), "--calibration-method", "kl"]) == 2
    assert "--calibration-method 'kl' is unknown; choose minmax, entropy, percentile" in capsys.readouterr().err
