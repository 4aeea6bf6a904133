"""The built-in methods, one module (or folder) each; importing this package registers them.

* :mod:`.tuning`: ``full`` and ``linear``;
* :mod:`.lora`: LoRA on the blocks' Linear layers (merged for deployment);
* :mod:`.adapter`: AdaptFormer-style adapters (plain and MoE);
* :mod:`.vpt`: visual prompt tuning (shallow and deep prompts, protected as prefix tokens);
* :mod:`.tome`: ToMe token merging (matching, schedules, FLOPs, measured speed-up);
* :mod:`.pyra`: PYRA, the modulation of the tokens ToMe merges;
* :mod:`.dyt`: Dynamic Tuning, token dispatchers with adapters on every token;
* :mod:`.evit`: EViT, keep the tokens the CLS token attends to, fuse the others
  (:mod:`.pruning`: what the pruning methods share);
* :mod:`.dynamicvit`: DynamicViT, learned prediction modules prune rho, rho^2, rho^3 of the tokens;
* :mod:`.diffrate`: DiffRate, per-block prune and merge counts searched under a FLOPs target, then fixed;
* :mod:`.pitome`: PiToMe, training-free merging that protects low-energy (informative) tokens;
* :mod:`.tofu`: ToFu, training-free pruning in early blocks and norm-preserving merging in late ones;
* :mod:`.mctf`: MCTF, multi-criteria token fusion with one-step-ahead attention (training-free or trained);
* :mod:`.fpet`: FPET, one checkerboard merge with a refined metric and straight-through matching;
* :mod:`.binary`: low-bit (binary) linear layers with a straight-through estimator (adapters, FPET);
* :mod:`.dtem`: DTEM, ToMe on a learned decoupled embedding (soft grouping in training).

Adding a method: one module or folder here that defines its config dataclass and calls
``register_method(Method(...))`` at import, an import line below, and its tests (CONTRIBUTING.md).
Methods of other packages register through the ``tokentune.methods`` entry-point group instead.

The registry itself lives in :mod:`tokentune.core.method`; its names are re-exported here, where
they lived before (kept for one release).
"""
from ..core.factory import (
                            HEAD_PATTERN,
                            check_model_options,
                            create_model,
                            init_head,
                            init_seed,
                            make_config,
                            mark_trainable,
                            methods_of,
                            split_options,
)
from ..core.method import (
                            BuildContext,
                            Method,
                            Recipe,
                            available_methods,
                            available_recipes,
                            canonical_spec,
                            get_method,
                            get_recipe,
                            parse_method,
                            register_method,
                            register_recipe,
)
from . import adapter, diffrate, dtem, dynamicvit, dyt, evit, fpet, lora, mctf, pitome, pyra, tofu, tome, tuning, vpt  # noqa: F401 - registers the built-in methods

__all__ = [
    "BuildContext", "HEAD_PATTERN", "Method", "Recipe", "available_methods", "available_recipes", "canonical_spec",
    "check_model_options", "create_model", "get_method", "get_recipe", "init_head", "init_seed", "make_config",
    "mark_trainable", "methods_of", "parse_method", "register_method", "register_recipe", "split_options",
]
