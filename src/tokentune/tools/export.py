"""Deployment export: one safetensors file with every tensor of the deployed model, plus its recipe.

An *export directory* holds:

* ``deployed.safetensors``: every parameter and buffer of ``tokentune.deploy(model)`` (LoRA merged
  into the weights, the merge schedule and PYRA modulation in place, DyT dispatchers switched to
  real token skipping: whatever :func:`tokentune.deploy` produces), under their module names;
* ``deployed.json``: how to rebuild that structure (timm name, method spec and configs, timm
  keyword arguments, number of classes), the input preprocessing (size, resize filter,
  mean/std, as trained, also as timm's ``pretrained_cfg``), the export format version and the
  library versions it was written with;
* ``config.json``: timm's model config (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``), so timm's own tools see the training transform:
  ``timm.data.resolve_model_data_config`` gives ``crop_pct=1.0``, ``crop_mode="squash"`` (a resize
  to the input size, no crop), the resize filter and mean/std. A plain timm export (``lora``,
  ``linear``, ``full``) loads in timm alone: ``timm.create_model("local-dir:DIR", pretrained=True)``
  (or ``"hf-hub:REPO"`` once pushed) gives the same outputs.

**Guard.** An export that needs tokentune's forward (ToMe, PYRA, DyT, adapters) must not load
silently as a plain ViT, which would compute something else (no merging, no skipping). Its
``config.json`` names the architecture :data:`GUARD_ARCHITECTURE`, so timm stops with "Unknown
model (tokentune-deployed ...: load it with tokentune.load_deployed)"; its safetensors file holds
one extra tensor, :data:`GUARD_TENSOR`, so a strict ``load_state_dict`` into a plain ViT (timm's
``pretrained_cfg_overlay=dict(file=...)`` path included) fails naming it; and the file's header
metadata says ``tokentune_plain_timm: false`` and which methods it needs.

:func:`load_deployed` needs only torch, timm and tokentune: it rebuilds the structure with
``create_model(..., pretrained=False)`` on the ``meta`` device (no random initialisation, no
weights downloaded), calls :func:`tokentune.deploy` and assigns the stored tensors, requiring the
names and shapes to match exactly. The weights' names differ from a training run directory's
(``model.safetensors``), and inside a run directory the export leaves out timm's ``config.json``
(the run's stays), so exporting into a run directory overwrites nothing.

:func:`tokentune.tools.onnx.export_onnx` writes an ONNX graph of a deployed model.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from torch import nn

from ..core.backbone import architecture_of
from ..core.deploy import deploy, faster_of_compiled
from ..core.factory import create_model, methods_of, rebuild_options
from ..core.hub import ADAPTER_CONFIG, ADAPTER_WEIGHTS, resolve_location, split_source
from ..core.task import task_head_of
from ..core.vit import info_of, input_size, spec_of
from ..core.weights import load_safetensors
from ..engine.checkpoint import load_trained, read_config
from ..engine.data import normalization_stats
from ..engine.rundir import CONFIG_NAME, DEPLOYED_CONFIG, WEIGHTS_NAME, RunDir
from ..errors import TokenTuneError
from ..fileio import atomic_write, atomic_write_json
from ..utils import jsonable, unwrap_model
from ..version import __version__

DEPLOYED_WEIGHTS = "deployed.safetensors"
TIMM_CONFIG = "config.json"
#: the extra tensor of an export that a plain timm ViT cannot run (uint8 bytes of the method spec)
#: the name of a plain timm export's weights in a hub repository (timm's ``hf-hub:`` loader reads only this name)
HUB_WEIGHTS = "model.safetensors"
#: the files of an export (what is fetched from a hub repository)
EXPORT_FILES = [DEPLOYED_CONFIG, DEPLOYED_WEIGHTS, TIMM_CONFIG, HUB_WEIGHTS]
#: what :func:`open_model` fetches from a hub repository: an export, a run's model, a peft adapter
OPEN_FILES = EXPORT_FILES + [CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG, ADAPTER_WEIGHTS]
GUARD_TENSOR = "tokentune_export.needs_tokentune_load_deployed"
GUARD_ARCHITECTURE = "tokentune-deployed {method}: not a plain timm model, load it with tokentune.load_deployed"
FORMAT = "tokentune-deployed"
FORMAT_VERSION = 1

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PathLike = Union[str, "os.PathLike[str]"]

_REEXPORT = "re-export the model from its run directory (tokentune export RUN_DIR OUT)"


# ----------------------------------------------------------------------------- tensors
def _tensor_slots(model: nn.Module) -> Dict[str, List[Tuple[nn.Module, str, bool]]]:
    """Every parameter and buffer (persistent or not), grouped by identity.

    Returns ``{first qualified name: [(module, attribute, is_parameter), ...]}``: a tensor shared
    by several modules is stored once, under its first name, and assigned to every slot.
    """
    groups: Dict[int, str] = {}
    slots: Dict[str, List[Tuple[nn.Module, str, bool]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{attr}" if prefix else attr
                key = id(tensor)
                if key not in groups:
                    groups[key] = name
                    slots[name] = []
                slots[groups[key]].append((module, attr, is_param))
    return slots


def deployed_tensors(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Every tensor of ``model`` by name, detached, contiguous, on the CPU (floats cast to ``dtype``)."""
    out = {}
    for name, slots in _tensor_slots(model).items():
        module, attr, is_param = slots[0]
        t = (module._parameters if is_param else module._buffers)[attr].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu").contiguous()
    return out


def _assign(model: nn.Module, tensors: Dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Put ``tensors`` into ``model`` by name; the names and shapes must match exactly."""
    slots = _tensor_slots(model)
    unexpected = sorted(set(tensors) - set(slots))
    missing = sorted(set(slots) - set(tensors))
    if unexpected:
        raise TokenTuneError(f"{source} does not fit the rebuilt model: tensor {unexpected[0]!r} (and {len(unexpected) - 1} "
                             f"more) has no place in it{hint}; re-export the model with this version")
    if missing:
        raise TokenTuneError(f"{source} does not fit the rebuilt model: tensor {missing[0]!r} (and {len(missing) - 1} more) "
                             f"is missing from the file{hint}; re-export the model with this version")
    for name, group in slots.items():
        module, attr, is_param = group[0]
        want = tuple((module._parameters if is_param else module._buffers)[attr].shape)
        got = tuple(tensors[name].shape)
        if got != want:
            raise TokenTuneError(f"{source} does not fit the rebuilt model: tensor {name!r} has shape {got} in the file "
                                 f"but {want} in the model built from its config{hint}")
    for name, group in slots.items():
        value = _own_storage(tensors[name])
        if group[0][2]:
            value = nn.Parameter(value, requires_grad=False)   # one object, shared by every slot
        for module, attr, is_param in group:
            (module._parameters if is_param else module._buffers)[attr] = value


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory of its own, allocated by PyTorch.

    safetensors returns views into one buffer holding the whole file, at offsets that are only
    4-byte aligned. CPU kernels (BLAS gemv/gemm, vectorised reductions) treat a misaligned start
    with a separate head loop, which changes the summation order: the loaded model then differs
    from the exported one in the last bits (seen on AMD EPYC for PYRA's small matrix products).
    A fresh allocation is aligned like every tensor of the model that was exported, so both run
    the same kernels on the same values.
    """
    return tensor.clone(memory_format=torch.contiguous_format)


def _meta_leftovers(model: nn.Module) -> List[str]:
    """Names of tensors still on the meta device (plain tensor attributes a method may hold)."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                left.append(f"{prefix}.{attr}" if prefix else attr)
    return left


# ----------------------------------------------------------------------------- export
def _versions() -> Dict[str, str]:

    return {"tokentune": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def preprocessing_of(model: nn.Module, run_config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """How inputs of ``model`` are prepared: resize to ``image_size`` (no crop), ``mean``/``std``.

    From a run's ``config.json`` (its ``train_config``: normalization, interpolation) when given,
    else the defaults of training (``auto`` normalisation = the model's pretrained mean/std, bicubic).
    """

    train_cfg = (run_config or {}).get("train_config") or {}
    normalization = train_cfg.get("normalization") or "auto"
    mean, std = normalization_stats(normalization, model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return {"image_size": [int(v) for v in size] if size is not None else None, "crop": False,
            "interpolation": train_cfg.get("interpolation") or "bicubic", "normalization": normalization,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def timm_data_config(prep: Dict[str, Any]) -> Dict[str, Any]:
    """``prep`` (:func:`preprocessing_of`) as timm's data-config entries of a ``pretrained_cfg``.

    tokentune resizes to the input size without cropping; in timm's terms that is ``crop_pct=1.0``
    with ``crop_mode="squash"`` (resize both sides to ``input_size / crop_pct``, then a centre crop
    of the same size, which keeps everything), so ``timm.data.create_transform(
    **timm.data.resolve_model_data_config(model))`` builds the training transform.
    """
    cfg: Dict[str, Any] = {"mean": tuple(prep["mean"]), "std": tuple(prep["std"]),
                           "interpolation": prep.get("interpolation", "bicubic"), "crop_pct": 1.0, "crop_mode": "squash"}
    if prep.get("image_size"):
        cfg["input_size"] = (3, *prep["image_size"])
    return cfg


def apply_preprocessing(model: nn.Module, prep: Optional[Dict[str, Any]]) -> nn.Module:
    """Record ``prep`` in the model's ``pretrained_cfg`` (see :func:`timm_data_config`), so
    ``tokentune.data.build_transform(model)`` and timm's ``resolve_model_data_config`` give its
    preprocessing."""
    if not prep:
        return model
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for key in ("test_input_size", "test_crop_pct", "test_crop_mode"):   # timm prefers these at test time
        cfg.pop(key, None)
    cfg.update(timm_data_config(prep))
    model.pretrained_cfg = cfg
    return model


def timm_config(deployed: nn.Module, spec: Dict[str, Any], prep: Dict[str, Any], plain: bool) -> Dict[str, Any]:
    """The ``config.json`` timm reads from a folder or hub repository (``local-dir:``/``hf-hub:``).

    Written by timm's own ``save_config_for_hf`` (the model arguments timm recorded when it built
    the backbone), with the training transform as its ``pretrained_cfg`` data config; an export
    that is not a plain timm model names :data:`GUARD_ARCHITECTURE` instead of its architecture.
    """
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, TIMM_CONFIG)
        save_config_for_hf(deployed, path)
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    for key in ("test_input_size", "test_crop_pct", "test_crop_mode", "file", "hf_hub_id", "url", "tag", "source"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(jsonable(timm_data_config(prep)), num_classes=int(spec["num_classes"]))
    config["pretrained_cfg"] = pretrained_cfg
    # timm versions that record no construction arguments: the build's own keywords rebuild the model
    args = dict(jsonable(spec.get("timm_kwargs") or {}), **(config.get("model_args") or {}))
    config["model_args"] = dict(args, num_classes=int(spec["num_classes"]))
    config["num_classes"] = int(spec["num_classes"])
    if not plain:
        config["architecture"] = GUARD_ARCHITECTURE.format(method=spec["method"])
    return config


def self_contained_spec(spec: Dict[str, Any], deployed: nn.Module, timm_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The build spec an export records: a backbone named ``hf-hub:``/``local-dir:`` becomes its timm
    architecture with the construction arguments timm recorded, so the export rebuilds without that
    folder or repository."""
    if split_source(spec["model"])[0] is None:
        return spec
    architecture = architecture_of(spec["model"], deployed)
    args = {k: v for k, v in (timm_cfg.get("model_args") or {}).items() if k != "num_classes"}
    return dict(spec, model=architecture, timm_kwargs=args, source_model=spec["model"])


def is_export(directory: PathLike) -> bool:
    """Whether ``directory`` is an export directory (not a run directory an export was written into)."""
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, DEPLOYED_CONFIG)) and not RunDir(directory).is_run()


def _model_from(source: Union[nn.Module, PathLike], pretrained: Union[bool, str, None]
                ) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """A tokentune model from a model (compiled or DDP-wrapped ones unwrapped) or a training run directory."""
    if isinstance(source, nn.Module):
        return unwrap_model(source), None
    directory = os.fspath(source)
    if not os.path.isdir(directory):
        raise TokenTuneError(f"{directory!r} is not a directory; pass a model or a run directory written by "
                             "tokentune train/save_trained")
    if is_export(directory):
        raise TokenTuneError(f"{directory!r} is already a deployed export; load it with tokentune.load_deployed")
    return load_trained(directory, pretrained=pretrained), read_config(directory)


def _deployed(model: nn.Module, deploy_options: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(deployed model, build spec)`` of a tokentune model (deployed here unless it already is)."""
    info = info_of(model)
    if info is None or info.spec is None:
        raise TokenTuneError(f"cannot export a {type(model).__name__} that tokentune did not build: its build spec is "
                             "gone (deploy() drops it from plain timm models); pass the model before deploy() "
                             "or its run directory")
    if info.deployed and deploy_options:
        raise TokenTuneError("this model is already deployed; pass deployment options to tokentune.deploy, or export "
                             "the model before deploy() with them")
    deployed = model if info.deployed else deploy(model, **(deploy_options or {}))
    return deployed, dict(info_of(deployed).spec if info_of(deployed) is not None else info.spec)


def export_deployed(model_or_run_dir: Union[nn.Module, PathLike], out_dir: PathLike, *,
                    pretrained: Union[bool, str, None] = None, dtype: Optional[str] = None,
                    verify: bool = False, deploy_options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Write the deployed model to ``out_dir`` (``deployed.safetensors`` + ``deployed.json``).

    Args:
        model_or_run_dir: a model built by :func:`tokentune.create_model` (trained or not; it is
            deployed on a copy, the model itself is unchanged), an already deployed tokentune model
            that kept its plug-ins, or a run directory written by :func:`tokentune.save_trained`.
        out_dir: export directory (created; existing export files are replaced atomically).
        pretrained: for a run directory, where the frozen backbone comes from (default: as
            recorded in its ``config.json``); e.g. a local ``.npz`` when the recorded path moved.
        dtype: store floating tensors as ``"float32"``, ``"float16"`` or ``"bfloat16"`` (default:
            as they are). The loaded model then runs in that dtype.
        verify: rebuild the model from the written files and check its outputs equal the deployed
            model's on a random batch (one extra model in memory).
        deploy_options: options of :func:`tokentune.deploy` (``{"dyt_execution": "capacity",
            "dyt_capacity": 1.25}``); recorded in the export, so loading rebuilds the same deployment.

    Returns:
        The deployed model that was written.
    """
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise TokenTuneError(f"unknown export dtype {dtype!r}; choose from {', '.join(EXPORT_DTYPES)}")
    model, run_config = _model_from(model_or_run_dir, pretrained)
    deployed, spec = _deployed(model, deploy_options)
    out_dir = os.fspath(out_dir)
    tensors = deployed_tensors(deployed, EXPORT_DTYPES[dtype] if dtype else None)
    plain = not hasattr(deployed, "timm_class")
    metadata = {"format": "pt", "tokentune": FORMAT, "tokentune_method": spec["method"],
                "tokentune_plain_timm": "true" if plain else "false"}
    if not plain:
        tensors[GUARD_TENSOR] = torch.tensor(list(spec["method"].encode()), dtype=torch.uint8)
        metadata["tokentune_note"] = (f"needs tokentune.load_deployed: a plain timm ViT loading these tensors would run "
                                      f"without {spec['method']}'s token reduction or plug-ins")
    from safetensors.torch import save_file

    weights = os.path.join(out_dir, DEPLOYED_WEIGHTS)
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    prep = preprocessing_of(deployed, run_config)
    timm_cfg = timm_config(deployed, spec, prep, plain)
    spec = self_contained_spec(spec, deployed, timm_cfg)
    grid = getattr(getattr(deployed, "patch_embed", None), "img_size", None)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "spec": spec,
        "deployed_class": f"{type(deployed).__module__}.{type(deployed).__qualname__}",
        "plain_timm": plain,
        "image_size": list(grid) if grid is not None else None,
        "num_prefix_tokens": int(getattr(deployed, "num_prefix_tokens", 0)),
        "method_state": jsonable(info_of(deployed).state) if info_of(deployed) is not None else {},
        "preprocessing": prep,
        "pretrained_cfg": jsonable(timm_data_config(prep)),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_tensors": len(tensors) - (0 if plain else 1),
        "num_elements": int(sum(t.numel() for t in tensors.values())),
    }
    if not RunDir(out_dir).run_files():      # inside a run directory its own config.json stays
        atomic_write_json(os.path.join(out_dir, TIMM_CONFIG), timm_cfg)
    atomic_write_json(os.path.join(out_dir, DEPLOYED_CONFIG), config)   # written last: marks a complete export
    if verify:
        check_export(deployed, out_dir)
    return deployed


def export_format(model_or_run_dir: Union[nn.Module, PathLike], out_dir: PathLike, fmt: str, *,
                  pretrained: Union[bool, str, None] = None) -> Any:
    """Write a model's trained tensors in another library's format that one of its methods offers
    (``Method.save_formats``: ``"peft"`` for a LoRA, see :func:`tokentune.save_peft`).

    Args:
        model_or_run_dir: a model built by :func:`tokentune.create_model`, or a run directory.
        out_dir: where to write.
        fmt: the format name.
        pretrained: for a run directory, where the frozen backbone comes from (default: as recorded).

    Returns:
        What the method's writer returns (peft: the adapter config).
    """
    model, _ = _model_from(model_or_run_dir, pretrained)
    if spec_of(model) is None:
        raise TokenTuneError(f"cannot write the {fmt!r} format of a model tokentune did not build")
    offered = {name: m for m in methods_of(model) for name in m.save_formats}
    if fmt not in offered:
        raise TokenTuneError(f"the methods of this {spec_of(model)['method']} model offer no {fmt!r} format (offered: "
                             f"{', '.join(sorted(offered)) or 'none'}); peft's format needs a LoRA model")
    return offered[fmt].save_formats[fmt](model, os.fspath(out_dir))


# ----------------------------------------------------------------------------- load
def read_deployed_config(out_dir: PathLike) -> Dict[str, Any]:
    """``deployed.json`` of an export directory, checked for format and version."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise TokenTuneError(f"export directory {out_dir!r} does not exist; write one with tokentune.export_deployed "
                             "or `tokentune export RUN_DIR OUT`")
    path = os.path.join(out_dir, DEPLOYED_CONFIG)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(out_dir, CONFIG_NAME)) and os.path.isfile(os.path.join(out_dir, WEIGHTS_NAME)):
            raise TokenTuneError(f"{out_dir!r} is a training run directory, not an export; export it first with "
                                 "tokentune.export_deployed or `tokentune export RUN_DIR OUT` (or use load_trained)")
        raise TokenTuneError(f"{out_dir!r} has no {DEPLOYED_CONFIG}; pass a directory written by tokentune.export_deployed")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise TokenTuneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {_REEXPORT}") from exc
    except UnicodeDecodeError as exc:
        raise TokenTuneError(f"{path} is damaged (not UTF-8 text); {_REEXPORT}") from exc
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        raise TokenTuneError(f"{path} is not a tokentune deployed-model config (format {found!r}, expected "
                             f"{FORMAT!r}); re-export the model")
    version = config.get("format_version")
    written_by = (config.get("versions") or {}).get("tokentune", "?")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise TokenTuneError(f"{path} has export format version {version!r} (written by tokentune {written_by}) but "
                             f"tokentune {__version__} reads version {FORMAT_VERSION}; upgrade tokentune to load it")
    for key in ("spec",):
        if not isinstance(config.get(key), dict):
            raise TokenTuneError(f"{path} has no {key!r} entry; re-export the model")
    return config


def build_deployed_structure(config: Dict[str, Any], device: Union[str, torch.device, None] = "meta") -> nn.Module:
    """The deployed model's structure from a ``deployed.json`` config, without loading weights.

    Built on ``device`` (``meta``: no memory, no random initialisation).
    """

    spec = config["spec"]
    options = rebuild_options(spec)
    written_by = (config.get("versions") or {}).get("tokentune", "?")
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            # meta tensors draw nothing: any seed builds the structure; the recorded one keeps the spec as exported
            model = create_model(spec["model"], method=spec["method"], num_classes=spec["num_classes"],
                                 pretrained=False, train_head=spec.get("train_head", True),
                                 seed=spec.get("init_seed", 0), **options)
            return deploy(model, inplace=True)
    except TokenTuneError as exc:
        raise TokenTuneError(f"cannot rebuild the exported model (written by tokentune {written_by}): {exc}") from exc
    except KeyError as exc:
        raise TokenTuneError(f"the export config lacks {exc}; re-export the model") from exc


def load_deployed(out_dir: PathLike, device: Union[str, torch.device] = "cpu",
                  compile: Union[bool, str] = False) -> nn.Module:
    """Rebuild a model written by :func:`export_deployed`; its eval outputs equal the trained model's.

    Needs only torch, timm and tokentune: no pretrained weights, no model hub, no training code.

    Args:
        out_dir: the export directory, ``local-dir:DIR`` or a hub repository ``hf-hub:owner/repo``
            that :func:`tokentune.push_to_hub` wrote.
        device: where the tensors are loaded.
        compile: return ``torch.compile(model)`` (the first calls compile; outputs agree with the
            eager model to float rounding, not bit for bit); ``"auto"``: whichever of the compiled and
            the eager model is faster on this machine (see :func:`tokentune.deploy`).

    Returns:
        The deployed model in eval mode with gradients off: a plain timm model when no plug-in is
        left (``lora``), otherwise tokentune's model with its plug-ins.
    """
    out_dir = resolve_location(os.fspath(out_dir), "the export", allow_patterns=EXPORT_FILES)
    config = read_deployed_config(out_dir)
    weights = os.path.join(os.fspath(out_dir), DEPLOYED_WEIGHTS)
    if not os.path.isfile(weights) and config.get("plain_timm"):
        weights = os.path.join(os.fspath(out_dir), HUB_WEIGHTS)      # a plain export as pushed to the hub
    if not os.path.isfile(weights):
        raise TokenTuneError(f"{os.fspath(out_dir)!r} has {DEPLOYED_CONFIG} but no {DEPLOYED_WEIGHTS}; {_REEXPORT}")
    tensors = load_safetensors(weights, _REEXPORT, device=str(device))
    tensors.pop(GUARD_TENSOR, None)
    written_timm = (config.get("versions") or {}).get("timm")
    hint = f" (exported with timm {written_timm}, this is timm {timm.__version__})" \
        if written_timm and written_timm != timm.__version__ else ""
    model = build_deployed_structure(config, device="meta")
    _assign(model, tensors, weights, hint)
    if _meta_leftovers(model):
        # a method keeps tensors outside parameters/buffers: build on a real device instead
        model = build_deployed_structure(config, device=device)
        _assign(model, tensors, weights, hint)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = info_of(model)
    if info is not None:
        info.export = {"dir": os.fspath(out_dir), "config": config}
    apply_preprocessing(model, config.get("preprocessing"))
    if compile == "auto":
        return faster_of_compiled(model)
    return torch.compile(model) if compile else model


@torch.no_grad()
def check_export(deployed: nn.Module, out_dir: PathLike, batch_size: int = 2, atol: float = 1e-5) -> float:
    """Reload ``out_dir`` and compare its outputs with ``deployed`` on a random batch.

    Returns the largest absolute difference; raises :class:`TokenTuneError` above ``atol``.
    """
    loaded = load_deployed(out_dir, device=_device_of(deployed))
    images = example_images(deployed, batch_size, seed=0)
    diff = float((loaded(images).float() - deployed.eval()(images).float()).abs().max())
    if not diff <= atol:
        raise TokenTuneError(f"the reloaded export differs from the deployed model by {diff:.3g} (> {atol:g}); "
                             "please report this with the model's method spec")
    return diff


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def example_images(model: nn.Module, batch_size: int = 1, image_size: Union[int, Tuple[int, int], None] = None,
                   seed: int = 0) -> torch.Tensor:
    """A reproducible random batch at the model's input size, on its device and in its dtype (a task's
    input, e.g. clips, when the model has a task head)."""
    head = task_head_of(model)
    if head is not None and image_size is None:
        p = next(iter(model.parameters()), None)
        inputs = head.example_input(model, batch_size, seed)
        return inputs.to(device=p.device, dtype=p.dtype) if p is not None and p.is_floating_point() else inputs
    if image_size is None:
        h, w = input_size(model)
    elif isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = image_size
    p = next(iter(model.parameters()), None)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, h, w, generator=g)
    if p is not None:
        images = images.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
    return images


# ----------------------------------------------------------------------------- deployed from anything
def as_deployed(model: Union[nn.Module, PathLike], pretrained: Union[bool, str, None] = None) -> nn.Module:
    """A deployed model from a model, an export directory or a run directory."""
    if isinstance(model, nn.Module):
        model = unwrap_model(model)
        info = info_of(model)
        if info is not None and info.spec is not None and not info.deployed:
            return deploy(model)
        return model.eval()
    directory = os.fspath(model)
    if os.path.isfile(os.path.join(directory, DEPLOYED_CONFIG)):
        return load_deployed(directory)
    return _deployed(_model_from(directory, pretrained)[0])[0]


def trace_options(model: nn.Module) -> Tuple[Dict[str, Any], List[str]]:
    """The forward options that make ``model`` traceable, and what they cost: asked of each method
    through its ``trace_options`` hook (e.g. DyT runs in its mask form)."""
    if spec_of(model) is None:
        return {}, []
    options: Dict[str, Any] = {}
    notes: List[str] = []
    for method in methods_of(model):
        if method.trace_options is not None:
            more, note = method.trace_options(model)
            options.update(more)
            if note:
                notes.append(note)
    return options, notes


def describe_model(model: nn.Module) -> str:
    spec = spec_of(model) or {}
    return f"{spec.get('method', type(model).__name__)} model" if spec else f"{type(model).__name__}"


# ----------------------------------------------------------------------------- loading any saved model
def open_model(path: PathLike, pretrained: Union[bool, str, None] = None,
               device: Union[str, torch.device] = "cpu") -> nn.Module:
    """A model in eval mode from an export directory (:func:`load_deployed`) or a training run
    directory (:func:`tokentune.load_trained`, with ``pretrained`` overriding the backbone source),
    each also as ``local-dir:DIR`` or ``hf-hub:owner/repo``; it carries its input preprocessing
    (size, filter, mean/std) in ``pretrained_cfg``."""
    directory = resolve_location(os.fspath(path), "the model", allow_patterns=OPEN_FILES)
    if is_export(directory):
        return load_deployed(directory, device=device)
    if not os.path.isdir(directory):
        raise TokenTuneError(f"{directory!r} does not exist; pass a run directory, an export directory or a peft adapter")
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise TokenTuneError(f"{directory!r} is a peft adapter; load it with tokentune.load_peft(DIR, MODEL_NAME)")
    model = load_trained(directory, pretrained=pretrained).to(device).eval()
    return apply_preprocessing(model, preprocessing_of(model, read_config(directory)))


load_model = open_model   # the name before open_model; kept for one release
