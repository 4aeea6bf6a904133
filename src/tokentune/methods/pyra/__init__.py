"""PYRA: Parallel Yielding Re-Activation (Xiong et al., ECCV 2024, arXiv 2403.09192).

PYRA = LoRA + ToMe + a tiny *modulator* that rewrites the tokens ToMe is about to merge away.
In every block that merges ``r`` tokens (between attention and MLP), with ``D`` the embed dim::

    M_s, M_t  [r, D]   the size-weighted source tokens (ToMe's descending-similarity order) and,
                       for each, its destination as it was before any merge
    M_info  = LayerNorm(M_s + M_t)                    own LayerNorm(D), eps 1e-5, affine
    delta_D = W_r^T . M_info          [1, D]          W_r [r, 1]: perceives the token axis
    delta_r = M_info . W_D^T          [r, 1]          W_D [1, D]: perceives the channel axis
    M_hat   = 2 sigmoid(delta_D) * M_s                step 1 (re-activation, broadcast over rows)
    M_s    <- M_s + (2 sigmoid(delta_r) - 1) * M_hat  step 2 (broadcast over channels)

then ToMe scatter-sums the (modulated) sources into their destinations; token *sizes* are merged
without modulation. ``W_D`` starts at zero, so step 2 multiplies by ``2 sigmoid(0) - 1 = 0``
and PYRA is exactly LoRA+ToMe at initialisation. ``W_r`` starts Uniform(-1, 1) (the reference
code: kaiming_uniform(a=sqrt 5) on an [r, 1] tensor); the paper's "random Gaussian" is
``pyra_wr_init="gaussian"``. The modulator runs in training and inference: it is part of the
deployed model (LoRA merges into qkv, the modulator stays; ~4 r D FLOPs per block).

Usage::

    model = tokentune.create_model("vit_base_patch16_224.orig_in21k", method="pyra", num_classes=100,
                                   pretrained="ViT-B_16.npz", tome_r="high")   # or "low", a list, ...

``method="pyra"`` is ``lora+tome+pyra`` (the paper's system); ``"adapter+pyra"`` and
``"full+pyra"`` swap the tuning method. Options: ``pyra_<field>=...`` (:class:`PYRAConfig`);
the merge schedule is ToMe's ``tome_r`` and is fixed at build time because ``W_r`` has one row
per merged token of its block.

Parameter names (ours -> reference THU-MIG/PYRA checkpoints), see :func:`from_reference_state_dict`:

=============================================  ================================================
tokentune                                      reference
=============================================  ================================================
``blocks.{i}.merge.modulator.W_r``  [r_i, 1]   ``blocks.{i}.pyra_a``  [r_i, 1]
``blocks.{i}.merge.modulator.W_D``  [1, D]     ``blocks.{i}.pyra_b``  [1, D]
``blocks.{i}.merge.modulator.norm.weight``     ``blocks.{i}.pyra_norm.weight``
``blocks.{i}.merge.modulator.norm.bias``       ``blocks.{i}.pyra_norm.bias``
``blocks.{i}.attn.qkv.lora_A``  [rank, D]      ``blocks.{i}.attn.LoRA_a.weight``  [rank, D]
``blocks.{i}.attn.qkv.lora_B``  [3D, rank]     ``blocks.{i}.attn.LoRA_b.weight``  [3D, rank]
every other name (timm's)                      the same name (``patch_embed.*``, ``cls_token``,
                                               ``dist_token``, ``pos_embed``, ``blocks.{i}.norm1/
                                               attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2.*``,
                                               ``norm.*``, ``head.*``, ``head_dist.*``)
=============================================  ================================================

Ablation variants (``pyra_variant``, ``pyra_activation``) are described in :class:`PYRAConfig`.
"""
from .modulator import (
                        GENERATOR,
                        NORM,
                        TRAINABLE,
                        VARIANTS,
                        WR_INITS,
                        PYRAConfig,
                        PYRAModulator,
                        modulator_flops,
                        modulators,
                        param_groups,
                        parameter_report,
)
from .reference import from_reference_state_dict, load_reference_checkpoint, reference_schedule, to_reference_state_dict

__all__ = [
    "GENERATOR", "NORM", "PYRAConfig", "PYRAModulator", "TRAINABLE", "VARIANTS", "WR_INITS", "from_reference_state_dict",
    "load_reference_checkpoint", "modulator_flops", "modulators", "param_groups", "parameter_report",
    "reference_schedule", "to_reference_state_dict",
]
