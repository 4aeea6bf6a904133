"""FPET's VTAB-1k recipes, from kyk120/fpet@17a45e76 ``train.sh``, ``main.py`` and ``configs/``.

The reference trains ViT-B/16 (Google's ImageNet-21k weights, ``drop_path_rate=0.1``) for 100
epochs with AdamW (lr 1e-3, weight decay 1e-4 on every trained tensor), batch 64 (``vtab.py``),
timm's ``CosineLRScheduler(t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)`` stepped
per epoch, on ``train800val200``, testing every 10 epochs. ``train.sh`` runs FPET at ``--r_layer 6``
with two PEFT settings per method, read from ``configs/<method>/<task>-bit<b>-dim<d>.yaml``:

* 32-bit, width 8, scale 1 on every task: ``fpet-vtab`` (AdaptFormer) and ``fpet-vtab-lora``
  (LoRA on q and v, rank 8);
* 1-bit, width 32, a scale per task (:data:`SCALES_1BIT`): ``fpet-vtab-1bit`` and
  ``fpet-vtab-lora-1bit``, whose recorded scale is 1.0 (the most frequent); set the task's scale with
  ``--adapter-scale S`` (AdaptFormer) or ``--lora-alpha 32*S`` (LoRA: ``s = alpha / rank``).

Deviations: the reference feeds the network pixels in [0, 1] without mean/std normalisation
(``vtab.py``: ``get_data(normalize=False)``); the recipes keep tokentune's ``auto`` normalisation
(0.5/0.5 for Google's ViTs). The reported accuracy is the last epoch's (the reference keeps the
best of its tests, labelled ``best_top1_over_epochs`` here).
"""
from __future__ import annotations

from ...core.method import Recipe, register_recipe

_TRAIN = dict(
    epochs=100, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_epochs=10, warmup_lr=1e-6, schedule_step="epoch",
    weight_decay=1e-4, no_decay_norm_bias=False, label_smoothing=0.0, drop_last=True, eval_every=10,
    train_split="train800val200", test_split="test", image_size=224, interpolation="bicubic",
)
_FPET = dict(fpet_r_layer=6, fpet_refine_dim=32, fpet_refine_bits=1, fpet_prop_attn=True, drop_path_rate=0.1)
_ADAPTER = dict(adapter_bias=False, adapter_dropout=0.1, adapter_layernorm="none")
_LORA = dict(lora_targets=("q", "v"), lora_dropout=0.1, lora_hidden_dropout=True)

#: the 1-bit, width-32 runs' scale s per VTAB-1k task (configs/<method>/<task>-bit1-dim32.yaml)
SCALES_1BIT = {
    "adaptformer": dict(cifar=0.1, caltech101=10.0, dtd=0.01, oxford_flowers102=1.0, oxford_iiit_pet=0.01, svhn=10.0,
                        sun397=0.1, patch_camelyon=1.0, eurosat=1.0, resisc45=10.0, diabetic_retinopathy=1.0,
                        clevr_count=1.0, clevr_dist=0.1, dmlab=1.0, kitti=1.0, dsprites_loc=1.0, dsprites_ori=0.1,
                        smallnorb_azi=1.0, smallnorb_ele=1.0),
    "lora": dict(cifar=0.1, caltech101=10.0, dtd=0.01, oxford_flowers102=1.0, oxford_iiit_pet=0.1, svhn=10.0,
                 sun397=0.1, patch_camelyon=10.0, eurosat=10.0, resisc45=10.0, diabetic_retinopathy=10.0,
                 clevr_count=1.0, clevr_dist=0.1, dmlab=10.0, kitti=10.0, dsprites_loc=1.0, dsprites_ori=0.1,
                 smallnorb_azi=10.0, smallnorb_ele=1.0),
}

register_recipe(Recipe(
    "fpet-vtab", "adapter+fpet", train_options=dict(_TRAIN),
    model_options=dict(_FPET, **_ADAPTER, adapter_bottleneck=8, adapter_bits=32, adapter_scale=1.0),
    summary="FPET VTAB-1k recipe (train.sh): AdaptFormer width 8, 32-bit, scale 1, merge at block 6"))
register_recipe(Recipe(
    "fpet-vtab-lora", "lora+fpet", train_options=dict(_TRAIN),
    model_options=dict(_FPET, **_LORA, lora_rank=8, lora_alpha=8.0, lora_bits=32),
    summary="FPET VTAB-1k recipe (train.sh): LoRA on q and v, rank 8, 32-bit, scale 1, merge at block 6"))
register_recipe(Recipe(
    "fpet-vtab-1bit", "adapter+fpet", train_options=dict(_TRAIN),
    model_options=dict(_FPET, **_ADAPTER, adapter_bottleneck=32, adapter_bits=1, adapter_scale=1.0),
    summary="FPET VTAB-1k recipe (train.sh): 1-bit AdaptFormer width 32 (set the task's --adapter-scale: "
            "tokentune.methods.fpet.recipes.SCALES_1BIT)"))
register_recipe(Recipe(
    "fpet-vtab-lora-1bit", "lora+fpet", train_options=dict(_TRAIN),
    model_options=dict(_FPET, **_LORA, lora_rank=32, lora_alpha=32.0, lora_bits=1),
    summary="FPET VTAB-1k recipe (train.sh): 1-bit LoRA on q and v, rank 32 (set the task's --lora-alpha = "
            "32 x scale: tokentune.methods.fpet.recipes.SCALES_1BIT)"))
