"""``tokentune export``: write the deployed model of a run (one safetensors file + config; optional ONNX)."""
from __future__ import annotations

import argparse
import os

from ..errors import TokenTuneError
from ..tools.export import (
    DEPLOYED_CONFIG,
    DEPLOYED_WEIGHTS,
    EXPORT_DTYPES,
    example_images,
    export_deployed,
    export_format,
    is_export,
    load_deployed,
    read_deployed_config,
    trace_options,
)
from ..tools.hub import hub_repo_id, push_to_hub
from ..tools.onnx import CALIBRATION_METHODS, ONNX_QUANTIZE, calibration_images, check_onnx, export_onnx, quantize_onnx
from .options import parse_pretrained

HELP = "write the deployed model of a run (one safetensors file + config; optional ONNX)"
DESCRIPTION = ("Deploy a run (LoRA merged, method deploy hooks applied) and write OUT/deployed.safetensors with every "
               "tensor plus OUT/deployed.json; tokentune.load_deployed(OUT) rebuilds it with torch, timm and tokentune "
               "only. --onnx also writes OUT/model.onnx.")


def add(parser: argparse.ArgumentParser) -> None:
    """Options of ``tokentune export RUN_DIR OUT [--onnx]``."""
    parser.add_argument("run", metavar="RUN_DIR",
                        help="a run directory written by 'tokentune train' (or save_trained); with --onnx also an "
                             "export directory")
    parser.add_argument("out", metavar="OUT", help="export directory to write (deployed.safetensors, deployed.json)")
    parser.add_argument("--pretrained", type=parse_pretrained, default=None, metavar="hub|PATH",
                        help="where the frozen backbone weights come from [default: as recorded in the run]")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="store floating tensors in this precision [default: as trained, usually float32]")
    parser.add_argument("--verify", action="store_true",
                        help="reload the written export and check it reproduces the deployed model's outputs")
    parser.add_argument("--format", default="deployed", metavar="NAME",
                        help="'deployed' (the deployed model, as above) or a format a method of the run offers: 'peft' "
                             "writes a LoRA run's adapter_config.json + adapter_model.safetensors for peft "
                             "[default: deployed]")
    parser.add_argument("--push-to-hub", metavar="OWNER/REPO", default=None,
                        help="then upload OUT to this Hugging Face hub repository (needs a login: huggingface-cli login)")
    parser.add_argument("--deploy", action="append", default=[], metavar="KEY=VALUE",
                        help="a deployment option, repeatable: dyt_execution=capacity with dyt_capacity=1.25 (a capacity "
                             "factor) or per-dispatcher token counts (32,30,...) gives DyT static shapes, so --onnx "
                             "keeps its speed-up")
    g = parser.add_argument_group("ONNX (needs pip install 'tokentune[onnx]')")
    g.add_argument("--onnx", action="store_true", help="also write OUT/model.onnx (checked with onnxruntime when installed)")
    g.add_argument("--onnx-file", default="model.onnx", metavar="NAME", help="ONNX file name inside OUT [default: model.onnx]")
    g.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset [default: the exporter's]")
    g.add_argument("--static-batch", action="store_true",
                   help="fix the batch size in the graph (default: any batch); faster at that batch, since "
                        "onnxruntime then folds the shape arithmetic of the token-reduction steps")
    g.add_argument("--batch-size", type=int, default=1, metavar="N", help="example batch size traced [default: 1]")
    g.add_argument("--quantize", choices=list(ONNX_QUANTIZE), default=None,
                   help="also write an int8 graph (OUT/<name>.int8.onnx) with onnxruntime's quantization: int8 = dynamic "
                        "(nothing to calibrate), int8-static = static with --calibration images")
    g.add_argument("--calibration", metavar="DIR", default=None,
                   help="images from your data for --quantize (int8-static: activation ranges; both: the reported "
                        "difference from the fp32 model)")
    g.add_argument("--calibration-images", type=int, default=64, metavar="N",
                   help="at most N images of --calibration [default: 64]")
    g.add_argument("--calibration-method", default=None, metavar="{" + ",".join(CALIBRATION_METHODS) + "}",
                   help="int8-static: how activation ranges are taken from the --calibration images (onnxruntime's "
                        f"calibration methods) [default: {CALIBRATION_METHODS[0]}]")


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _deploy_options(items):
    """``["dyt_execution=capacity", "dyt_capacity=1.25"]`` -> a dict of text values (typed by the deploy hooks)."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise TokenTuneError(f"--deploy expects KEY=VALUE (e.g. dyt_execution=capacity), got {item!r}")
        options[key.strip()] = value.strip()
    return options


def run(args: argparse.Namespace) -> int:
    """``tokentune export``: write the deployed model (and optionally its ONNX graph)."""
    source = os.fspath(args.run)
    if args.quantize and not args.onnx:
        raise TokenTuneError("--quantize quantizes the ONNX graph: add --onnx")
    if args.calibration_method is not None and args.quantize != "int8-static":
        raise TokenTuneError("--calibration-method sets int8-static's activation ranges: add --onnx --quantize int8-static")
    if args.calibration_method is not None and args.calibration_method.lower() not in CALIBRATION_METHODS:
        raise TokenTuneError(f"--calibration-method {args.calibration_method!r} is unknown; choose "
                             f"{', '.join(CALIBRATION_METHODS)}")
    if args.push_to_hub:
        hub_repo_id(args.push_to_hub)      # before anything is written
    if args.format != "deployed":
        if args.onnx or args.deploy:
            raise TokenTuneError(f"--onnx and --deploy are for the deployed model; leave them out with --format {args.format}")
        export_format(source, args.out, args.format, pretrained=args.pretrained)
        print(f"wrote the {args.format} format of {source} to {args.out}")
        return _push(args)
    if is_export(source):
        if args.deploy:
            raise TokenTuneError(f"{source!r} is already an export, deployed as it was written; pass --deploy when "
                                 "exporting its run directory")
        if not args.onnx:
            raise TokenTuneError(f"{source!r} is already an export; pass --onnx to write its ONNX graph")
        deployed = load_deployed(source)
    else:
        deployed = export_deployed(source, args.out, pretrained=args.pretrained, dtype=args.dtype, verify=args.verify,
                                   deploy_options=_deploy_options(args.deploy))
        config = read_deployed_config(args.out)
        spec = config["spec"]
        weights = os.path.join(args.out, DEPLOYED_WEIGHTS)
        print(f"exported {spec['method']} ({spec['model']}, {spec['num_classes']} classes) to {args.out}: "
              f"{DEPLOYED_WEIGHTS} ({_size(weights)}, {config['num_tensors']} tensors), {DEPLOYED_CONFIG}"
              f"{'; reload verified' if args.verify else ''}")
    if args.onnx:
        path = os.path.join(args.out, args.onnx_file)
        _, notes = trace_options(deployed)
        export_onnx(deployed, path, batch_size=args.batch_size, dynamic_batch=not args.static_batch, opset=args.opset,
                    dyt_mask_form=True if notes else None)
        try:
            import onnxruntime  # noqa: F401
            checked = "outputs checked against PyTorch with onnxruntime"
        except ImportError:
            checked = "not checked (onnxruntime is not installed)"
        print(f"onnx: {path} ({_size(path)}, {'batch ' + str(args.batch_size) if args.static_batch else 'any batch'}); "
              f"{checked}")
        for note in notes:
            print(f"note: {note}")
        if args.quantize:
            _quantize(args, deployed, path)
    return _push(args)


def _quantize(args: argparse.Namespace, deployed, path: str) -> None:
    """The int8 graph beside the fp32 one, and how far its logits are from the fp32 model's."""
    images = calibration_images(deployed, args.calibration, args.calibration_images) if args.calibration else None
    out = os.path.splitext(path)[0] + ".int8.onnx"
    quantize_onnx(path, args.quantize, calibration=images, out=out, calibration_method=args.calibration_method)
    probe = images if images is not None else example_images(deployed, 4, seed=0)
    diff = check_onnx(out, deployed, probe)
    scale = float(deployed(probe).abs().max())
    how = f", {args.calibration_method.lower()} calibration" if args.calibration_method else ""
    print(f"onnx int8 ({args.quantize}{how}): {out} ({_size(out)}); largest logit difference from the fp32 model "
          f"{diff:.4g} (largest logit {scale:.4g}) on {probe.shape[0]} "
          f"{'calibration' if images is not None else 'random'} images")


def _push(args: argparse.Namespace) -> int:
    if args.push_to_hub:
        print(f"pushed {args.out} to hf-hub:{args.push_to_hub}: {push_to_hub(args.out, args.push_to_hub)}")
    return 0
