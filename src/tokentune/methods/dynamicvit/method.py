"""DynamicViT's options, how it is applied, its training loss and its registration."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...core.method import Method, register_method
from ...core.reduce import reducers
from ...core.vit import adapted_blocks, info_of, num_input_tokens, num_prefix
from ...errors import TokenTuneError
from ...typecheck import check_fields
from ..pruning import check_keep_rate, check_locations
from .predictor import EXECUTIONS, DynamicViTReducer, decisions

TRAINABLE = r"\.reduce\.predictor\."

# The heads DynamicViT can pool with: the class token (DeiT, the paper's ViTs) or the average of the
# tokens still kept ("avg": core.vit's weighted_avg_pool hides the dropped ones in training).
POOLS = ("token", "avg")


@dataclass
class DynamicViTConfig:
    """DynamicViT options (defaults: the reference's DeiT setting, ``--base_rate 0.7``).

    Attributes:
        keep_rate: rho; stage k keeps rho^k of the patch tokens (0.7: 70%, 49%, 34%).
        keep_rates: instead of rho^k, the share of the patch tokens each stage keeps, one per
            location, non-increasing (the reference's ``token_ratio`` list, e.g. 0.9,0.7,0.5); the
            ratio loss targets them too. None: keep_rate^1, keep_rate^2, ...
        locations: blocks before which a prediction module prunes (0-based); None = a quarter, half
            and three quarters of the depth (3, 6, 9 for 12 blocks, the reference's
            ``pruning_loc``).
        ratio_weight: weight of the keep-ratio loss (reference: 2.0 for DeiT-S, 5.0 for DeiT-B).
        distill_weight: weight of each distillation loss, the KL on the logits and the MSE on
            the kept tokens, against the unpruned teacher (reference 0.5; 0 skips the teacher).
        tau: Gumbel-softmax temperature of the training decisions (reference 1).
        inference: in eval mode, ``"prune"`` gathers the kept tokens (real speed-up, the
            reference); ``"mask"`` keeps every token and hides the dropped ones in attention.
        detach_input: the prediction modules read the tokens without passing gradient back to
            them, so the keep decisions train the predictors only, not the tuned weights before
            them. The reference passes it (False), but trains the backbone at 1/100 of the
            predictors' learning rate (its ``--lr_scale 0.01``), which keeps that gradient small;
            with LoRA at the predictors' learning rate it threw the demo's training to chance
            (True: 75.9%; see docs/baselines.md).
    """

    keep_rate: float = 0.7
    keep_rates: Optional[Sequence[float]] = None
    locations: Optional[Sequence[int]] = None
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    tau: float = 1.0
    inference: str = "prune"
    detach_input: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "dynamicvit_")
        check_keep_rate("dynamicvit", self.keep_rate)
        if self.keep_rates is not None:
            rates = [float(r) for r in self.keep_rates]
            if not rates or not all(0.0 < r <= 1.0 for r in rates) or any(b > a for a, b in zip(rates, rates[1:])):
                raise TokenTuneError(f"invalid dynamicvit_keep_rates={rates}: give one share of the patch tokens in "
                                     "(0, 1] per location, non-increasing (e.g. 0.9,0.7,0.5)")
        if self.ratio_weight < 0 or self.distill_weight < 0:
            raise TokenTuneError(f"dynamicvit loss weights must be >= 0, got ratio_weight={self.ratio_weight}, "
                                 f"distill_weight={self.distill_weight}")
        if not self.tau > 0:
            raise TokenTuneError(f"invalid dynamicvit_tau={self.tau}: the Gumbel temperature must be positive")
        if self.inference not in EXECUTIONS:
            raise TokenTuneError(f"invalid dynamicvit_inference={self.inference!r}; choose from {', '.join(EXECUTIONS)}")


def apply_dynamicvit(model: nn.Module, cfg: DynamicViTConfig, ctx) -> DynamicViTConfig:
    blocks = adapted_blocks(model)
    locations = check_locations("dynamicvit", cfg.locations, len(blocks))
    pool = getattr(model, "global_pool", "token")
    if pool not in POOLS or getattr(model, "attn_pool", None) is not None:
        raise TokenTuneError(f"DynamicViT classifies from the class token or the average of the kept tokens, and this "
                             f"model pools with global_pool={pool!r}; use global_pool='token' or 'avg'")
    patches = num_input_tokens(model) - num_prefix(model)
    rates = stage_rates(cfg, len(locations))
    if int(patches * rates[-1]) < 1:      # the last stage's int(n0 rho^S) at eval
        what = (f"dynamicvit_keep_rate={cfg.keep_rate} keeps int({patches} x {cfg.keep_rate}^{len(locations)})"
                if cfg.keep_rates is None
                else f"dynamicvit_keep_rates ends at {rates[-1]}: it keeps int({patches} x {rates[-1]})")
        raise TokenTuneError(f"{what} = 0 of the {patches} patch tokens after the last stage; raise the keep rate or use "
                             "fewer dynamicvit_locations")
    dim = int(model.embed_dim)
    like = blocks[0].param_like()
    for stage, i in enumerate(locations):
        blocks[i].reduce = DynamicViTReducer(i, stage, rates[stage], dim, cfg.tau, cfg.inference,
                                            cfg.detach_input).to(**like)
    cfg = replace(cfg, locations=list(locations))
    model.tokentune.state["dynamicvit"] = cfg
    return cfg


def deploy_dynamicvit(model: nn.Module) -> None:
    """Deployment: eval mode gathers the kept tokens (whatever ``inference`` was)."""
    for r in reducers(model):
        if isinstance(r, DynamicViTReducer):
            r.execution = "prune"


def config_of(model: nn.Module) -> DynamicViTConfig:
    info = info_of(model)
    cfg = info.state.get("dynamicvit") if info is not None else None
    if cfg is None:
        raise TokenTuneError("this model has no DynamicViT; build it with method='dynamicvit'")
    return cfg


def stage_rates(cfg: DynamicViTConfig, stages: int) -> List[float]:
    """The share of the patch tokens each of ``stages`` stages keeps: ``keep_rates``, or rho^1, rho^2, ..."""
    if cfg.keep_rates is None:
        return [cfg.keep_rate ** (k + 1) for k in range(stages)]
    if len(cfg.keep_rates) != stages:
        raise TokenTuneError(f"dynamicvit_keep_rates has {len(cfg.keep_rates)} shares for {stages} pruning locations; "
                             "give one per location")
    return [float(r) for r in cfg.keep_rates]


def ratio_loss(state, keep_rate: Union[float, Sequence[float]]) -> torch.Tensor:
    """``sum_k mean_b (mean_i D_k,bi - rho_k)^2`` over the stages (reference, not yet divided by the stage
    count); ``keep_rate`` is rho (rho_k = rho^k) or the list of the stages' shares."""
    stages = decisions(state)
    targets = ([keep_rate ** (k + 1) for k in range(len(stages))] if isinstance(keep_rate, (int, float))
               else list(keep_rate))
    terms = [((hard.mean(dim=1) - target) ** 2).mean() for target, hard in zip(targets, stages)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def final_token_norm(model: nn.Module) -> Optional[nn.Module]:
    """The final LayerNorm the token MSE still has to apply, or None.

    The reference's token MSE compares the tokens after the ViT's final LayerNorm (``self.norm``).
    An average-pooled timm ViT (``fc_norm``, MAE's layout) has no norm there (``norm`` is the
    identity) and applies that LayerNorm after pooling instead; its tokens are the raw residual
    stream, whose scale grows with training, and an MSE on them swamped the loss (on the demo the
    model stayed at chance). So the tokens pass through ``fc_norm`` first: they are compared at
    the same place as in the reference, the final LayerNorm.
    """
    if isinstance(getattr(model, "norm", None), nn.Identity) and not isinstance(getattr(model, "fc_norm", None),
                                                                                (nn.Identity, type(None))):
        return model.fc_norm
    return None


def dynamicvit_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                    criterion) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DynamicViT's training loss (the method's ``loss`` hook; reference ``DistillDiffPruningLoss_dynamic``
    with ``mse_token=True``, the DeiT setting)::

        L = CE + ratio_weight / S * sum_k (mean D_k - rho^k)^2
              + distill_weight * KL(teacher || student) + distill_weight * MSE(kept tokens, teacher tokens)

    The teacher is the model itself without pruning, in eval mode, without gradient (see the
    package docstring for why); the token MSE is over the patch tokens the last stage keeps, after
    the final LayerNorm (:func:`final_token_norm`).
    """
    cfg = config_of(model)
    logits, state, tokens = model(images, return_state=True, return_tokens=True)
    ce = criterion(logits, targets)
    stages = decisions(state)
    loss = ce
    logs: Dict[str, float] = {"ce": float(ce.detach())}
    if stages:
        l_ratio = ratio_loss(state, stage_rates(cfg, len(stages)))
        loss = loss + cfg.ratio_weight * l_ratio / len(stages)
        logs.update(ratio_loss=float(l_ratio.detach()), kept=float(stages[-1].detach().mean()))
    if cfg.distill_weight > 0:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                t_logits, t_tokens = model(images, return_tokens=True, dynamicvit_prune=False)
        finally:
            model.train(was_training)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(t_logits, dim=-1), reduction="batchmean",
                      log_target=True)
        p = state.num_prefix
        student, teacher = tokens[:, p:], t_tokens[:, p:]
        final_norm = final_token_norm(model)
        if final_norm is not None:
            student, teacher = final_norm(student), final_norm(teacher)
        B, N, C = student.shape
        keep = (stages[-1].detach() if stages else student.new_ones(B, N)).reshape(B * N) > 0.5
        token_loss = ((student.reshape(B * N, C)[keep] - teacher.reshape(B * N, C)[keep]).pow(2).mean()
                      if bool(keep.any()) else student.new_zeros(()))
        loss = loss + cfg.distill_weight * kl + cfg.distill_weight * token_loss
        logs.update(kl=float(kl.detach()), token_mse=float(token_loss.detach()))
    return loss, logs


# Not training-free (``tokentune accelerate`` does not offer it): its keep/drop predictors are trained.
register_method(Method(
    "dynamicvit", DynamicViTConfig, apply_dynamicvit, trainable=(TRAINABLE,), order=22, reduces_tokens=True,
    default_peft="full", deploy=deploy_dynamicvit, loss=dynamicvit_loss,
    summary="DynamicViT: prediction modules drop rho, rho^2, rho^3 of the tokens (Gumbel decisions in training)"))
