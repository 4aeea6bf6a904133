"""DynamicViT: dynamic token sparsification (Rao et al., NeurIPS 2021, arXiv 2106.02034).

Reimplemented from the paper and the published behaviour of its official code
(raoyongming/DynamicViT: ``models/dyvit.py``, ``losses.py``, ``main.py``; no code of it is used).
Before each pruning block (default: indices 3, 6, 9 of a 12-block ViT, the reference's
``pruning_loc``) a prediction module scores the patch tokens (:class:`PredictorLG`, Eq. 2-4)::

    z = GELU(W_in LN(x));   z_local = z[:, :D/2],   z_global = sum_i D_i z_i[D/2:] / sum_i D_i
    pi = LogSoftmax(MLP([z_local, z_global]))          [n, 2]: keep / drop log-probabilities

Training (Eq. 5-7): ``D <- GumbelSoftmax_hard(pi)[:, keep] * D`` (straight-through, temperature
1), and from that block on attention hides dropped keys by multiplying the softmax numerators
(each token still sees itself; :func:`tokentune.core.attention.softmax_with_policy`), so the
decisions get gradients. Dropped tokens are still computed, never deleted, in training.

Inference: stage ``k`` keeps the ``int(n0 rho^k)`` tokens with the highest keep score (``n0`` the
patch tokens at the first stage; 196 -> 137 -> 96 -> 67 on ViT-B/16 with rho = 0.7), gathered into
a smaller tensor in the reference's order (by descending score), prefix tokens first. This is the
training-time model in eval mode (the reference's eval path), so ``tokentune.deploy`` changes
nothing but forcing this gathering path (``dynamicvit_inference="mask"`` keeps every token and
masks instead: the same outputs up to the masked softmax's epsilon, tested).

Losses (reference ``DistillDiffPruningLoss_dynamic``, ``mse_token=True``: the DeiT setting)::

    L = CE(y, t) + ratio_weight / S * sum_k mean_b (mean_i D_k,bi - rho^k)^2
        + distill_weight * KL(softmax(y_teacher) || softmax(y))          ("batchmean")
        + distill_weight * mean over kept patch tokens of (z - z_teacher)^2    (final normed tokens)

Teacher (our choice, documented): the reference distils from the pretrained DeiT itself, an
ImageNet model with the same head. For PEFT on a downstream task (VTAB-1k: a new head) that model
has no head for the new classes, so the teacher is **the model being trained, run without pruning
(all tokens, no policy), in eval mode and without gradient**: the frozen backbone with its current
PEFT weights (LoRA, adapters, prompts) and head. With ``full`` fine-tuning it is the current
weights, not a frozen copy of the initial ones (which the reference would use on ImageNet).
``dynamicvit_distill_weight=0`` trains without a teacher (one forward per step).

Heads: the reference's ViTs classify from the class token. An average-pooled ViT
(``global_pool="avg"``, with or without a class token; timm's ``fc_norm``) classifies from the
average of the patch tokens still kept (:meth:`tokentune.core.vit.TokenTuneMixin.weighted_avg_pool`):
in training ``sum_i D_i x_i / sum_i D_i`` over the final tokens, the policy-weighted mean that the
prediction module's global feature uses (Eq. 3), so dropped tokens, still computed, do not enter
it; after real pruning the plain mean of the tokens left, which is the same value. The official
code has no average-pooled ViT with real pruning (its ConvNeXt and Swin variants keep every token,
updating the dropped ones through a cheap fast path, and average them all), so this is our
reading, documented. The prediction modules see only the non-prefix tokens and never need a class
token. The losses are the reference's (the teacher pools every token; the token MSE covers the
kept non-prefix tokens, all of them when there is no class token), with the token MSE taken after
the final LayerNorm as in the reference: timm's average-pooled ViTs apply it after pooling
(``fc_norm``, ``norm`` being the identity), so the tokens pass through ``fc_norm`` for the MSE
(on the raw residual stream the MSE swamped the loss and the demo's model stayed at chance).

Per-forward options: ``dynamicvit_prune=False`` (no pruning: the teacher), and
``dynamicvit_execution="prune"/"mask"`` (eval mode). Prefix tokens (CLS, registers, VPT prompts)
are never pruned. ``"dynamicvit"`` alone fine-tunes everything (the paper); combine with a PEFT
method as ``lora+dynamicvit`` or ``adapter+dynamicvit`` (DyT's Table 5 "DynamicViT+AdaptFormer").
The prediction modules train in every combination; the paper counts them (2.89M on ViT-B: DyT's
88.70M for DynamicViT = 85.80M + 3 x 961,730).

Parameter names (ours -> reference)::

    blocks.{loc_k}.reduce.predictor.in_conv.{0,1}.*     score_predictor.{k}.in_conv.{0,1}.*
    blocks.{loc_k}.reduce.predictor.out_conv.{0,2,4}.*  score_predictor.{k}.out_conv.{0,2,4}.*

:func:`load_reference_checkpoint` reads the reference's checkpoint files (backbone and prediction
modules, every key checked; :mod:`.reference`).
"""
from .method import (
                     TRAINABLE,
                     DynamicViTConfig,
                     apply_dynamicvit,
                     config_of,
                     deploy_dynamicvit,
                     dynamicvit_loss,
                     ratio_loss,
                     stage_rates,
)
from .predictor import EXECUTIONS, DynamicViTReducer, PredictorLG, decisions
from .reference import from_reference_state_dict, load_reference_checkpoint

__all__ = [
    "DynamicViTConfig", "DynamicViTReducer", "EXECUTIONS", "PredictorLG", "TRAINABLE", "apply_dynamicvit", "config_of",
    "decisions", "deploy_dynamicvit", "dynamicvit_loss", "from_reference_state_dict", "load_reference_checkpoint",
    "ratio_loss", "stage_rates",
]
