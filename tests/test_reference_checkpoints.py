"""The baselines' official checkpoints (EViT, DynamicViT, VPT, DiffRate): files written in each
reference repository's key layout and file format load into a tokentune model that equals one
built directly from the same weights; every key is checked; files are read weights-only."""
import argparse
import math

import numpy as np
import pytest
import timm
import torch
from conftest import tiny
from safetensors.torch import save_file

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods import diffrate, dynamicvit, evit, vpt

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
D = tiny()["embed_dim"]


def _vit(seed=1):
    """The reference's backbone: a timm ViT with random weights (every tensor non-trivial)."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, **tiny()).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit


def _direct(tmp_path, vit, method, **kw):
    """A model built directly from the backbone's weights file (its head set from the same weights)."""
    path = str(tmp_path / "direct.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, pretrained=path, **tiny(), **kw)
    model.head.load_state_dict(vit.head.state_dict())
    return model.eval()


def _built(method, **kw):
    torch.manual_seed(7)          # other random values than the checkpoint's: loading must replace them all
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, **tiny(), **kw).eval()


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


def _one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text and all(p in text for p in parts), text


def _deit_file(tmp_path, model_sd, args, name="checkpoint.pth"):
    """A checkpoint as the DeiT-style training scripts save it (model, EMA, optimizer, epoch, scaler, args)."""
    path = tmp_path / name
    torch.save({"model": model_sd, "model_ema": {k: v + 1 for k, v in model_sd.items()},
                "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "lr_scheduler": {"last_epoch": 2}, "epoch": 2, "scaler": {"scale": 65536.0}, "args": args}, path)
    return path


# ----------------------------------------------------------------------------- EViT
def test_evit_checkpoint_file_loads_and_equals_the_model_built_directly(tmp_path):
    vit = _vit()
    args = argparse.Namespace(model="deit_small_patch16_shrink_base", base_keep_rate=0.6, drop_loc="(1, 2, 3)",
                              fuse_token=True, epochs=300)
    path = _deit_file(tmp_path, vit.state_dict(), args)
    model = _built("evit", evit_keep_rate=0.6)
    assert evit.load_reference_checkpoint(model, path) == []           # no trust_checkpoint needed
    _equal(model, _direct(tmp_path, vit, "evit", evit_keep_rate=0.6))
    # LoRA + EViT: the backbone loads, LoRA keeps its values (and is named)
    lora = _built("lora+evit", evit_keep_rate=0.6)
    left = evit.load_reference_checkpoint(lora, str(path))
    assert left and all(k.endswith(("lora_A", "lora_B")) for k in left)
    assert torch.equal(lora.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)


def test_evit_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path):
    vit = _vit()
    sd = vit.state_dict()
    path = _deit_file(tmp_path, sd, argparse.Namespace(base_keep_rate=0.7, drop_loc="(1, 2, 3)", fuse_token=True))
    with pytest.raises(TokenTuneError) as e:
        evit.load_reference_checkpoint(_built("evit", evit_keep_rate=0.5), path)
    _one_line(e, "evit_keep_rate=0.7")
    with pytest.raises(TokenTuneError) as e:
        evit.load_reference_checkpoint(_built("evit", evit_locations=[2]), path)
    _one_line(e, "evit_locations=[1, 2, 3]")
    extra = dict(sd, **{"pre_logits.fc.weight": torch.zeros(D, D)})
    del extra["norm.bias"]
    with pytest.raises(TokenTuneError) as e:
        evit.load_reference_checkpoint(_built("evit"), {"model": extra})
    _one_line(e, "unused: pre_logits.fc.weight", "missing: norm.bias")
    with pytest.raises(TokenTuneError) as e:
        evit.load_reference_checkpoint(_built("lora"), {"model": sd})
    _one_line(e, "method='evit'")


def test_checkpoint_pickling_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _vit().state_dict(), "args": math.pi, "hook": torch.nn.Identity()}, path)
    with pytest.raises(TokenTuneError) as e:
        evit.load_reference_checkpoint(_built("evit"), path)
    _one_line(e, "torch.nn.modules.linear.Identity", "trust_checkpoint=True")


# ----------------------------------------------------------------------------- DynamicViT
def _predictor(k):
    """Tensors of the reference's PredictorLG ``k`` (LayerNorm, Linear D->D; D->D/2->D/4->2)."""
    g = torch.Generator().manual_seed(10 + k)
    shapes = {"in_conv.0": (D, D), "in_conv.1": (D, D), "out_conv.0": (D // 2, D), "out_conv.2": (D // 4, D // 2),
              "out_conv.4": (2, D // 4)}
    out = {}
    for name, (o, i) in shapes.items():
        out[f"score_predictor.{k}.{name}.weight"] = torch.randn(o, generator=g) if name == "in_conv.0" else \
            torch.randn(o, i, generator=g) / math.sqrt(i)
        out[f"score_predictor.{k}.{name}.bias"] = torch.randn(o, generator=g) * 0.1
    return out


def test_dynamicvit_checkpoint_file_loads_and_equals_the_model_built_directly(tmp_path):
    vit = _vit()
    predictors = {k: v for s in range(3) for k, v in _predictor(s).items()}
    path = _deit_file(tmp_path, dict(vit.state_dict(), **predictors), argparse.Namespace(model="deit-s", base_rate=0.7))
    model = _built("dynamicvit")
    assert dynamicvit.load_reference_checkpoint(model, path) == []
    direct = _direct(tmp_path, vit, "dynamicvit")
    with torch.no_grad():                       # the reference's list order -> the model's locations (1, 2, 3 of 4)
        for k, loc in enumerate((1, 2, 3)):
            pred = direct.blocks[loc].reduce.predictor
            for name, value in _predictor(k).items():
                pred.get_parameter(name.split(".", 2)[2]).copy_(value)
    _equal(model, direct)
    with torch.no_grad():
        assert model(X, return_tokens=True)[1].shape[1] < 17          # it prunes


def test_dynamicvit_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path):
    vit = _vit()
    two = dict(vit.state_dict(), **_predictor(0), **_predictor(1))
    with pytest.raises(TokenTuneError) as e:
        dynamicvit.load_reference_checkpoint(_built("dynamicvit"), {"model": two})
    _one_line(e, "2 prediction modules", "3 (locations [1, 2, 3])")
    three = dict(two, **_predictor(2))
    with pytest.raises(TokenTuneError) as e:
        dynamicvit.load_reference_checkpoint(_built("dynamicvit"), {"model": three, "args": {"base_rate": 0.9}})
    _one_line(e, "dynamicvit_keep_rate=0.9")
    del three["score_predictor.2.out_conv.4.bias"]
    with pytest.raises(TokenTuneError) as e:
        dynamicvit.load_reference_checkpoint(_built("dynamicvit"), {"model": three})
    _one_line(e, "missing: blocks.3.reduce.predictor.out_conv.4.bias")


# ----------------------------------------------------------------------------- VPT
def _vpt_reference(vit, prompts, deep):
    """A KMnP/vpt model state dict: the ViT-pytorch names inside ``enc``, separate q/k/v, prompts, MLP head."""
    sd = vit.state_dict()
    out = {"enc.transformer.embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
           "enc.transformer.embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
           "enc.transformer.embeddings.position_embeddings": sd["pos_embed"],
           "enc.transformer.embeddings.cls_token": sd["cls_token"],
           "enc.transformer.encoder.encoder_norm.weight": sd["norm.weight"],
           "enc.transformer.encoder.encoder_norm.bias": sd["norm.bias"],
           "head.last_layer.weight": sd["head.weight"], "head.last_layer.bias": sd["head.bias"],
           "enc.transformer.prompt_embeddings": prompts[:1]}
    if deep:
        out["enc.transformer.deep_prompt_embeddings"] = prompts[1:]
    for i in range(len(vit.blocks)):
        ref, ours = f"enc.transformer.encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for part, value in zip(("query", "key", "value"), sd[ours + f"attn.qkv.{kind}"].chunk(3, dim=0)):
                out[ref + f"attn.{part}.{kind}"] = value
            out[ref + f"attn.out.{kind}"] = sd[ours + f"attn.proj.{kind}"]
            out[ref + f"attention_norm.{kind}"] = sd[ours + f"norm1.{kind}"]
            out[ref + f"ffn_norm.{kind}"] = sd[ours + f"norm2.{kind}"]
            out[ref + f"ffn.fc1.{kind}"] = sd[ours + f"mlp.fc1.{kind}"]
            out[ref + f"ffn.fc2.{kind}"] = sd[ours + f"mlp.fc2.{kind}"]
    return out


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_checkpoint_loads_and_equals_the_model_built_directly(tmp_path, deep):
    vit = _vit()
    prompts = torch.randn(4, 3, D, generator=torch.Generator().manual_seed(3))      # [1 + (L - 1), p, D]
    path = tmp_path / "last_model.pth"
    torch.save({"model": _vpt_reference(vit, prompts, deep)}, path)
    model = _built("vpt", vpt_tokens=3, vpt_deep=deep)
    assert vpt.load_reference_checkpoint(model, path) == []
    direct = _direct(tmp_path, vit, "vpt", vpt_tokens=3, vpt_deep=deep)
    with torch.no_grad():
        for i, block in enumerate(direct.blocks if deep else direct.blocks[:1]):
            block.prompt.embeddings.copy_(prompts[i])
    _equal(model, direct)
    # the trainer's prompt file (numpy arrays, weights-only readable): the prompts alone
    file = tmp_path / "prompt_ep100.pth"
    arrays = {"shallow_prompt": (prompts[:1] * 2).numpy()}
    if deep:
        arrays["deep_prompt"] = (prompts[1:] * 2).numpy()
    torch.save(arrays, file)
    kept = vpt.load_reference_checkpoint(model, file)                     # the tensors that keep their values
    assert "blocks.0.attn.qkv.weight" in kept and not any(".prompt." in k for k in kept)
    assert torch.equal(model.blocks[0].prompt.embeddings, prompts[0] * 2)
    assert torch.equal(model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)   # the backbone stays


def test_vpt_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path):
    vit = _vit()
    prompts = torch.randn(4, 3, D)
    shallow = _vpt_reference(vit, prompts, deep=False)
    with pytest.raises(TokenTuneError) as e:
        vpt.load_reference_checkpoint(_built("vpt", vpt_tokens=3, vpt_deep=True), shallow)
    _one_line(e, "missing: blocks.1.prompt.embeddings", "vpt_deep")
    with pytest.raises(TokenTuneError) as e:
        vpt.load_reference_checkpoint(_built("vpt", vpt_tokens=5), shallow)
    _one_line(e, "blocks.0.prompt.embeddings", "(3, 48) there but (5, 48) here")
    with pytest.raises(TokenTuneError) as e:
        vpt.load_reference_checkpoint(_built("vpt", vpt_tokens=3), dict(shallow, **{"head.projection.0.weight": prompts}))
    _one_line(e, "unused: head.projection.0.weight")
    with pytest.raises(TokenTuneError) as e:
        vpt.load_reference_checkpoint(_built("vpt", vpt_tokens=3),
                                      dict(shallow, **{"enc.transformer.prompt_proj.weight": torch.zeros(D, D)}))
    _one_line(e, "PROJECT")
    with pytest.raises(TokenTuneError) as e:
        vpt.load_reference_checkpoint(_built("lora"), shallow)
    _one_line(e, "method='vpt'")
    torch.save({"shallow_prompt": np.zeros((1, 3, D), dtype=np.float32), "code": torch.nn.Identity()}, tmp_path / "p.pth")
    with pytest.raises(TokenTuneError) as e:
        vpt.load_reference_checkpoint(_built("vpt", vpt_tokens=3), tmp_path / "p.pth")
    _one_line(e, "Identity", "trust_checkpoint=True")


# ----------------------------------------------------------------------------- DiffRate
def _proxies(depth, n, granularity, seed=0):
    """Rate proxies as the reference's ``DiffRate`` modules hold them (block 0: one candidate, keeps all)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(depth):
        step = n + 1 if i == 0 else granularity
        for kind in ("prune", "merge"):
            cand = torch.arange(n, 0, -step).float()
            out[f"blocks.{i}.{kind}_ddp.kept_token_candidate"] = cand
            out[f"blocks.{i}.{kind}_ddp.selected_probability"] = torch.randn(len(cand), generator=g) * 2 + \
                (torch.linspace(0, 3, len(cand)) if kind == "merge" else 0)
    return out


def _reference_kept(proxies, depth):
    """The reference's ``update_kept_token_number``: ceil(candidates . softmax(logits)) + 1 (class token)."""
    counts = {"prune": [], "merge": []}
    for i in range(depth):
        for kind in counts:
            cand = proxies[f"blocks.{i}.{kind}_ddp.kept_token_candidate"]
            prob = proxies[f"blocks.{i}.{kind}_ddp.selected_probability"].softmax(dim=-1)
            counts[kind].append(int(torch.ceil(torch.matmul(cand, prob))) + 1)
    return counts["prune"], counts["merge"]


def test_diffrate_checkpoint_loads_with_its_rates_and_equals_the_model_built_directly(tmp_path):
    vit = _vit()
    proxies = _proxies(4, 16, 4)
    prune, merge = _reference_kept(proxies, 4)
    assert prune[0] == merge[0] == 17 and min(merge) < 17                      # it reduces
    assert diffrate.reference_rates({"model": proxies}) == (prune, merge)
    path = _deit_file(tmp_path, dict(vit.state_dict(), **proxies), argparse.Namespace(target_flops=0.001))
    fitted = diffrate.fit_rates(prune, merge, 17, 1, 4)
    model = _built("diffrate", diffrate_prune_kept=prune, diffrate_merge_kept=merge)
    assert diffrate.load_reference_checkpoint(model, path) == []
    _equal(model, _direct(tmp_path, vit, "diffrate", diffrate_prune_kept=fitted[0], diffrate_merge_kept=fitted[1]))
    with pytest.raises(TokenTuneError) as e:                                  # the model must have its rates
        diffrate.load_reference_checkpoint(_built("diffrate"), path)
    _one_line(e, f"diffrate_prune_kept={','.join(map(str, prune))}", f"diffrate_merge_kept={','.join(map(str, merge))}")
    no_cls = {k: v for k, v in proxies.items() if not k.startswith("blocks.2.merge_ddp.selected")}
    with pytest.raises(TokenTuneError) as e:
        diffrate.reference_rates(no_cls)
    _one_line(e, "blocks.2.merge_ddp")
    # a backbone without proxies (a plain DeiT) loads into any DiffRate model; a key too many does not
    lora = _built("lora+diffrate")
    assert all(k.endswith(("lora_A", "lora_B")) for k in diffrate.load_reference_checkpoint(lora, vit.state_dict()))
    with pytest.raises(TokenTuneError) as e:
        diffrate.load_reference_checkpoint(_built("diffrate"), dict(vit.state_dict(), dist_token=torch.zeros(1, 1, D)))
    _one_line(e, "unused: dist_token")
