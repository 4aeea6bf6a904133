"""ONNX export of a deployed model (optional ``onnx`` extra) and its check with onnxruntime.

What exports: every deployed model whose token counts are fixed by its configuration (plain and
LoRA-merged timm ViTs, adapters, ToMe, PYRA, DyT's capacity execution); a method whose deployed
form has data-dependent shapes offers a traceable form through its ``trace_options`` hook (DyT's
threshold rule: the mask form). The graph is the :func:`tokentune.tools.program.export_program`
of the model, converted by PyTorch's ONNX exporter.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..engine.data import build_transform
from ..engine.images import load_image
from ..errors import TokenTuneError
from ..utils import one_line
from .export import PathLike, describe_model, example_images
from .program import export_program, traceable


def _require_onnx():
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TokenTuneError(f"ONNX export needs {' and '.join(missing)}; install them with "
                             "pip install 'tokentune[onnx]'")


def export_onnx(model: Union[nn.Module, PathLike], path: PathLike,
                image_size: Union[int, Tuple[int, int], None] = None, batch_size: int = 1, *,
                dynamic_batch: bool = True, opset: Optional[int] = None, verify: Optional[bool] = None,
                atol: float = 1e-4, dyt_mask_form: Optional[bool] = None) -> str:
    """Export a deployed model to ONNX (one self-contained ``.onnx`` file, weights inside).

    What exports: every deployed model whose token counts are fixed by its configuration: plain
    and LoRA-merged timm ViTs, adapters, ToMe (``lora+tome``, ``adapter+tome``, ``full+tome``)
    and PYRA, whose merge schedules fix the token count of every block, so the graph has static
    shapes apart from the batch. Matching (argsort, gather), the row merges (index_select,
    index_add) and proportional attention become ordinary ONNX operators.

    DyT: deployed with ``dyt_execution="capacity"`` (a fixed number of tokens per image and
    dispatcher) it exports as it is, with its savings inside the graph. Its default threshold rule
    skips inactive tokens with data-dependent shapes (how many tokens a batch keeps decides the
    gathered sizes), which the exporter cannot trace; such models are exported in their *mask
    form* instead (``dyt_execution="mask"``: every token goes through the skippable computation
    and its update is multiplied by the 0/1 mask), which gives the same outputs but none of DyT's
    savings inside the ONNX graph. Pass ``dyt_mask_form=False`` to get an error instead; ``True``
    to accept it without a warning.

    Args:
        model: a deployed model, a tokentune model (deployed here), an export directory
            (:func:`export_deployed`) or a training run directory.
        path: the ``.onnx`` file to write (atomically).
        image_size: input height/width (default: the size the model was built for; ToMe
            schedules and position embeddings are fixed to it).
        batch_size: batch of the example input; with ``dynamic_batch`` the graph accepts any batch
            (a batch of 2 is traced when 1 is asked, since a traced size 1 is specialised).
        dynamic_batch: make the batch dimension symbolic.
        opset: ONNX opset (default: the exporter's).
        verify: compare onnxruntime's outputs with PyTorch's on random inputs and raise above
            ``atol`` (default: when onnxruntime is installed).
        atol: tolerance of that check.
        dyt_mask_form: accept the traceable form a method asks for (its ``trace_options`` hook;
            DyT: the mask form): None: yes, with a warning; True: yes, silently; False: raise.

    Returns:
        ``path``.
    """
    deployed, _ = traceable(model, dyt_mask_form)
    _require_onnx()
    path = os.fspath(path)
    traced_batch = max(int(batch_size), 2) if dynamic_batch else int(batch_size)
    exported = export_program(deployed, None, image_size, batch_size, dynamic_batch=dynamic_batch, verify=False,
                              dyt_mask_form=True)
    kwargs = dict(input_names=["images"], output_names=["logits"], dynamo=True, external_data=False, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    try:
        with torch.no_grad():
            program = torch.onnx.export(exported, (example_images(deployed, traced_batch, image_size, seed=0),), **kwargs)
    except Exception as exc:  # noqa: BLE001 - exporter failures become one line naming the cause
        raise TokenTuneError(f"ONNX export of this {describe_model(deployed)} failed: {one_line(exc, 240)}") from exc
    _save_onnx(program, path)
    if verify is None:
        try:
            import onnxruntime  # noqa: F401
            verify = True
        except ImportError:
            verify = False
    if verify:
        batches = sorted({1, int(batch_size), traced_batch + 1}) if dynamic_batch else [int(batch_size)]
        for b in batches:
            diff = check_onnx(path, deployed, example_images(deployed, b, image_size, seed=b))
            if not diff <= atol:
                raise TokenTuneError(f"the ONNX graph differs from PyTorch by {diff:.3g} (> {atol:g}) at batch {b}; "
                                     "please report this with the model's method spec")
    return path


def _save_onnx(program, path: str) -> None:
    """Save an ONNX program atomically; graphs over protobuf's 2 GB limit keep their weights in
    ``<path>.data`` beside it (written first, so the graph never points to a missing file)."""
    import shutil
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=".tmp-onnx-", dir=directory)
    try:
        tmp = os.path.join(tmpdir, os.path.basename(path))
        program.save(tmp)                  # the exporter moves weights out itself above 2 GB
        names = sorted(os.listdir(tmpdir), key=lambda n: n == os.path.basename(path))   # the graph last
        for name in names:
            os.replace(os.path.join(tmpdir, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@torch.no_grad()
def check_onnx(path: PathLike, model: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on ``images``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise TokenTuneError("checking an ONNX graph needs onnxruntime; pip install 'tokentune[onnx]'") from exc
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.detach().cpu().float().numpy()})[0]
    want = model.eval()(images).float().cpu().numpy()
    return float(abs(got - want).max())


# ----------------------------------------------------------------------------- int8 graphs (onnxruntime)
ONNX_QUANTIZE = ("int8", "int8-static")
#: int8-static's activation-range rules -> onnxruntime's ``CalibrationMethod`` members; the first is the default
_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CALIBRATION_METHODS = tuple(_CALIBRATION)
QUANTIZED_OPS = ["MatMul", "Gemm"]
#: entropy calibration's histogram: 2048 bins, thresholds searched with 128 quantized bins (TensorRT's
#: 8-bit calibration, which onnxruntime's entropy method follows); ``quantize_static`` itself builds
#: 128 bins and 128 quantized bins, which leaves one candidate (the whole range: the same as minmax)
ENTROPY_BINS = {"num_bins": 2048, "num_quantized_bins": 128}


class _Calibration:
    """onnxruntime's calibration reader over a batch of preprocessed images, one image at a time."""

    def __init__(self, input_name: str, images: torch.Tensor) -> None:
        self._items = iter([{input_name: images[i:i + 1].float().cpu().numpy()} for i in range(images.shape[0])])

    def get_next(self):
        return next(self._items, None)


def quantize_onnx(path: PathLike, mode: str = "int8", calibration: Optional[torch.Tensor] = None,
                  out: Optional[PathLike] = None, calibration_method: Optional[str] = None,
                  reduce_range: bool = True) -> str:
    """An int8 version of the ONNX graph at ``path`` (written to ``out``, default: in place, atomically).

    ``"int8"``: dynamic quantization (onnxruntime's ``quantize_dynamic``): int8 weights per output
    channel, activations quantized per batch at run time, nothing to calibrate. ``"int8-static"``:
    static QDQ quantization (``quantize_static``) with activation ranges measured on ``calibration``
    (preprocessed images ``[N, 3, H, W]`` from your data; a few dozen suffice). Both quantize only
    the products with a weight (onnxruntime's default in dynamic mode; in static mode the other
    ``MatMul`` nodes are excluded by name): attention's ``q k^T`` and ``softmax v``, ToMe's matching
    similarities and the other activation-by-activation products stay in fp32 with softmax,
    LayerNorm and the token-reduction steps, so no merge is decided on 8-bit similarities.

    ``reduce_range`` (default on): weights in 7 bits (-64..64), onnxruntime's advice for x86 CPUs
    without VNNI: their u8 x s8 kernel (``vpmaddubsw``) adds two products into int16, which
    saturates for 8-bit weights (255 x 127 x 2 > 32767) and gave the demo's DyT row 4.2% changed
    predictions (1.6% with 7-bit weights; BENCHMARKS.md). The same instruction runs either way.

    ``calibration_method`` (``"int8-static"`` only): how the activation ranges are taken from the
    calibration images, onnxruntime's ``CalibrationMethod``: ``"minmax"`` (default: the observed
    extremes), ``"entropy"`` (the range whose 8-bit histogram is closest, in KL divergence, to the
    observed one; :data:`ENTROPY_BINS`) or ``"percentile"`` (symmetric, at the 99.999th percentile of
    the absolute values).
    """
    if mode not in ONNX_QUANTIZE:
        raise TokenTuneError(f"ONNX quantization {mode!r} is not supported; choose {' or '.join(ONNX_QUANTIZE)}")
    method = _calibration_method(mode, calibration_method)
    try:
        import onnxruntime as ort
        from onnxruntime import quantization as q
    except ImportError as exc:
        raise TokenTuneError("quantizing an ONNX graph needs onnxruntime; pip install 'tokentune[onnx]'") from exc
    if mode == "int8-static" and (calibration is None or calibration.shape[0] == 0):
        raise TokenTuneError("int8-static quantization needs calibration images from your data (--calibration DIR)")
    src = os.fspath(path)
    dst = os.fspath(out) if out is not None else src
    tmp = dst + ".int8-tmp.onnx"
    prepared = dst + ".pre-tmp.onnx"
    try:
        q.quant_pre_process(src, prepared, skip_symbolic_shape=True)
        if mode == "int8":
            q.quantize_dynamic(prepared, tmp, weight_type=q.QuantType.QInt8, per_channel=True,
                               reduce_range=bool(reduce_range), op_types_to_quantize=QUANTIZED_OPS)
        else:
            name = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).get_inputs()[0].name
            excluded = _activation_products(prepared)
            cache = _entropy_ranges(prepared, _Calibration(name, calibration)) if method == "Entropy" else None
            q.quantize_static(prepared, tmp, _Calibration(name, calibration), quant_format=q.QuantFormat.QDQ,
                              calibrate_method=getattr(q.CalibrationMethod, method), per_channel=True,
                              reduce_range=bool(reduce_range),
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded,
                              calibration_cache_path=cache)
            _read_unrounded(tmp, excluded)
        os.replace(tmp, dst)
    except TokenTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's failures become one line naming the cause
        raise TokenTuneError(f"int8 quantization of {src} failed: {one_line(exc, 240)}") from exc
    finally:
        for leftover in (tmp, prepared, prepared + ".ranges.json"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return dst


def _entropy_ranges(prepared: str, reader: _Calibration) -> str:
    """Entropy-calibrated activation ranges of the graph at ``prepared`` with :data:`ENTROPY_BINS`, written
    as onnxruntime's calibration cache (a JSON file beside it) for ``quantize_static`` to read."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = prepared + ".ranges.json"
    with tempfile.TemporaryDirectory(prefix="tokentune-calibration-") as tmp:
        calibrator = q.create_calibrator(prepared, QUANTIZED_OPS, augmented_model_path=os.path.join(tmp, "aug.onnx"),
                                         calibrate_method=q.CalibrationMethod.Entropy, extra_options=ENTROPY_BINS)
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _calibration_method(mode: str, method: Optional[str]) -> str:
    """onnxruntime's ``CalibrationMethod`` member for ``method`` (None: the default), checked."""
    if method is None:
        return _CALIBRATION[CALIBRATION_METHODS[0]]
    if mode != "int8-static":
        raise TokenTuneError(f"calibration method {method!r} is for int8-static quantization only; leave it out with "
                             f"{mode!r} (dynamic: nothing is calibrated)")
    if str(method).lower() not in _CALIBRATION:
        raise TokenTuneError(f"unknown calibration method {method!r}; choose {', '.join(CALIBRATION_METHODS)}")
    return _CALIBRATION[str(method).lower()]


def _read_unrounded(path: str, names: Sequence[str]) -> None:
    """Let the excluded nodes at ``path`` read their activations unrounded.

    The QDQ quantizer quantizes a tensor once for all its consumers, so an excluded product whose
    activation also feeds a quantized node (PYRA's modulator: its LayerNorm output) reads it through
    the shared ``QuantizeLinear -> DequantizeLinear`` pair, rounded to 8 bits; rewire it to the
    original tensor and drop the pairs nothing reads any more.
    """
    import onnx

    model = onnx.load(path)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.name not in names:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            qn = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if qn is not None and qn.op_type == "QuantizeLinear" and qn.input[0] not in weights:
                node.input[k] = qn.input[0]
    while True:                                     # Q/DQ nodes left without a reader
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    onnx.save(model, path)


def _activation_products(path: str) -> list:
    """Names of the ``MatMul`` nodes of the graph at ``path`` whose second factor is not a weight."""
    import onnx

    graph = onnx.load(path).graph
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def calibration_images(model: nn.Module, directory: PathLike, limit: int = 64) -> torch.Tensor:
    """Up to ``limit`` images found under ``directory`` (sorted by path), preprocessed as ``model`` expects."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TokenTuneError(f"calibration folder {directory!r} does not exist; pass a folder of images from your data")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise TokenTuneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}; pass a folder of images from "
                             "your data")
    transform = build_transform(model)
    return torch.stack([transform(load_image(f)) for f in files[:limit]])
