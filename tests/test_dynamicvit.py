"""DynamicViT: the reference code's math on identical weights (training with the same Gumbel draws,
eval with real pruning, the loss), mask == prune, deployment, parameter counts, clear errors."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

import tokentune
from tokentune import TrainConfig
from tokentune.core.reduce import top_order
from tokentune.engine.training import train
from tokentune.errors import TokenTuneError
from tokentune.methods.dynamicvit import DynamicViTReducer, PredictorLG, decisions, dynamicvit_loss, ratio_loss
from tokentune.tools.onnx import export_onnx

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([0, 1, 2])


def _model(method="dynamicvit", seed=0, **kw):
    torch.manual_seed(seed)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, **{**tiny(), **kw}).eval()


def _predictors(model):
    return [b.reduce.predictor for b in model.blocks if isinstance(b.reduce, DynamicViTReducer)]


# ----------------------------------------------------------------------------- the reference's math
def ref_softmax_with_policy(attn, policy, eps=1e-6):
    B, N, _ = policy.size()
    B, H, N, N = attn.size()
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def ref_block(blk, x, policy=None):
    """The reference Block/Attention forward (models/dyvit.py) on a timm block's weights."""
    B, N, C = x.shape
    H = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * blk.attn.scale
    attn = attn.softmax(dim=-1) if policy is None else ref_softmax_with_policy(attn, policy)
    x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    return x + blk.mlp(blk.norm2(x))


def ref_predictor(pred, x, policy):
    x = pred.in_conv(x)
    B, N, C = x.size()
    local_x = x[:, :, :C // 2]
    global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
    return pred.out_conv(x)


def batch_index_select(x, idx):
    B, N, C = x.size()
    N_new = idx.size(1)
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    idx = idx + offset
    return x.reshape(B * N, C)[idx.reshape(-1)].reshape(B, N_new, C)


def ref_dynamicvit(model, images, pruning_loc, token_ratio, training):
    """VisionTransformerDiffPruning.forward (models/dyvit.py), literally, on our model's weights.

    Generalised from the reference's one class token to ``p`` prefix tokens (0 without a class
    token) and, for an average-pooled model (``global_pool="avg"``, timm's fc_norm), the head on
    the average of the kept patch tokens: in training the policy-weighted mean of PredictorLG's
    global feature, ``(x * prev_decision).sum(1) / prev_decision.sum(1)``, after real pruning the
    plain mean of what is left.
    """
    x = model._pos_embed(model.patch_embed(images))
    B = x.shape[0]
    p = model.num_prefix_tokens
    p_count = 0
    out_pred_prob = []
    init_n = x.shape[1] - p
    prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype, device=x.device)
    policy = torch.ones(B, init_n + p, 1, dtype=x.dtype, device=x.device)
    predictors = _predictors(model)
    for i, blk in enumerate(model.blocks):
        if i in pruning_loc:
            spatial_x = x[:, p:]
            pred_score = ref_predictor(predictors[p_count], spatial_x, prev_decision).reshape(B, -1, 2)
            if training:
                hard_keep_decision = F.gumbel_softmax(pred_score, hard=True)[:, :, 0:1] * prev_decision
                out_pred_prob.append(hard_keep_decision.reshape(B, init_n))
                cls_policy = torch.ones(B, p, 1, dtype=hard_keep_decision.dtype, device=hard_keep_decision.device)
                policy = torch.cat([cls_policy, hard_keep_decision], dim=1)
                x = ref_block(blk, x, policy=policy)
                prev_decision = hard_keep_decision
            else:
                score = pred_score[:, :, 0]
                num_keep_node = int(init_n * token_ratio[p_count])
                keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                cls_policy = torch.arange(p, device=keep_policy.device).expand(B, p)
                now_policy = torch.cat([cls_policy, keep_policy + p], dim=1)
                x = batch_index_select(x, now_policy)
                prev_decision = batch_index_select(prev_decision, keep_policy)
                x = ref_block(blk, x)
            p_count += 1
        else:
            x = ref_block(blk, x, policy) if training else ref_block(blk, x)
    x = model.norm(x)
    features = x[:, p:]
    if model.global_pool == "token":
        logits = model.head(x[:, 0])
    elif training:
        logits = model.head(model.fc_norm((features * prev_decision).sum(dim=1) / prev_decision.sum(dim=1)))
    else:
        logits = model.head(model.fc_norm(features.mean(dim=1)))
    if training:
        return logits, features, prev_decision.detach(), out_pred_prob
    return logits, x


def ref_loss(outputs, labels, teacher, keep_ratio, ratio_weight=2.0, distill_weight=0.5, pruning_loc=(1, 2, 3)):
    """DistillDiffPruningLoss_dynamic.forward (losses.py) with dynamic=False, mse_token=True, clf_weight=1."""
    pred, token_pred, mask, out_pred_score = outputs
    pred_loss = 0.0
    for i, score in enumerate(out_pred_score):
        pos_ratio = score.mean(1)
        pred_loss = pred_loss + ((pos_ratio - keep_ratio[i]) ** 2).mean()
    cls_loss = F.cross_entropy(pred, labels)
    cls_t, token_t = teacher
    cls_kl_loss = F.kl_div(F.log_softmax(pred, dim=-1), F.log_softmax(cls_t, dim=-1), reduction="batchmean",
                           log_target=True)
    B, N, C = token_pred.size()
    bool_mask = mask.reshape(B * N) > 0.5
    if mask.sum() < 0.1:
        token_kl_loss = token_pred.new(1,).fill_(0.0)
    else:
        token_t = token_t.reshape(B * N, C)[bool_mask]
        token_pred = token_pred.reshape(B * N, C)[bool_mask]
        token_kl_loss = torch.pow(token_pred - token_t, 2).mean()
    return cls_loss + ratio_weight * pred_loss / len(pruning_loc) + distill_weight * cls_kl_loss + distill_weight * token_kl_loss


RATIOS = [0.7, 0.7 ** 2, 0.7 ** 3]


def test_eval_equals_reference_math_and_really_prunes():
    model = _model()
    with torch.no_grad():
        want, want_tokens = ref_dynamicvit(model, X, [1, 2, 3], RATIOS, training=False)
        got, tokens = model(X, return_tokens=True)
    assert tokens.shape == (3, 1 + 5, 48)                  # 16 -> 11 -> 7 -> 5 patch tokens: a smaller tensor
    assert torch.allclose(tokens, want_tokens, atol=1e-5, rtol=0)     # same tokens in the same order
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_training_equals_reference_math_with_the_same_gumbel_draws():
    model = _model().train()
    torch.manual_seed(11)
    want, want_feat, want_mask, want_probs = ref_dynamicvit(model, X, [1, 2, 3], RATIOS, training=True)
    torch.manual_seed(11)
    got, state, tokens = model(X, return_state=True, return_tokens=True)
    stages = decisions(state)
    assert len(stages) == 3 and all(torch.equal(a, b) for a, b in zip(stages, want_probs))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(tokens[:, 1:], want_feat, atol=1e-5, rtol=0)
    assert 0 < float(stages[-1].detach().mean()) < 1           # some tokens dropped, some kept
    got.sum().backward()                                        # the policy carries gradient to the predictors
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for pred in _predictors(model) for p in pred.parameters())


def _reference_pass(model, rates, seed):
    """The reference's student outputs (training mode, the Gumbel draws of ``seed``) and its unpruned
    teacher's logits and tokens (eval mode), on the same weights."""
    torch.manual_seed(seed)
    outputs = ref_dynamicvit(model, X, [1, 2, 3], rates, training=True)
    with torch.no_grad():
        model.eval()
        t_logits, t_tokens = ref_dynamicvit(model, X, [], rates, training=False)
        model.train()
    return outputs, t_logits, t_tokens


def test_loss_equals_reference_loss():
    model = _model().train()
    outputs, t_logits, t_tokens = _reference_pass(model, RATIOS, seed=7)   # a draw that keeps a token of every image
    want = ref_loss(outputs, Y, (t_logits, t_tokens[:, 1:]), RATIOS)
    torch.manual_seed(7)   # a draw that keeps a token of every image
    got, logs = dynamicvit_loss(model, X, Y, F.cross_entropy)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert set(logs) == {"ce", "ratio_loss", "kept", "kl", "token_mse"} and logs["kl"] > 0 and logs["token_mse"] > 0


def test_an_image_with_every_token_dropped_stays_finite():
    model = _model().train()
    with torch.no_grad():                       # the first predictor drops everything
        _predictors(model)[0].out_conv[4].bias.copy_(torch.tensor([-50.0, 50.0]))
    loss, logs = dynamicvit_loss(model, X, Y, F.cross_entropy)
    assert torch.isfinite(loss) and logs["kept"] == 0.0 and logs["token_mse"] == 0.0


def test_mask_execution_equals_pruning_and_deploy_equals_eval():
    model = _model("lora+dynamicvit", dynamicvit_inference="mask")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        masked, state, tokens = model(X, return_state=True, return_tokens=True)
        assert tokens.shape[1] == 17 and int(state.policy.sum()) == 3 * (1 + 5)
        pruned = model(X, dynamicvit_execution="prune")
        assert torch.allclose(masked, pruned, atol=1e-4, rtol=0)      # the same up to the masked softmax's eps
        deployed = tokentune.deploy(model)
        assert torch.allclose(deployed(X), pruned, atol=1e-5, rtol=0)
        assert deployed(X, return_tokens=True)[1].shape[1] == 6


@pytest.mark.parametrize("class_token", [True, False])
def test_average_pooled_models_equal_reference_math_in_training_eval_and_deployment(class_token):
    """global_pool="avg" (timm's fc_norm), with or without a class token: training pools the kept
    tokens (policy-weighted, the same Gumbel draws as the reference), eval pools what real pruning
    left, the masked and deployed forms agree with it, and the loss is the reference loss."""
    kw = dict(global_pool="avg", class_token=class_token)
    model = _model("lora+dynamicvit", **kw)
    p = 1 if class_token else 0
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.05)
        want, want_tokens = ref_dynamicvit(model, X, [1, 2, 3], RATIOS, training=False)
        got, tokens = model(X, return_tokens=True)
        assert tokens.shape == (3, p + 5, 48)                  # 16 -> 11 -> 7 -> 5 patch tokens
        assert torch.allclose(tokens, want_tokens, atol=1e-5, rtol=0)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        masked, state = model(X, return_state=True, dynamicvit_execution="mask")
        assert int(state.policy.sum()) == 3 * (p + 5)
        assert torch.allclose(masked, got, atol=1e-4, rtol=0)          # the masked softmax's eps only
        assert torch.allclose(tokentune.deploy(model)(X), got, atol=1e-5, rtol=0)
    model = _model("lora+dynamicvit", **kw).train()
    torch.manual_seed(3)     # draws that keep a token of every image (the reference's 0/0 otherwise)
    want, want_feat, want_mask, want_probs = ref_dynamicvit(model, X, [1, 2, 3], RATIOS, training=True)
    torch.manual_seed(3)
    got, state, tokens = model(X, return_state=True, return_tokens=True)
    stages = decisions(state)
    assert all(torch.equal(a, b) for a, b in zip(stages, want_probs))
    assert 0 < float(stages[-1].detach().mean()) < 1                            # dropped tokens are left out of the pool
    assert torch.allclose(tokens[:, p:], want_feat, atol=1e-5, rtol=0)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    unmasked = model.head(model.fc_norm(tokens[:, p:].mean(dim=1)))
    assert (got - unmasked).abs().max() > 1e-3                          # ... which changes the logits
    got.sum().backward()                                                # the policy carries gradient to the predictors
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for pred in _predictors(model) for prm in pred.parameters())
    # the loss: the teacher pools every token, the token MSE is over the kept patch tokens
    outputs, t_logits, t_tokens = _reference_pass(model, RATIOS, seed=3)
    # the reference's token MSE is after the final LayerNorm, which an average-pooled timm ViT applies after pooling
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    outputs = (outputs[0], model.fc_norm(outputs[1])) + tuple(outputs[2:])
    want = ref_loss(outputs, Y, (t_logits, model.fc_norm(t_tokens[:, p:])), RATIOS)
    torch.manual_seed(3)
    got, logs = dynamicvit_loss(model, X, Y, F.cross_entropy)
    assert torch.allclose(got, want, atol=1e-5, rtol=0) and logs["token_mse"] > 0


def test_an_average_pooled_image_with_every_token_dropped_stays_finite():
    model = _model(global_pool="avg", class_token=False).train()
    with torch.no_grad():
        _predictors(model)[0].out_conv[4].bias.copy_(torch.tensor([-50.0, 50.0]))
    loss, logs = dynamicvit_loss(model, X, Y, F.cross_entropy)
    assert torch.isfinite(loss) and logs["kept"] == 0.0


@pytest.mark.parametrize("detach", [False, True])
def test_detach_input_keeps_the_decisions_gradient_out_of_the_tuned_weights(detach):
    """The ratio loss depends on the decisions only: it trains the predictors either way, and reaches
    the LoRA weights before the first pruning block only when the predictors' input is not detached."""
    model = _model("lora+dynamicvit", dynamicvit_detach_input=detach).train()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.05)
    torch.manual_seed(3)
    _, state = model(X, return_state=True)
    ratio_loss(state, 0.7).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for pred in _predictors(model) for p in pred.parameters())
    lora = [p.grad for n, p in model.named_parameters() if n.startswith("blocks.0.") and "lora_" in n]
    reached = any(g is not None and g.abs().sum() > 0 for g in lora)
    assert reached != detach
    with torch.no_grad():                                         # the forward is the same
        torch.manual_seed(5)
        a = model(X)
        model.blocks[1].reduce.detach_input = not detach
        torch.manual_seed(5)
        assert torch.allclose(model(X), a, atol=1e-6, rtol=0)


def test_a_list_of_keep_rates_equals_reference_math_and_loss():
    """The reference's token_ratio as any list (e.g. 0.9, 0.7, 0.5): pruning and the ratio loss's targets."""
    rates = [0.9, 0.7, 0.5]
    model = _model(dynamicvit_keep_rates=rates)
    with torch.no_grad():
        want, want_tokens = ref_dynamicvit(model, X, [1, 2, 3], rates, training=False)
        got, tokens = model(X, return_tokens=True)
    assert tokens.shape == (3, 1 + 8, 48)                   # 16 -> 14 -> 11 -> 8 patch tokens
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    model.train()
    outputs, t_logits, t_tokens = _reference_pass(model, rates, seed=7)
    want = ref_loss(outputs, Y, (t_logits, t_tokens[:, 1:]), rates)
    torch.manual_seed(7)
    got, _ = dynamicvit_loss(model, X, Y, F.cross_entropy)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_keep_rate_one_keeps_every_token():
    plain, full = _model("full"), _model(dynamicvit_keep_rate=1.0)
    with torch.no_grad():
        assert torch.allclose(full(X), plain(X), atol=1e-5, rtol=0)


def test_parameters_are_counted_as_the_paper_counts_them():
    assert sum(p.numel() for p in PredictorLG(768).parameters()) == 961_730      # x3 = DyT's 88.70M - 85.80M
    model = _model("adapter+dynamicvit")
    counts = tokentune.count_parameters(model)
    per_stage = sum(p.numel() for p in PredictorLG(48).parameters())
    assert counts["per_method"]["dynamicvit"] == 3 * per_stage
    assert counts["paper_trainable"] == 3 * per_stage + counts["per_method"]["adapter"]


def test_trains_with_the_training_loop():
    model = _model("adapter+dynamicvit").train()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 5)
    before = [p.detach().clone() for p in _predictors(model)[0].parameters()]
    train(model, data, None, TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup_epochs=0, num_workers=0), log=None)
    assert any(not torch.equal(a, b) for a, b in zip(before, _predictors(model)[0].parameters()))


@pytest.mark.parametrize("options, match", [
    (dict(dynamicvit_keep_rate=0.0), r"dynamicvit_keep_rate=0.0.*\(0, 1\]"),
    (dict(dynamicvit_keep_rate=1.2), r"dynamicvit_keep_rate=1.2.*\(0, 1\]"),
    (dict(dynamicvit_locations=[2, 5]), r"block 5 but the model has 4 blocks"),
    (dict(dynamicvit_tau=0.0), r"Gumbel temperature"),
    (dict(dynamicvit_keep_rate=0.2), r"keeps int\(16 x 0.2\^3\) = 0 of the 16 patch tokens"),
    (dict(dynamicvit_locations=[2, 1]), r"increasing"),
    (dict(global_pool="max"), r"pools with global_pool='max'; use global_pool='token' or 'avg'"),
    (dict(dynamicvit_keep_rates=[0.5, 0.7, 0.9]), r"dynamicvit_keep_rates=\[0.5, 0.7, 0.9\].*non-increasing"),
    (dict(dynamicvit_keep_rates=[0.9, 0.7]), r"has 2 shares for 3 pruning locations"),
    (dict(dynamicvit_keep_rates=[0.9, 0.5, 0.01]), r"dynamicvit_keep_rates ends at 0.01: it keeps int\(16 x 0.01\) = 0"),
])
def test_bad_options_fail_in_one_line(options, match):
    with pytest.raises(TokenTuneError, match=match) as e:
        _model(**options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["dynamicvit+dyt", "dynamicvit+tome", "evit+dynamicvit", "dynamicvit+pyra"])
def test_does_not_compose_with_other_reducers(spec):
    with pytest.raises(TokenTuneError, match="both reduce tokens and cannot be combined") as e:
        _model(spec)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- ties: eager == exported graph
def test_top_order_breaks_ties_by_the_lower_index():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 3, (4, 64), generator=g).float().neg()          # many equal scores
    want = [sorted(range(64), key=lambda i, row=row: (-float(row[i]), i))[:40] for row in score]
    assert top_order(score, 40).tolist() == want


def test_saturated_predictors_keep_the_same_tokens_in_onnxruntime(tmp_path):
    """Keep log-probabilities of exactly 0 for every token (a saturated predictor) tie: eager and
    onnxruntime's TopK must keep the same tokens (the lower indices), so the logits agree."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model("lora+dynamicvit", img_size=64)                       # 64 patches: torch's sort is unstable there
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        for predictor in _predictors(model):
            predictor.out_conv[4].bias.copy_(torch.tensor([40.0, -40.0]))   # log p(keep) == 0.0 exactly
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert bool((_predictors(model)[0](torch.randn(3, 64, 48), torch.ones(3, 64, 1))[:, :, 0] == 0).all())
        want = tokentune.deploy(model)(x)
    path = export_onnx(model, tmp_path / "m.onnx", verify=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
