"""DyT: Dynamic Tuning (Zhao et al., NeurIPS 2024, arXiv 2403.11808).

A *token dispatcher* per block decides, per token, whether the token takes part in a
skippable computation (attention, the MLP, or the whole block); an adapter processes every token
in parallel with it, so skipped tokens are still adapted::

    X' = X + M * Block(X) + Adapter(X)        forward with the hard mask M,
                                              backward with the soft mask S (straight-through)

Dispatcher (:class:`TokenDispatcher`): ``g = Linear(D -> 1)`` on the patch tokens (prefix tokens,
i.e. CLS and registers, are always active and get no gradient). Training:
``S = sigmoid((g + G1 - G2) / tau)`` with ``G1, G2 ~ Gumbel(0, 1)``, ``M = 1[S > 0.5]``, gate
``M - stopgrad(S) + S``. Inference: ``M = 1[sigmoid(g) > 0.5]``, no noise (tau does not matter).

Variants (``DyTConfig.variant``), all built on :class:`tokentune.core.block.AdaptedBlock`::

    "mlp"       x1 = x + attn(x)                        x2 = x1 + M * mlp(x1) + adapter(x1)   (default, reference)
    "attn"      x1 = x + M * attn_M(x) + attn_adapter(x)  x2 = x1 + mlp(x1)
    "attn_mlp"  x1 = x + Ma * attn_Ma(x) + attn_adapter(x)  x2 = x1 + Mm * mlp(x1) + adapter(x1)
    "layer"     x1 = x + M * attn_M(x)                  x2 = x1 + M * mlp(x1) + layer_adapter(x)

``attn_M`` means attention among the active tokens only: inactive tokens are neither queries nor
keys/values. Readings where the paper gives only a figure (documented choices):

* Every skippable unit gets the full DyT treatment of Fig. 2 (its own dispatcher *and* its own
  adapter in parallel with it): Attn Dispatch puts the adapter parallel to attention (on the block
  input), Attn-MLP Dispatch has two dispatchers and two adapters, Layer Dispatch has one
  dispatcher and one adapter parallel to the whole block (on the block input).
* In training, attention dispatch hides inactive keys with a hard additive mask and gates the
  updates with the straight-through mask; the dispatcher learns through the gate (the paper's
  ``Block(X) * S`` backward), not through the key mask.
* The rate loss averages the activation of every dispatcher (two per block for Attn-MLP).

Execution. Training multiplies the skippable update by the gate (every token is computed).
Inference (eval mode, ``inference="skip"``, the default; :func:`tokentune.deploy` uses it unless asked for the capacity execution)
really skips: the MLP runs once on the active rows of the whole batch (flatten to ``(B*N, C)``,
``index_select``, norm2 + MLP, ``index_copy`` of ``x + update`` back); attention gathers the
active tokens of every image, pads to the largest count in the batch with a key mask, and writes
back the same way. Both paths give the same outputs (to float precision), so FLOPs and time
follow the activation rate. Per-forward options, ``model(x, **options)``:

* ``dyt_complete=True``: the *complete model*, every token active (same weights); a bool
  tensor [B] makes only those rows complete (the loss uses one forward on ``cat([x, x])``).
* ``dyt_execution="mask"`` / ``"skip"`` / ``"capacity"``: override the inference path for this forward.

Static shapes (``inference="capacity"``; ``tokentune.deploy(model, dyt_execution="capacity",
dyt_capacity=...)``; not in the paper, a deployment form of ours): the threshold rule's token
counts depend on the data, which costs a host sync per dispatcher and cannot live in a traced
graph. The capacity execution computes a fixed number ``k`` of patch tokens per image and
dispatcher: its top-``k`` by dispatcher logit (:func:`tokentune.core.skip.capacity_index`), of which
the tokens above the threshold get their update (the others keep their input, as if skipped).
``k`` comes from a capacity factor ``f`` (``ceil(f * target_rate * M)`` of ``M`` patch tokens) or
from data (:func:`calibrate_capacity`: a quantile of the per-image active counts of each
dispatcher). **It equals the threshold rule exactly when no image has more tokens above the
threshold than ``k``** (then every active token is among the top ``k``); an image over capacity
drops its lowest-scoring active tokens. Shapes are static: no host sync, ``torch.compile`` with
``fullgraph=True``, ``torch.export``, ONNX with the speed-up inside the graph, CUDA graphs. A row
made complete by a ``dyt_complete`` tensor takes the threshold path.

Schedules (:mod:`.schedule`): the training loop calls :func:`update_schedule` (``model``,
progress in [0, 1]) before each step (the method's ``on_step`` hook, so ``tokentune train`` does
it). It applies the temperature (constant ``tau`` by default, a decay with ``tau_end``;
:func:`set_temperature` / :func:`temperature_at` directly) and records the progress for the
small-data options, all off by default (the reference): ``active_warmup`` (every token active at
the start), ``rate_warmup`` (the rate target falls from 1.0 to ``r``) and ``calibrate_init``.
:func:`calibrate_activation` sets the dispatcher biases to reach a given rate on a batch
(benchmarks of untrained models, ``calibrate_init``).
:func:`tokentune.core.dispatch.activation_stats` gives per-layer and overall rates over a dataset
and per-image masks (for any dispatching method).

DyT + ToMe (``method="dyt+tome"``, MLP Dispatch only): ToMe merges between attention and the
MLP as usual, then the dispatcher sees the *merged* tokens and the MLP runs on the active merged
tokens; the adapter processes all merged tokens. Attention runs on every token, so the ToMe keys,
token sizes and proportional attention are exactly ToMe's; skipping never changes sizes. The
activation rate of a block is taken over its (merged) patch tokens. ToMe has no parameters, so
a DyT model trained without merging can be rebuilt with ``dyt+tome`` and loaded as is. Attention
dispatch cannot merge (skipped tokens have no keys to match).

Losses (:func:`dyt_loss`, the method's ``loss`` hook; reference: models/losses.py and
engine_finetune.py)::

    L = CE(dynamic) + rate_weight * (mean M - r)^2 + complete_weight * CE(complete)
        + distill_weight * KL(softmax(complete).detach() || softmax(dynamic))

with ``mean M`` over dispatchers, patch tokens and images (defaults 2, 1, 1; KL "batchmean").

Parameter names (reference NUS-HPC-AI-Lab/Dynamic-Tuning -> tokentune, ``i`` the block)::

    blocks.{i}.adaptmlp.down_proj.{weight,bias}          blocks.{i}.adapter.down_proj.{weight,bias}
    blocks.{i}.adaptmlp.up_proj.{weight,bias}            blocks.{i}.adapter.up_proj.{weight,bias}
    blocks.{i}.mlp_token_select.mlp_head.{weight,bias}   blocks.{i}.mlp_dispatcher.linear.{weight,bias}
    pre_logits.fc.*                                      (dropped; unused by the reference too)
    everything else (timm ViT names)                     unchanged

Ours only (no reference): ``blocks.{i}.attn_dispatcher.linear.*``, ``blocks.{i}.layer_dispatcher.
linear.*``, ``blocks.{i}.attn_adapter.*``, ``blocks.{i}.layer_adapter.*``, and the MoE adapter
``blocks.{i}.<adapter>.{down_weight,down_bias,up_weight,up_bias,router.weight,router.bias}``.
:func:`from_reference_state_dict` / :func:`to_reference_state_dict` convert between the two.

Files: :mod:`.config` (options), :mod:`.dispatcher` (the dispatcher), :mod:`.method` (apply,
deploy, registration), :mod:`.schedule` (temperature, progress, rate target, calibration),
:mod:`.loss`, :mod:`.reference` (the reference code's checkpoint names and VTAB-1k recipe),
:mod:`.recipes` (our ``dyt-small-data`` recipe).
"""
from ...core.dispatch import (
                     ActivationStats,
                     DispatchRecord,
                     activation_rate,
                     activation_stats,
                     dispatch_records,
                     dispatchers,
)
from .config import EXECUTIONS, TAU_SCHEDULES, VARIANTS, DyTConfig, config_of, validate
from .dispatcher import TokenDispatcher
from .loss import dyt_loss, rate_loss
from .method import apply_dyt, calibrate_capacity, deploy_dyt, trace_options
from .recipes import SMALL_DATA
from .reference import from_reference_state_dict, load_reference_checkpoint, to_reference_state_dict
from .schedule import (
                     calibrate_activation,
                     set_temperature,
                     target_rate_at,
                     temperature_at,
                     training_progress,
                     update_schedule,
                     update_temperature,
)

__all__ = [
    "ActivationStats", "DispatchRecord", "DyTConfig", "EXECUTIONS", "SMALL_DATA", "TAU_SCHEDULES", "TokenDispatcher", "VARIANTS",
    "activation_rate", "activation_stats", "apply_dyt", "calibrate_activation", "calibrate_capacity", "config_of",
    "deploy_dyt",
    "dispatch_records", "dispatchers", "dyt_loss", "from_reference_state_dict", "load_reference_checkpoint",
    "rate_loss", "set_temperature", "target_rate_at", "temperature_at", "to_reference_state_dict",
    "trace_options", "training_progress", "update_schedule", "update_temperature", "validate",
]
