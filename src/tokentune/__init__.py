"""tokentune: adapt pretrained Vision Transformers so they are cheap to train and fast to run.

Public surface::

    import tokentune
    model = tokentune.create_model("vit_base_patch16_224.orig_in21k", method="lora+tome",
                                   num_classes=100, pretrained="ViT-B_16.npz", tome_r=[16] * 11 + [10])
    tokentune.print_trainable_parameters(model)
    fast = tokentune.deploy(model)          # LoRA merged, same outputs in eval mode

Methods (``method=``, joined with ``+``): ``full``, ``linear``, ``lora``, ``adapter``, ``vpt``, ``tome``,
``evit``, ``dynamicvit``, ``diffrate``, ``pyra`` (= lora+tome+pyra), ``dyt``. See :func:`available_methods`.

Layout (docs/architecture.md): ``core`` (composition layer, registry, factory),
``methods`` (one module or folder per method), ``engine`` (training, data, evaluation, run
directories), ``tools`` (bench, export, pictures, demo), ``cli``; leaves (errors, file I/O, ...).
"""
from . import _compat
from . import methods as _methods  # noqa: F401 - importing registers the built-in methods
from . import tasks as _tasks  # noqa: F401 - importing registers the built-in tasks
from .cli.sweep import sweep
from .core.attention import attention
from .core.block import AdaptedBlock
from .core.deploy import deploy
from .core.factory import create_model
from .core.method import Recipe, available_methods, available_recipes, get_recipe, register_method
from .core.params import count_parameters, print_trainable_parameters
from .core.state import TokenState
from .engine.checkpoint import load_trained, save_trained
from .engine.config import TrainConfig
from .engine.data import build_datasets
from .engine.evaluate import evaluate
from .engine.sources import ImageSource, StreamDataset, WebDatasetShards
from .engine.training import train
from .errors import TokenTuneError
from .methods.adapter import Adapter, AdapterConfig, MoEAdapter
from .methods.diffrate import DiffRateConfig, search_rates
from .methods.dynamicvit import DynamicViTConfig
from .methods.dyt import DyTConfig
from .methods.evit import EViTConfig
from .methods.lora import LoRAConfig, LoRALinear
from .methods.lora.peft import load_peft, save_peft
from .methods.pyra import PYRAConfig
from .methods.tome import ToMeConfig, bipartite_soft_matching, merge_weighted
from .methods.vpt import VPTConfig
from .tools.accelerate import AccelerateConfig, accelerate
from .tools.export import export_deployed, export_format, load_deployed, open_model
from .tools.hub import push_to_hub
from .tools.onnx import export_onnx
from .tools.program import export_program
from .version import __version__

_compat.install()

__all__ = [
    "AccelerateConfig", "accelerate",
    "Adapter", "AdapterConfig", "AdaptedBlock", "DiffRateConfig", "DynamicViTConfig", "DyTConfig", "EViTConfig",
    "ImageSource", "LoRAConfig", "LoRALinear", "MoEAdapter", "PYRAConfig", "Recipe", "StreamDataset", "ToMeConfig",
    "TokenState", "TokenTuneError", "TrainConfig", "VPTConfig", "attention",
    "available_methods", "available_recipes", "bipartite_soft_matching", "build_datasets", "count_parameters",
    "create_model", "deploy", "evaluate", "export_deployed", "export_format", "export_onnx", "export_program",
    "get_recipe", "load_deployed", "load_peft", "load_trained", "merge_weighted", "open_model",
    "print_trainable_parameters", "push_to_hub", "register_method", "save_peft", "save_trained", "search_rates",
    "sweep", "train", "WebDatasetShards", "__version__",
]
