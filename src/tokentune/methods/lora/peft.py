"""peft interop: tokentune's LoRA in peft's adapter format, and peft LoRA adapters of timm ViTs in tokentune.

tokentune's LoRA (:mod:`tokentune.methods.lora`) computes what peft's ``LoraConfig`` layer computes
on the same ``nn.Linear``: ``W x + b + (alpha / r) B A dropout(x)``. A peft adapter directory holds

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules``, ``modules_to_save`` (the classification head), ``base_model_name_or_path``;
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` [r, in],
  ``...lora_B.weight`` [out, r] and ``base_model.model.head.weight``/``.bias``.

:func:`save_peft` writes one from a tokentune model with LoRA (``lora``, ``lora+tome``, ...), which
``peft.PeftModel.from_pretrained(timm_model, DIR)`` loads; :func:`load_peft` builds a tokentune model
from such a directory (any LoRA peft made on a timm ViT's ``attn.qkv``/``attn.proj``/``mlp.fc1``/
``mlp.fc2`` of every block; on timm's Eva also ``attn.q_proj``/``k_proj``/``v_proj`` and
``mlp.fc1_g``/``fc1_x``), optionally adding token reduction (``method="lora+tome"``).

timm's Eva models cross over wherever timm's forward calls the LoRA target as a module, which it
does for every target except the fused ``qkv`` of an ``EvaAttention`` with separate q/v biases
(EVA-02 tiny/small, EVA-01): timm runs ``F.linear(x, qkv.weight, bias)`` there, so peft's layer
would be skipped, and a LoRA on it is refused both ways (tokentune's own forward applies it; keep
the run).

Only what both sides compute the same way crosses over. Options peft has and tokentune's LoRA has not
(DoRA, ``rank_pattern``/``alpha_pattern``, LoRA on a subset of blocks or on other layers, a trained
bias, initialisations that change the base weights such as PiSSA/OLoRA/CorDA) are refused with one
line; ``use_rslora`` is representable (``alpha / sqrt(r)`` = tokentune ``alpha' / r`` with
``alpha' = alpha * sqrt(r)``). Tensors peft cannot hold (PYRA's modulation, adapters, DyT's
dispatchers) make :func:`save_peft` refuse; a token-reduction method that trains nothing (ToMe)
is recorded in the file's metadata, restored by :func:`load_peft`, and announced by a warning,
since peft runs the LoRA without it.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import timm
import torch
from timm.models.eva import EvaAttention
from torch import nn

from ...core.factory import HEAD_PATTERN, create_model, methods_of
from ...core.hub import ADAPTER_CONFIG, ADAPTER_WEIGHTS, portable_backbone, resolve_location, resolved_backbone, split_source
from ...core.method import parse_method
from ...core.vit import spec_of
from ...core.weights import load_safetensors, load_state_into
from ...errors import TokenTuneError
from ...fileio import atomic_write, atomic_write_json
from ...utils import unwrap_model
from ...version import __version__
from .layer import LoRALinear, PartLoRALinear

PREFIX = "base_model.model."
#: tokentune's LoRA targets and the module they are inside a timm block (q_proj/k_proj/v_proj and
#: fc1_g/fc1_x: the separate projections and SwiGLU halves of timm's Eva blocks)
TARGET_MODULES = {"qkv": "attn.qkv", "q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
                  "proj": "attn.proj", "fc1": "mlp.fc1", "fc1_g": "mlp.fc1_g", "fc1_x": "mlp.fc1_x", "fc2": "mlp.fc2"}
HEADS = ("head", "head_dist")

# peft options that do not change what a loaded adapter computes (informational or init-only)
_INFORMATIONAL = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora",
    "init_lora_weights", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "ensure_weight_tying", "exclude_modules", "layers_pattern",
}
# initialisations that change the base weights: the adapter only fits the changed base model
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_FIX = "train the LoRA with tokentune, or save it from peft with plain LoRA options"


_BYPASS_WHY = ("timm's EvaAttention with separate q/v biases computes F.linear(x, qkv.weight, bias) itself, "
               "so a peft LoRA layer on its qkv is never called")


def _bypassed(model: nn.Module, names: Iterable[str]) -> List[str]:
    """The LoRA layers among ``names`` that timm's own forward does not call as modules.

    timm calls every ``q_proj``/``k_proj``/``v_proj``, ``proj``, ``fc1``/``fc1_g``/``fc1_x`` and ``fc2``
    as a module, and ``qkv`` too in ``Attention``, ``AttentionRope`` and an ``EvaAttention`` without
    q/v biases (or with ``qkv_bias_separate``); only an ``EvaAttention`` with ``q_bias`` on a fused
    ``qkv`` (EVA-02 tiny/small, EVA-01) reads ``qkv.weight`` directly, so peft's layer there is skipped.
    """
    out = []
    for name in names:
        parent, _, attr = name.rpartition(".")
        attn = model.get_submodule(parent) if parent else model
        if (attr == "qkv" and isinstance(attn, EvaAttention) and attn.q_bias is not None
                and not attn.qkv_bias_separate):
            out.append(name)
    return out


def _some(names: List[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


# ----------------------------------------------------------------------------- export
def _lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _target_modules(model: nn.Module, layers: List[str]) -> Union[List[str], str]:
    """peft's ``target_modules`` that select exactly the LoRA layers: module suffixes (``attn.qkv``)
    when no other module ends the same way, else one regex (peft matches a string with fullmatch)."""
    suffixes = list(dict.fromkeys(re.sub(r"^blocks\.\d+\.", "", n) for n in layers))
    names = [n for n, _ in model.named_modules()]
    block = re.compile(r"blocks\.\d+\.(" + "|".join(re.escape(s) for s in suffixes) + r")")
    stray = [n for n in names for s in suffixes if (n == s or n.endswith("." + s)) and not block.fullmatch(n)]
    return block.pattern if stray else suffixes


def peft_config_of(model: nn.Module) -> Dict[str, Any]:
    """The ``adapter_config.json`` of ``model``'s LoRA (see :func:`save_peft`)."""
    model = unwrap_model(model)
    spec = spec_of(model)
    layers = _lora_layers(model)
    if any(isinstance(m, PartLoRALinear) for m in model.modules()):
        raise TokenTuneError("peft's LoRA format cannot hold a LoRA on q/k/v parts of a fused qkv, with low-bit "
                             "weights or with the hidden dropout (lora_targets q/v, lora_bits, lora_hidden_dropout); "
                             "keep tokentune's format (tokentune.save_trained, tokentune export)")
    if spec is None or not layers:
        raise TokenTuneError("peft's format holds a LoRA: pass a model built by tokentune.create_model with a LoRA "
                             "(method='lora', 'lora+tome', ...) before deploy() merged it")
    bypassed = _bypassed(model, layers)
    if bypassed:
        raise TokenTuneError(f"peft's LoRA format cannot hold the LoRA on {_some(bypassed)}: "
                             f"{_BYPASS_WHY}; choose lora_targets timm calls as modules (proj, fc1, fc2) or keep "
                             "tokentune's format (tokentune.save_trained, tokentune export)")
    cfg = (spec.get("configs") or {}).get("lora") or {}
    first = next(iter(layers.values()))
    heads = [h for h in HEADS if any(re.match(rf"{h}\.", n) and p.requires_grad for n, p in model.named_parameters())]
    source, ident = split_source(spec["model"])
    hub_id = None
    if spec.get("pretrained") is True and source is None:     # the timm hub weights of the name
        cfg_of = timm.models.get_pretrained_cfg(spec["model"])
        hub_id = getattr(cfg_of, "hf_hub_id", None)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": type(model).timm_class.__name__,
                         "parent_library": type(model).timm_class.__module__},
        "base_model_name_or_path": ident if source == "hf-hub" else (hub_id or spec["model"]),
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": float(cfg.get("dropout", 0.0)),
        "target_modules": _target_modules(model, list(layers)),
        "modules_to_save": heads or None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def save_peft(model: nn.Module, directory: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """Write ``model``'s LoRA and trained head as a peft adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``); returns the adapter config.

    ``peft.PeftModel.from_pretrained(timm.create_model(name, num_classes=...), directory)`` then
    computes what ``model`` computes without token reduction. Trained tensors peft cannot hold
    (PYRA, adapters, DyT) are refused; a method that trains nothing (ToMe) is recorded in the
    file's metadata for :func:`load_peft` and announced by a warning.
    """
    model = unwrap_model(model)
    config = peft_config_of(model)
    layers = _lora_layers(model)
    lora_names = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    head = re.compile(HEAD_PATTERN)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    other = sorted(n for n in trained if n not in lora_names and not head.search(n))
    if other:
        raise TokenTuneError(f"peft's LoRA format cannot hold the other trained tensors of this "
                             f"{spec_of(model)['method']} model (e.g. {other[0]!r}, {len(other)} in all); "
                             "use tokentune.save_trained or tokentune.export_deployed")
    extra = [m.name for m in methods_of(model) if not m.peft]
    if extra:
        warnings.warn(f"peft loads this adapter as plain LoRA, without {'+'.join(extra)}; tokentune.load_peft "
                      "restores it from the file's metadata", stacklevel=2)
    tensors: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    for name, p in trained.items():
        if head.search(name):
            tensors[PREFIX + name] = p.detach().cpu().contiguous()
    directory = os.fspath(directory)
    metadata = {"format": "pt", "tokentune_version": __version__,
                "tokentune_spec": json.dumps(portable_backbone(spec_of(model), directory), sort_keys=True)}
    from safetensors.torch import save_file

    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_json(os.path.join(directory, ADAPTER_CONFIG), config)
    return config


# ----------------------------------------------------------------------------- import
def read_peft_config(directory: str) -> Dict[str, Any]:
    """``adapter_config.json`` of a peft adapter directory, checked for what tokentune can represent."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise TokenTuneError(f"{directory!r} has no {ADAPTER_CONFIG}; pass a folder written by peft's "
                             "save_pretrained (or tokentune.save_peft)")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenTuneError(f"{path} is damaged (not valid JSON: {exc}); save the adapter again") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise TokenTuneError(f"{path} holds a {found or 'non-peft'} adapter; tokentune reads peft LoRA adapters "
                             "(peft_type LORA)")
    _check_representable(config, path)
    return config


def _check_representable(config: Dict[str, Any], path: str) -> None:
    """One line for the first option tokentune's LoRA cannot represent."""
    def refuse(option: str, why: str) -> None:
        raise TokenTuneError(f"{path}: {option} cannot be represented by tokentune's LoRA ({why}); {_FIX}")

    if config.get("use_dora"):
        refuse("use_dora=true", "DoRA rescales the weight by a learned magnitude")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            refuse(f"{key}={json.dumps(config[key])}", "every LoRA layer has the same rank and alpha")
    if config.get("layers_to_transform") is not None:
        refuse(f"layers_to_transform={config['layers_to_transform']}", "LoRA is applied to every block")
    if config.get("bias", "none") != "none":
        refuse(f"bias={config['bias']!r}", "the frozen biases stay frozen")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=true", "timm's layers are nn.Linear")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        refuse(f"init_lora_weights={init!r}", "this initialisation changed the base weights the adapter fits; convert "
               "the adapter with peft's path_initial_model_for_weight_conversion first")
    for key, value in config.items():
        if key not in _INFORMATIONAL and value not in (None, False, {}, [], "none", 0):
            refuse(f"{key}={json.dumps(value)}", "not a plain LoRA option")


def _lora_modules(tensors: Dict[str, torch.Tensor], path: str) -> Tuple[Dict[int, List[str]], Dict[str, torch.Tensor]]:
    """``({block: [targets]}, {tokentune name: tensor})`` of the LoRA and head tensors of an adapter file."""
    suffixes = {v: k for k, v in TARGET_MODULES.items()}
    pattern = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in suffixes) + r")\.lora_([AB])\.weight")
    per_block: Dict[int, List[str]] = {}
    ours: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", name)   # adapter name kept by some writers
        match = pattern.fullmatch(name)
        if match:
            block, module, ab = int(match.group(1)), match.group(2), match.group(3)
            if ab == "A":
                per_block.setdefault(block, []).append(suffixes[module])
            ours[f"blocks.{block}.{module}.lora_{ab}"] = value
        elif re.match(r"(head|head_dist)\.(weight|bias)$", name):
            ours[name] = value
        else:
            module = name.rsplit(".lora_", 1)[0] if ".lora_" in name else name
            raise TokenTuneError(f"{path}: the adapter changes {module!r}, which tokentune's LoRA cannot represent "
                                 f"(it adapts {', '.join(TARGET_MODULES.values())} in every block and saves the head); "
                                 f"{_FIX}")
    if not per_block:
        raise TokenTuneError(f"{path} holds no LoRA tensors of a timm ViT block (blocks.N.attn.qkv.lora_A.weight, ...); "
                             "pass an adapter peft made on a timm VisionTransformer")
    return per_block, ours


def _base_name(config: Dict[str, Any], model: Optional[str], path: str) -> str:
    """The timm name of the base model: ``model``, else the adapter's ``base_model_name_or_path``."""
    if model:
        return model
    base = config.get("base_model_name_or_path")
    if not base:
        raise TokenTuneError(f"{path} does not name its base model (base_model_name_or_path is empty); pass the timm "
                             "model name, e.g. load_peft(DIR, 'vit_base_patch16_224.augreg_in21k')")
    if split_source(base)[0] is not None:
        return base
    if base.startswith("timm/"):
        return base[len("timm/"):]
    return base if "/" not in base else f"hf-hub:{base}"


def load_peft(adapter: Union[str, "os.PathLike[str]"], model: Optional[str] = None, *,
              method: Optional[str] = None, pretrained: Union[bool, str, None] = None,
              num_classes: Optional[int] = None, **options) -> nn.Module:
    """A tokentune model with the LoRA (and head) of a peft adapter of a timm ViT.

    Args:
        adapter: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), a
            ``local-dir:`` folder or an ``hf-hub:owner/repo`` repository.
        model: timm name (or ``hf-hub:``/``local-dir:`` name) of the base model; default: as
            :func:`save_peft` recorded it, else the adapter's ``base_model_name_or_path``
            (``timm/<name>`` is timm's ``<name>``).
        method: method spec; must contain ``lora`` (``"lora+tome"`` adds ToMe to an adapter trained
            without it). Default: as recorded by :func:`save_peft`, else ``"lora"``.
        pretrained: where the frozen backbone comes from (default: as :func:`save_peft` recorded it,
            else the timm hub, ``True``); a local weights file for the exact base weights the
            adapter was trained on.
        num_classes: classes of the head; default: the saved head's, else the base checkpoint's.
        **options: further options of :func:`tokentune.create_model` (``tome_r=8``, ``img_size=...``).

    Returns:
        The model in eval mode, trainable like any tokentune LoRA model; its outputs equal the peft
        model's on the same base weights (without token reduction).
    """
    directory = resolve_location(os.fspath(adapter), "the peft adapter")
    path = os.path.join(directory, ADAPTER_CONFIG)
    config = read_peft_config(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise TokenTuneError(f"{directory!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save the adapter again "
                             "with safe_serialization=True (peft's default)")
    tensors = load_safetensors(weights, "save the adapter again")
    per_block, ours = _lora_modules(tensors, weights)
    targets = sorted({t for ts in per_block.values() for t in ts}, key=list(TARGET_MODULES).index)
    blocks = sorted(per_block)
    uneven = [b for b in blocks if sorted(per_block[b]) != sorted(targets)]
    if uneven or blocks != list(range(len(blocks))):
        raise TokenTuneError(f"{weights}: LoRA is on blocks {blocks[0]}-{blocks[-1]} with differing targets or gaps; "
                             f"tokentune's LoRA adapts the same layers in every block; {_FIX}")
    recorded = _recorded_spec(weights)
    if recorded is not None:
        recorded = resolved_backbone(recorded, directory)
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    if config.get("use_rslora"):
        alpha = alpha * rank / math.sqrt(rank)     # peft scales by alpha / sqrt(r); tokentune by alpha / r
    spec_method = method or (recorded or {}).get("method") or "lora"
    if "lora" not in [m.name for m in parse_method(spec_method)]:     # explicit or implied (pyra)
        raise TokenTuneError(f"method={spec_method!r} has no LoRA to put the adapter in; use 'lora' or 'lora+tome'")
    build: Dict[str, Any] = {}
    if recorded:
        build.update(recorded.get("timm_kwargs") or {})
        if method is None:
            build.update({k: v for k, v in (recorded.get("configs") or {}).items() if k != "lora"})
    build.update(options)
    head = ours.get("head.weight")
    if num_classes is None and head is not None:
        num_classes = int(head.shape[0])
    name = model or (recorded or {}).get("model") or _base_name(config, model, path)
    if pretrained is None:
        pretrained = (recorded or {}).get("pretrained", True)
    if recorded is not None and not pretrained and "seed" not in build:
        build["seed"] = recorded.get("init_seed")        # the same random frozen backbone
    built = create_model(name, method=spec_method, num_classes=num_classes, pretrained=pretrained,
                         train_head="head.weight" in ours,
                         lora_rank=rank, lora_alpha=alpha, lora_dropout=float(config.get("lora_dropout") or 0.0),
                         lora_targets=tuple(targets), **build)
    depth = len([n for n, m in built.named_modules() if re.fullmatch(r"blocks\.\d+", n)])
    if len(blocks) != depth:
        raise TokenTuneError(f"{weights}: the adapter was trained on a model of depth {len(blocks)} (LoRA on blocks "
                             f"0-{blocks[-1]}) but {name!r} has depth {depth}; pass the base model the adapter was "
                             "trained on (load_peft(..., model=NAME), --model NAME)")
    bypassed = _bypassed(built, sorted({n.rsplit(".lora_", 1)[0] for n in ours if ".lora_" in n}))
    if bypassed:
        raise TokenTuneError(f"{weights}: the adapter's LoRA on {_some(bypassed)} never ran "
                             f"in peft: {_BYPASS_WHY}; train the adapter on layers timm calls (attn.proj, mlp.fc1, "
                             "mlp.fc2) or train the LoRA with tokentune")
    load_state_into(built, ours, source=weights, require_all_trainable=False)
    return built.eval()


def _recorded_spec(weights: str) -> Optional[Dict[str, Any]]:
    """The tokentune build spec :func:`save_peft` stored in the file's metadata (None for peft's own files)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as fh:
        text = (fh.metadata() or {}).get("tokentune_spec")
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
