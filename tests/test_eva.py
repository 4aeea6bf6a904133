"""timm's Eva family (EVA-02, DINOv3, vit_*_rope_*: rotary position embeddings) with every method.

Identity settings equal timm's own Eva forward; the rotary rows travel with the tokens through
merging (ToMe, PYRA), pruning (EViT, DynamicViT, DiffRate) and DyT's gathers, checked against
literal forwards written on timm's own Eva submodules (timm's attention takes a per-image rotary
table, so the literal forwards run timm's attention on the rows the rule says).
"""
import math

import pytest
import timm
import torch
from conftest import randomize_dyt, randomize_lora
from safetensors.torch import save_file
from timm.layers import apply_rot_embed_cat

import tokentune
from tokentune.core.block import AdaptedEvaBlock
from tokentune.errors import TokenTuneError
from tokentune.methods import dyt
from tokentune.methods.diffrate import DiffRateSearchReducer
from tokentune.methods.lora import LoRALinear, load_peft, save_peft
from tokentune.tools.export import export_deployed
from tokentune.tools.program import export_program

# name, timm keywords: one small model per kind of block / rotary table
FAMILIES = {
    # fused qkv with q/v biases, packed SwiGLU (GluMlp), RoPE 'cat', average pool
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, depth=3, embed_dim=48, num_heads=3)),
    # separate q/k/v projections, SwiGLU with fc1_g/fc1_x and its norm, RoPE 'cat'
    "eva02_swiglu": ("eva02_base_patch14_224", dict(img_size=56, depth=3, embed_dim=48, num_heads=3)),
    # AttentionRope, LayerScale, CLS pooling (RoPE-ViT axial)
    "rope": ("vit_small_patch16_rope_224", dict(img_size=64, depth=3, embed_dim=48, num_heads=3)),
    # mixed RoPE: learned per-block, per-head frequencies
    "mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, depth=3, embed_dim=48, num_heads=3)),
    # DINOv3: 4 registers, rotate-half layout, DINOv3's coordinates, dynamic image size
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64, depth=3, embed_dim=48, num_heads=3)),
    # Perception Encoder: pre-norm, attention-pool head over every token (CLS included)
    "pe": ("vit_pe_core_tiny_patch16_384", dict(img_size=64, depth=3, embed_dim=48, num_heads=3)),
}


def _images(family, batch=2, seed=0):
    size = FAMILIES[family][1]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _spread(model, backbone=True):
    """LayerScale at 1e-5 and the head at 1e-3 (timm's Eva init) would hide every difference below
    the tolerances; give them values near 1. Queries and keys are scaled up so that attention is
    peaked and the rotary positions matter (near-uniform attention would hide wrong rows)."""
    for name, p in model.named_parameters():
        if backbone and name.endswith(("gamma_1", "gamma_2")):
            p.uniform_(0.5, 1.5)
        elif backbone and name.endswith(("attn.qkv.weight", "attn.q_proj.weight", "attn.k_proj.weight")):
            p.mul_(6.0)
        elif name == "head.weight":
            p.normal_(0, 1.0 / math.sqrt(p.shape[1]))


def _model(family, method, **options):
    name, kw = FAMILIES[family]
    options = dict(kw, **options)
    model = tokentune.create_model(name, method=method, num_classes=5, **options).eval()
    _spread(model)
    return model


def _twin(model, family, **kw):
    """timm's own Eva with the backbone weights of ``model``."""
    name, base = FAMILIES[family]
    ref = timm.create_model(name, num_classes=5, **dict(base, **kw)).eval()
    missing, _ = ref.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    return ref


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=0), float((a - b).abs().max())


# ----------------------------------------------------------------------------- identity == timm
IDENTITY = [("lora", {}, {}), ("lora+tome", {"tome_r": 0}, {}), ("dyt", {}, {"dyt_complete": True}),
            ("adapter", {}, {}), ("lora+evit", {"evit_keep_rate": 1.0}, {})]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method,options,forward", IDENTITY, ids=[m for m, _, _ in IDENTITY])
def test_identity_settings_equal_timm(family, method, options, forward):
    model = _model(family, method, **options)
    assert all(isinstance(b, AdaptedEvaBlock) for b in model.blocks)
    ref = _twin(model, family)
    x = _images(family)
    with torch.no_grad():
        want = ref(x)
        _close(model(x, **forward), want)
        _close(tokentune.deploy(model)(x, **forward), want)


def test_every_token_kept_in_another_order_equals_timm():
    """DynamicViT at keep rate 1 reorders the tokens by score: the rotary rows must follow them."""
    model = _model("dinov3", "lora+dynamicvit", dynamicvit_keep_rate=1.0, global_pool="token")
    ref = _twin(model, "dinov3", global_pool="token")
    x = _images("dinov3")
    with torch.no_grad():
        _, state = model(x, return_state=True)
        assert state.rope_pos is not None
        assert not torch.equal(state.rope_pos[:, 5:], torch.arange(16).expand(2, 16))     # really reordered
        _close(model(x), ref(x))


def test_plain_lora_deploys_to_timm_eva_and_round_trips():
    model = _model("eva02_swiglu", "lora", lora_targets=("qkv", "proj", "fc1", "fc2"))
    randomize_lora(model)
    deployed = tokentune.deploy(model)
    assert type(deployed) is timm.models.eva.Eva
    assert type(deployed.blocks[0]) is timm.models.eva.EvaBlock and isinstance(deployed.blocks, torch.nn.ModuleList)
    x = _images("eva02_swiglu")
    with torch.no_grad():
        _close(deployed(x), model(x))
        assert (model(x) - _twin(model, "eva02_swiglu")(x)).abs().max() > 1e-3    # the LoRA does something


def test_attention_pool_weights_a_merged_token_as_its_copies():
    """Eva's attention pool attends over every token, prefix included; over merged tokens with
    sizes it equals timm's pool over every token repeated size times."""
    model = _model("pe", "lora+tome", tome_r=[4, 3, 2])
    x = _images("pe")
    with torch.no_grad():
        tokens, state = model.forward_tokens(x)
        assert int(state.size.max()) > 1
        ours = model.forward_head_sized(tokens, state, pre_logits=True)
        copies = [torch.repeat_interleave(tokens[b], state.size[b, :, 0].round().long(), dim=0) for b in range(2)]
        theirs = torch.stack([model.fc_norm(model.attn_pool(c[None]))[0] for c in copies])
        _close(ours, theirs)
        assert (ours - model.attn_pool(tokens)).abs().max() > 1e-4        # the sizes matter


# ----------------------------------------------------------------------------- LoRA on Eva's layers
@pytest.mark.parametrize("family,targets,layers", [
    ("eva02", ("qkv",), ["attn.qkv"]),                                   # fused, biases beside it
    ("eva02_swiglu", ("qkv",), ["attn.q_proj", "attn.k_proj", "attn.v_proj"]),
    ("eva02_swiglu", ("fc1", "fc2"), ["mlp.fc1_g", "mlp.fc1_x", "mlp.fc2"]),
    ("eva02", ("fc1", "proj"), ["attn.proj", "mlp.fc1"]),                # GluMlp: one packed fc1
    ("dinov3", ("q_proj",), None),                                      # fused qkv: no q_proj
])
def test_lora_targets_map_onto_eva_layers_and_merge(family, targets, layers):
    if layers is None:
        with pytest.raises(TokenTuneError, match="no Linear 'attn.q_proj'.*qkv") as info:
            _model(family, "lora", lora_targets=targets)
        assert "\n" not in str(info.value)
        return
    model = _model(family, "lora", lora_targets=targets)
    randomize_lora(model, scale=0.2)
    got = sorted(n[len("blocks.0."):-len(".lora_A")] for n, _ in model.named_parameters()
                 if n.startswith("blocks.0.") and n.endswith("lora_A"))
    assert got == sorted(layers)
    x = _images(family)
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - _twin(model, family)(x)).abs().max() > 1e-3
        _close(tokentune.deploy(model)(x), unmerged, 1e-4)


# ----------------------------------------------------------------------------- literal forwards
def _literal_start(ref, x):
    tokens, rot = ref._pos_embed(ref.patch_embed(x))
    tokens = ref.norm_pre(tokens)
    grid = rot.shape[-2]
    return tokens, rot, torch.arange(grid).expand(x.shape[0], grid)


def _rows(ref, rot, i, pos):
    """timm's rotary rows of block ``i`` for patch positions ``pos`` [B, n] (grid rows; ``grid`` = none)."""
    table = rot[i] if ref.rope_mixed else rot                                   # [H, G, E] or [G, E]
    E = table.shape[-1]
    ident = torch.cat([torch.zeros(E // 2), torch.ones(E // 2)]).expand(*table.shape[:-2], 1, E)
    table = torch.cat([table, ident], dim=-2)                                   # row G: no rotation
    rows = table[..., pos, :]                                                   # [(H,) B, n, E]
    return rows.movedim(-3, 0) if ref.rope_mixed else rows.unsqueeze(1)


def _literal_mlp(blk, x):
    h = blk.mlp(blk.norm2(x))
    return x + (h if blk.gamma_2 is None else blk.gamma_2 * h)


def _literal_attn(blk, x, rows, mask=None):
    h = blk.attn(blk.norm1(x), rope=rows, attn_mask=mask)
    return x + (h if blk.gamma_1 is None else blk.gamma_1 * h)


def _qk(attn, y, rows=None, p=0):
    """Queries and keys of timm's Eva attention, written out (before rotation unless ``rows``)."""
    B, N, _ = y.shape
    if attn.qkv is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, "q_bias", None) is not None else None
        qkv = torch.nn.functional.linear(y, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
        q, k, _ = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(y).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(y).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rows is not None:
        half = attn.rotate_half
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rows, half=half)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rows, half=half)], dim=2)
    return q, k


def _tome_step(x, keys, size, pos, r, p):
    """One ToMe step image by image (as tests/test_tome.py's slow step) with the rotary rule: a
    destination keeps its own position, its sources fold into it."""
    out_x, out_size, out_pos = [], [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        k = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        best = sorted(((max((float(k[i] @ k[j]), j) for j in b_idx if j >= p), i) for i in a_idx if i >= p),
                      key=lambda t: -t[0][0])
        merged = {i: j for (_, j), i in best[:r]}
        tok = {i: x[b, i] * size[b, i] for i in range(n)}
        sz = {i: size[b, i].clone() for i in range(n)}
        for i, j in merged.items():
            tok[j], sz[j] = tok[j] + tok[i], sz[j] + sz[i]
        order = list(range(p)) + [i for i in a_idx if i >= p and i not in merged] + [j for j in b_idx if j >= p]
        out_x.append(torch.stack([tok[i] / sz[i] for i in order]))
        out_size.append(torch.stack([sz[i] for i in order]))
        out_pos.append(torch.stack([pos[b, i - p] for i in order[p:]]))
    return torch.stack(out_x), torch.stack(out_size), torch.stack(out_pos)


def _literal_tome_head(ref, tokens, size):
    """timm's head; an average pool as ToMe's MAE patch: ``(x * size)[:, p:].sum(1) / patches``."""
    tokens = ref.norm(tokens)
    if ref.global_pool != "avg":
        return ref.forward_head(tokens)
    p = ref.num_prefix_tokens
    pooled = (tokens[:, p:] * size[:, p:]).sum(dim=1) / size[:, p:].sum(dim=1)
    return ref.head(ref.head_drop(ref.fc_norm(pooled)))


@torch.no_grad()
def _literal_tome(ref, x, schedule):
    tokens, rot, pos = _literal_start(ref, x)
    p = ref.num_prefix_tokens
    size = torch.ones(*tokens.shape[:2], 1)
    for i, blk in enumerate(ref.blocks):
        y = blk.norm1(tokens)
        keys = _qk(blk.attn, y)[1].mean(1)                                   # matching: keys before rotation
        tokens = _literal_attn(blk, tokens, _rows(ref, rot, i, pos), mask=size.log()[:, None, None, :, 0])
        if schedule[i]:
            tokens, size, pos = _tome_step(tokens, keys, size, pos, schedule[i], p)
        tokens = _literal_mlp(blk, tokens)
    return _literal_tome_head(ref, tokens, size)


@pytest.mark.parametrize("family", ["eva02", "rope", "mixed", "dinov3"])
def test_tome_equals_literal_merging_with_the_rotary_rule(family):
    model = _model(family, "lora+tome", tome_r=[4, 3, 2])
    randomize_lora(model)
    x = _images(family)
    with torch.no_grad():
        got, state = model(x, return_state=True)
        merged = tokentune.deploy(model)
        ref = _twin(merged, family)
        want = _literal_tome(ref, x, [4, 3, 2])
        unrotated = _literal_tome_without_rows(ref, x, [4, 3, 2])
    assert state.rope_pos.shape == (2, 16 - 9 + ref.num_prefix_tokens)
    _close(got, want, 1e-4)
    _close(merged(x), want, 1e-4)
    assert (unrotated - want).abs().max() > 1e-3           # the rule is tested: positions change the output


def _literal_tome_without_rows(ref, x, schedule):
    """The same merging with the rotary rows left in grid order (a plausible bug)."""
    tokens, rot, pos = _literal_start(ref, x)
    p = ref.num_prefix_tokens
    size = torch.ones(*tokens.shape[:2], 1)
    for i, blk in enumerate(ref.blocks):
        keys = _qk(blk.attn, blk.norm1(tokens))[1].mean(1)
        n = tokens.shape[1] - p
        tokens = _literal_attn(blk, tokens, _rows(ref, rot, i, torch.arange(n).expand(x.shape[0], n)),
                               mask=size.log()[:, None, None, :, 0])
        if schedule[i]:
            tokens, size, pos = _tome_step(tokens, keys, size, pos, schedule[i], p)
        tokens = _literal_mlp(blk, tokens)
    return _literal_tome_head(ref, tokens, size)


@torch.no_grad()
def _literal_dynamicvit(model, ref, x):
    """DynamicViT's eval pruning on timm's Eva blocks: before each pruning block, keep the
    int(n0 rho^k) patch tokens the predictor scores highest, with their rotary rows."""
    tokens, rot, pos = _literal_start(ref, x)
    p = ref.num_prefix_tokens
    n0 = pos.shape[1]
    for i, (blk, ours) in enumerate(zip(ref.blocks, model.blocks)):
        if ours.reduce is not None:
            score = ours.reduce.predictor(tokens[:, p:], torch.ones(*pos.shape, 1))[:, :, 0]
            keep = score.topk(int(n0 * ours.reduce.ratio), dim=1).indices
            tokens = torch.cat([tokens[:, :p], tokens[:, p:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))], 1)
            pos = pos.gather(1, keep)
        tokens = _literal_mlp(blk, _literal_attn(blk, tokens, _rows(ref, rot, i, pos)))
    return ref.forward_head(ref.norm(tokens))


@torch.no_grad()
def _literal_evit(model, ref, x, fuse=True):
    """EViT on timm's Eva blocks: keep the top tokens by CLS attention (computed from the rotated
    queries and keys), fuse the others into one token that has no rotation. ``fuse=False`` with a
    DiffRate model: keep its ``prune_kept`` tokens by CLS attention, drop the rest."""
    tokens, rot, pos = _literal_start(ref, x)
    p, grid = ref.num_prefix_tokens, rot.shape[-2]
    for i, (blk, ours) in enumerate(zip(ref.blocks, model.blocks)):
        rows = _rows(ref, rot, i, pos)
        y = blk.norm1(tokens)
        q, k = _qk(blk.attn, y, rows, p)
        cls = ((q[:, :, :1] * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)[:, p:]
        tokens = _literal_attn(blk, tokens, rows)
        if ours.reduce is not None and not fuse:
            keep = cls.topk(ours.reduce.prune_kept - p, dim=1).indices
            tokens = torch.cat([tokens[:, :p], tokens[:, p:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))], 1)
            pos = pos.gather(1, keep)
        elif ours.reduce is not None:
            n = tokens.shape[1] - p
            left = math.ceil(ours.reduce.keep_rate * n)
            keep = cls.topk(left, dim=1).indices
            dropped = torch.ones_like(cls, dtype=torch.bool).scatter(1, keep, False)
            fused = torch.stack([(tokens[b, p:][dropped[b]] * cls[b][dropped[b]][:, None]).sum(0)
                                 for b in range(tokens.shape[0])])[:, None]
            kept = tokens[:, p:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :p], kept, fused], dim=1)
            pos = torch.cat([pos.gather(1, keep), torch.full((pos.shape[0], 1), grid)], dim=1)
        tokens = _literal_mlp(blk, tokens)
    return ref.forward_head(ref.norm(tokens))


@pytest.mark.parametrize("family", ["rope", "dinov3", "mixed"])
def test_dynamicvit_pruning_gathers_the_rotary_rows(family):
    model = _model(family, "lora+dynamicvit", dynamicvit_keep_rate=0.7, dynamicvit_locations=[1, 2],
                   global_pool="token")
    with torch.no_grad():                                           # predictors that disagree with the order
        for blk in model.blocks:
            if blk.reduce is not None:
                for prm in blk.reduce.predictor.parameters():
                    prm.normal_(0, 0.3)
    x = _images(family)
    with torch.no_grad():
        got = model(x)
        want = _literal_dynamicvit(model, _twin(model, family, global_pool="token"), x)
    _close(got, want, 1e-4)


@pytest.mark.parametrize("family", ["rope", "dinov3", "eva02_swiglu"])
def test_evit_keeps_rows_and_fuses_without_rotation(family):
    model = _model(family, "lora+evit", evit_keep_rate=0.6, evit_locations=[1, 2], global_pool="token")
    x = _images(family)
    with torch.no_grad():
        got, state = model(x, return_state=True)
        want = _literal_evit(model, _twin(model, family, global_pool="token"), x)
        assert state.rope_identity == 16 and bool(((state.rope_pos == 16).sum(1) >= 1).all())   # fused tokens
        _close(got, want, 1e-4)
        _close(tokentune.deploy(model)(x), want, 1e-4)


@pytest.mark.parametrize("family", ["dinov3", "mixed"])
def test_diffrate_pruning_keeps_the_rotary_rows(family):
    p = 5 if family == "dinov3" else 1
    kept = [16 + p, 12 + p, 9 + p]                       # prune only (merge_kept = prune_kept): rows gathered
    model = _model(family, "lora+diffrate", global_pool="token", diffrate_prune_kept=kept, diffrate_merge_kept=kept)
    x = _images(family)
    with torch.no_grad():
        got, state = model(x, return_state=True)
        want = _literal_evit(model, _twin(model, family, global_pool="token"), x, fuse=False)
    assert state.rope_pos.shape == (2, 9 + p)
    _close(got, want, 1e-4)


def test_diffrate_search_sorts_the_rotary_rows_with_the_tokens():
    """The rate search keeps every token but sorts them by CLS attention in every block: with both
    rates at "keep everything" the model is timm's (up to the masked softmax's epsilon)."""
    model = _model("dinov3", "lora", global_pool="token")
    ref = _twin(model, "dinov3", global_pool="token")
    for i, block in enumerate(model.blocks[1:], start=1):
        block.reduce = DiffRateSearchReducer(i, 16, 5, granularity=4)
        with torch.no_grad():
            block.reduce.prune.logits[0] = block.reduce.merge.logits[0] = 50.0      # all 16 patch tokens kept
    x = _images("dinov3")
    with torch.no_grad():
        got, state = model(x, return_state=True)
        assert not torch.equal(state.rope_pos[:, 5:], torch.arange(16).expand(2, 16))   # really sorted
        _close(got, ref(x), 1e-4)


# ----------------------------------------------------------------------------- DyT: gathered == masked
@pytest.mark.parametrize("family", ["eva02", "mixed", "dinov3"])
@pytest.mark.parametrize("variant", ["mlp", "attn", "attn_mlp", "layer"])
def test_dyt_skip_and_capacity_equal_mask(family, variant):
    model = _model(family, "dyt", dyt_variant=variant, dyt_bottleneck=8)
    randomize_dyt(model)
    x = _images(family, batch=3)
    dyt.calibrate_activation(model, x, 0.5)
    with torch.no_grad():
        mask, state = model(x, return_state=True, dyt_execution="mask")
        skip = model(x, dyt_execution="skip")
        rates = [float(r.patch_mask().mean()) for r in dyt.dispatch_records(state)]
        dyt.calibrate_capacity(model, x)                           # the busiest image's counts: fewer than every token
        capacity = model(x)
        deployed = tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=1.0)(x)
    assert all(0.0 < r < 1.0 for r in rates)                        # tokens really skip
    _close(skip, mask)
    _close(capacity, mask)
    assert deployed.shape == mask.shape


def test_dyt_with_tome_gathers_rows_of_merged_tokens():
    model = _model("rope", "dyt+tome", tome_r=[3, 2, 2], dyt_bottleneck=8)
    randomize_dyt(model)
    x = _images("rope", batch=3)
    dyt.calibrate_activation(model, x, 0.5)
    with torch.no_grad():
        mask = model(x, dyt_execution="mask")
        _close(model(x, dyt_execution="skip"), mask)
        _close(tokentune.deploy(model)(x), mask)


# ----------------------------------------------------------------------------- prompts, PYRA, DiffRate
def test_vpt_prompts_are_prefix_tokens_without_rotation():
    """VPT's prompts sit after CLS and, like timm's registers, are never rotated: timm's own blocks
    told there are 1 + p prefix tokens compute the same."""
    model = _model("rope", "vpt", vpt_tokens=3, vpt_deep=False)
    x = _images("rope")
    ref = _twin(model, "rope")
    with torch.no_grad():
        tokens, rot = ref._pos_embed(ref.patch_embed(x))
        prompts = model.blocks[0].prompt.embeddings.expand(2, -1, -1)
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
        for blk in ref.blocks:
            blk.attn.num_prefix_tokens = 4
            tokens = blk(tokens, rope=rot)
        _close(model(x), ref.forward_head(ref.norm(tokens)))


@pytest.mark.parametrize("method,options", [
    ("pyra", dict(tome_r=[3, 2, 2])), ("vpt+pyra", dict(tome_r=[3, 2, 2], vpt_deep=True)),
    ("lora+diffrate", dict(global_pool="token", diffrate_prune_kept=[21, 18, 15], diffrate_merge_kept=[19, 16, 13])),
    ("adapter+tome", dict(tome_r=2)), ("lora+evit", dict(global_pool="token")),
])
def test_deployed_equals_training_time_model(method, options):
    model = _model("dinov3", method, **options)
    randomize_lora(model)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if ".merge.modulator." in name or ".adapter." in name:
                prm.normal_(0, 0.2)
    x = _images("dinov3")
    with torch.no_grad():
        want = model(x)
        _close(tokentune.deploy(model)(x), want, 1e-4)


def test_pyra_at_init_equals_lora_tome():
    lt = _model("mixed", "lora+tome", tome_r=[3, 2, 2])
    pyra = _model("mixed", "pyra", tome_r=[3, 2, 2])
    pyra.load_state_dict(lt.state_dict(), strict=False)
    x = _images("mixed")
    with torch.no_grad():
        _close(pyra(x), lt(x))


# ----------------------------------------------------------------------------- training, features, files
def test_training_with_patch_dropout_and_checkpointing_equals_timm():
    """Training mode: timm's patch dropout hands a per-image rotary table over; with gradient
    checkpointing the mixed RoPE's learned frequencies get the same gradients."""
    name, kw = FAMILIES["mixed"]
    model = tokentune.create_model(name, method="full", num_classes=5, patch_drop_rate=0.25, **kw)
    _spread(model)
    ref = _twin(model, "mixed", patch_drop_rate=0.25).train()
    model.train()
    x = _images("mixed")
    torch.manual_seed(5)
    want = ref(x)
    want.square().sum().backward()
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    got = model(x)
    got.square().sum().backward()
    _close(got, want)
    _close(model.rope.freqs.grad, ref.rope.freqs.grad, 1e-4)
    with_tome = tokentune.create_model(name, method="lora+tome", tome_r=2, num_classes=5, patch_drop_rate=0.25, **kw)
    with_tome.train()(x).sum().backward()                           # merging a per-image table trains


def test_forward_intermediates_and_features_only():
    model = _model("dinov3", "lora")
    ref = _twin(model, "dinov3")
    x = _images("dinov3")
    with torch.no_grad():
        for kwargs in (dict(indices=[0, 2], norm=True), dict(indices=2, output_fmt="NLC", return_prefix_tokens=True)):
            want = ref.forward_intermediates(x, **kwargs)
            got = model.forward_intermediates(x, **kwargs)
            _close(got[0], want[0])
            for a, b in zip(got[1], want[1]):
                for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    _close(u, v)
        merging = _model("dinov3", "lora+tome", tome_r=[4, 3, 2])
        levels = tokentune.core.features.features_only(merging, out_indices=[1, 2])(x)
    assert [tuple(f.shape) for f in levels] == [(2, 48, 4, 4)] * 2


def test_saved_and_exported_runs_load_back(tmp_path):
    name, kw = FAMILIES["eva02"]                    # no LayerScale: the random backbone as create_model built it
    model = tokentune.create_model(name, method="lora+tome", tome_r=[3, 2, 2], num_classes=5, **kw).eval()
    _spread(model, backbone=False)                  # the head trains, so the run keeps it
    randomize_lora(model, scale=0.2)
    x = _images("eva02")
    tokentune.save_trained(model, tmp_path / "run")
    loaded = tokentune.load_trained(tmp_path / "run").eval()
    with torch.no_grad():                           # rebuilt from the recorded seed, LoRA and head from the file
        _close(loaded(x), model(x))
    export_deployed(model, tmp_path / "out")
    with torch.no_grad():
        _close(tokentune.load_deployed(tmp_path / "out")(x), model(x), 1e-4)


def test_refusals_are_one_line(tmp_path):
    with pytest.raises(TokenTuneError, match="post-norm Eva blocks") as info:
        tokentune.create_model("eva02_enormous_patch14_clip_224", method="lora", num_classes=3, img_size=28,
                               depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.0)
    assert "\n" not in str(info.value)
    model = _model("eva02", "lora")
    with pytest.raises(TokenTuneError, match="attn_mask= .* not supported") as info:
        model(_images("eva02"), attn_mask=torch.zeros(17, 17))
    assert "\n" not in str(info.value)
    with pytest.raises(TokenTuneError, match=r"cannot hold the LoRA on blocks\.0\.attn\.qkv \(and 2 more\)") as info:
        save_peft(model, tmp_path / "peft")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- peft's format
# (family, tokentune lora_targets, peft target_modules): every LoRA target is one timm's forward
# calls as a module; EVA-02 tiny's fused qkv (with q/v biases) is the one it bypasses, so it is left out
PEFT_CASES = [
    ("eva02_swiglu", ("qkv", "proj", "fc1", "fc2"), ["q_proj", "v_proj", "fc1_g", "fc2"]),   # separate q/k/v
    ("rope", ("qkv", "proj", "fc1", "fc2"), ["qkv", "attn.proj", "fc1"]),                   # AttentionRope
    ("dinov3", ("qkv", "fc2"), ["qkv", "fc2"]),                                              # EvaAttention, no q/v bias
    ("eva02", ("proj", "fc1", "fc2"), ["attn.proj", "fc1", "fc2"]),                          # all but the bypassed qkv
]


def _peft_base(family, tmp_path):
    """timm's own Eva with spread weights, and its weights file (the backbone both sides build from)."""
    name, kw = FAMILIES[family]
    base = timm.create_model(name, num_classes=5, **kw).eval()
    _spread(base)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return base, path


@pytest.mark.parametrize("family,targets,_", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_tokentune_lora_in_peft_format_computes_the_same_in_peft(tmp_path, family, targets, _):
    peft = pytest.importorskip("peft")
    base, path = _peft_base(family, tmp_path)
    name, kw = FAMILIES[family]
    model = tokentune.create_model(name, method="lora", num_classes=5, pretrained=str(path), lora_targets=targets,
                                   lora_rank=4, lora_alpha=8.0, **kw).eval()
    randomize_lora(model, scale=0.2)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3)                          # the trained head travels as modules_to_save
    config = save_peft(model, tmp_path / "adapter")
    assert config["modules_to_save"] == ["head"]
    x = _images(family)
    with torch.no_grad():
        want = model(x)
        assert (base(x) - want).abs().max() > 1e-2                # the LoRA and head matter at this tolerance
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        wrapped = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert wrapped == {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        _close(loaded(x), want)
    back = load_peft(tmp_path / "adapter")                         # and back, with the recorded backbone file
    with torch.no_grad():
        _close(back(x), want)


@pytest.mark.parametrize("family,_,target_modules", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_peft_lora_of_timm_eva_loads_and_computes_the_same(tmp_path, family, _, target_modules):
    peft = pytest.importorskip("peft")
    base, path = _peft_base(family, tmp_path)
    x = _images(family)
    with torch.no_grad():
        plain = base(x)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                                           modules_to_save=["head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        want = peft_model.eval()(x)
    assert (want - plain).abs().max() > 1e-2                       # peft's LoRA runs in timm's forward
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    name, kw = FAMILIES[family]
    model = load_peft(tmp_path / "adapter", name, pretrained=str(path), **kw)
    with torch.no_grad():
        _close(model(x), want)


def test_peft_lora_on_the_qkv_timm_bypasses_is_refused_both_ways(tmp_path):
    """EVA-02 tiny: fused qkv with q/v biases, which timm's EvaAttention runs as F.linear on qkv.weight."""
    peft = pytest.importorskip("peft")
    base, path = _peft_base("eva02", tmp_path)
    x = _images("eva02")
    with torch.no_grad():
        plain = base(x)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and "qkv" in name:
                p.normal_(0, 0.2)
        _close(peft_model.eval()(x), plain, 1e-6)                  # peft's qkv LoRA never ran
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(TokenTuneError, match=r"LoRA on blocks\.0\.attn\.qkv \(and 2 more\) never ran in peft") as info:
        load_peft(tmp_path / "adapter", FAMILIES["eva02"][0], pretrained=str(path), **FAMILIES["eva02"][1])
    assert "\n" not in str(info.value)
    model = _model("eva02", "lora", lora_targets=("qkv", "fc2"))
    with pytest.raises(TokenTuneError, match="separate q/v biases.*choose lora_targets") as info:
        save_peft(model, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family,method,options", [("dinov3", "lora+tome", dict(tome_r=[3, 2, 2])),
                                                   ("mixed", "lora+evit", dict(global_pool="token"))])
def test_torch_export_of_deployed_eva(tmp_path, family, method, options):
    """The rotary rows (gathered, with EViT's identity row) trace into one static-shape program."""
    deployed = tokentune.deploy(_model(family, method, **options))
    size = FAMILIES[family][1]["img_size"]
    program = export_program(deployed, tmp_path / "model.pt2", image_size=size, batch_size=2)   # checked against eager
    x = _images(family)
    with torch.no_grad():
        _close(program.module()(x), deployed(x), 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family,method,options,deploy_options", [
    ("dinov3", "lora+tome", dict(tome_r=[3, 2, 2]), {}),
    ("mixed", "lora+evit", dict(global_pool="token"), {}),
    ("eva02", "pyra", dict(tome_r=[3, 2, 2]), {}),
    ("eva02_swiglu", "dyt", {}, dict(dyt_execution="capacity", dyt_capacity=1.0)),
])
def test_onnx_of_deployed_eva(tmp_path, family, method, options, deploy_options):
    """ONNX Runtime runs the rotary rows (merged, pruned with EViT's identity row, gathered by DyT's
    capacity index) as the eager model does, at two batch sizes of one dynamic-batch export."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from tokentune.tools.onnx import export_onnx

    deployed = tokentune.deploy(_model(family, method, **options), **deploy_options)
    size = FAMILIES[family][1]["img_size"]
    path = export_onnx(deployed, tmp_path / "model.onnx", image_size=size, verify=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _images(family, batch=batch, seed=batch)
        with torch.no_grad():
            _close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), deployed(x), 1e-4)
