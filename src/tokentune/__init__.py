"""tokentune: adapt pretrained Vision Transformers so they are cheap to train and fast to run.

Public surface::

    import tokentune
    model = tokentune.create_model("vit_base_patch16_224.orig_in21k", method="lora+tome",
                                   num_classes=100, pretrained="ViT-B_16.npz", tome_r=[16] * 11 + [10])
    tokentune.print_trainable_parameters(model)
    fast = tokentune.deploy(model)          # LoRA merged, same outputs in eval mode

Methods (``method=``, joined with ``+``): ``full``, ``linear``, ``lora``, ``adapter``, ``tome``,
``pyra`` (= lora+tome+pyra), ``dyt``. See :func:`available_methods`.
"""
from .adapter import Adapter, AdapterConfig, MoEAdapter
from .checkpoint import load_trained, save_trained
from .config import Recipe, TrainConfig, available_recipes, get_recipe
from .data import build_datasets
from .deploy import deploy
from .dyt import DyTConfig
from .errors import TokenTuneError
from .evaluate import evaluate
from .export import export_deployed, export_onnx, load_deployed
from .lora import LoRAConfig, LoRALinear
from .methods import available_methods, create_model, register_method
from .model import AdaptedBlock, TokenState, attention
from .params import count_parameters, print_trainable_parameters
from .pyra import PYRAConfig
from .tome import ToMeConfig, bipartite_soft_matching, merge_weighted
from .train import train

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterConfig", "AdaptedBlock", "DyTConfig", "LoRAConfig", "LoRALinear", "MoEAdapter",
    "PYRAConfig", "Recipe", "ToMeConfig", "TokenState", "TokenTuneError", "TrainConfig", "attention",
    "available_methods", "available_recipes", "bipartite_soft_matching", "build_datasets", "count_parameters",
    "create_model", "deploy", "evaluate", "export_deployed", "export_onnx", "get_recipe", "load_deployed",
    "load_trained", "merge_weighted", "print_trainable_parameters", "register_method", "save_trained", "train",
    "__version__",
]
