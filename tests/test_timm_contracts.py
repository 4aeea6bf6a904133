"""timm's contracts: exports carry the training transform as timm's pretrained_cfg and load in timm
alone when they are plain timm models; tokentune-only exports and run directories refuse to load
as a plain ViT; runs record the backbone without absolute paths; local-dir: backbones."""
import json
import logging
import shutil

import numpy as np
import pytest
import timm
import torch
from conftest import randomize_lora, tiny
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import tokentune
from tokentune.engine.data import build_transform
from tokentune.errors import TokenTuneError
from tokentune.tools.export import DEPLOYED_WEIGHTS, GUARD_TENSOR, TIMM_CONFIG, export_deployed

NAME = "vit_tiny_patch16_224"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _photo(seed=0, size=(45, 37)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.mark.parametrize("interpolation,normalization", [("bicubic", "auto"), ("bilinear", "imagenet")])
def test_plain_export_loads_in_timm_with_the_training_transform(tmp_path, interpolation, normalization):
    model = tokentune.create_model(NAME, method="lora", num_classes=5, **tiny()).eval()
    randomize_lora(model)
    tokentune.save_trained(model, tmp_path / "run", extra={"train_config": {"interpolation": interpolation,
                                                                             "normalization": normalization}})
    export_deployed(tmp_path / "run", tmp_path / "out")
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert type(timm_model) is timm.models.vision_transformer.VisionTransformer
    with torch.no_grad():
        assert (timm_model(X) - model(X)).abs().max() < 1e-5
    data_cfg = timm.data.resolve_model_data_config(timm_model)
    assert data_cfg["crop_pct"] == 1.0 and data_cfg["crop_mode"] == "squash"
    assert data_cfg["interpolation"] == interpolation and data_cfg["input_size"] == (3, 32, 32)
    # timm's own eval transform == the transform tokentune trained with, on a non-square photo
    theirs = timm.data.create_transform(**data_cfg)
    ours = build_transform(model, normalization=normalization, interpolation=interpolation)
    photo = _photo()
    assert (theirs(photo) - ours(photo)).abs().max() < 1e-5
    # and the model loaded back by tokentune carries the same
    loaded = tokentune.load_deployed(tmp_path / "out")
    assert timm.data.resolve_model_data_config(loaded)["crop_pct"] == 1.0


@pytest.mark.parametrize("method,options", [("lora+tome", dict(tome_r=2)), ("dyt", {}), ("adapter", {})])
def test_tokentune_only_exports_refuse_to_load_as_plain_vit(tmp_path, caplog, method, options):
    model = tokentune.create_model(NAME, method=method, num_classes=5, **options, **tiny()).eval()
    export_deployed(model, tmp_path)
    with pytest.raises(RuntimeError, match="tokentune-deployed .*load_deployed"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    # the weights file itself: a strict load into the plain ViT fails naming the guard tensor
    plain = timm.create_model(NAME, num_classes=5, **tiny())
    with pytest.raises(RuntimeError, match=GUARD_TENSOR):
        plain.load_state_dict(load_file(str(tmp_path / DEPLOYED_WEIGHTS)))
    caplog.clear()                  # timm's own file loading path (non-strict): a warning naming the guard
    with caplog.at_level(logging.WARNING, logger="timm"):
        timm.create_model(NAME, num_classes=5, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / DEPLOYED_WEIGHTS)), **tiny())
    assert GUARD_TENSOR in caplog.text
    with safe_open(str(tmp_path / DEPLOYED_WEIGHTS), "pt") as fh:
        meta = fh.metadata()
    assert meta["tokentune_plain_timm"] == "false" and meta["tokentune_method"] == method.split("+")[0] + (
        "+tome" if "tome" in method else "")
    assert json.loads((tmp_path / TIMM_CONFIG).read_text())["pretrained_cfg"]["crop_pct"] == 1.0
    with torch.no_grad():           # tokentune still loads it exactly
        assert (tokentune.load_deployed(tmp_path)(X) - tokentune.deploy(model)(X)).abs().max() < 1e-5


def test_run_directory_records_no_absolute_path_and_refuses_timm(tmp_path):
    weights = tmp_path / "weights" / "base.safetensors"
    weights.parent.mkdir()
    from safetensors.torch import save_file
    base = timm.create_model(NAME, num_classes=5, **tiny())
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    model = tokentune.create_model(NAME, method="lora", num_classes=5, pretrained=str(weights), **tiny()).eval()
    randomize_lora(model)
    tokentune.save_trained(model, tmp_path / "runs" / "a")
    text = (tmp_path / "runs" / "a" / "config.json").read_text()
    assert str(tmp_path) not in text and json.loads(text)["pretrained"] == "../../weights/base.safetensors"
    with pytest.raises(RuntimeError, match="tokentune-run.*load_trained"):
        timm.create_model(f"local-dir:{tmp_path / 'runs' / 'a'}", pretrained=True)
    # the run and its weights moved together still load
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved-runs"))
    shutil.move(str(tmp_path / "weights"), str(tmp_path / "weights2"))
    with pytest.raises(TokenTuneError, match="base.safetensors.*pass pretrained=PATH") as info:
        tokentune.load_trained(tmp_path / "moved-runs" / "a")
    assert "\n" not in str(info.value)
    shutil.move(str(tmp_path / "weights2"), str(tmp_path / "weights"))
    loaded = tokentune.load_trained(tmp_path / "moved-runs" / "a").eval()
    with torch.no_grad():
        assert (loaded(X) - model(X)).abs().max() < 1e-6


def test_local_dir_backbone_from_timms_save_for_hf(tmp_path, monkeypatch):
    from timm.models import save_for_hf
    base = timm.create_model(NAME, num_classes=5, **tiny()).eval()
    save_for_hf(base, str(tmp_path / "backbone"), safe_serialization=True)
    monkeypatch.chdir(tmp_path)
    model = tokentune.create_model("local-dir:backbone", method="lora", num_classes=5, pretrained=True,
                                   pretrained_head=True).eval()     # the saved head too (a new task gets a new one)
    with torch.no_grad():
        assert (model(X) - base(X)).abs().max() < 1e-5      # LoRA starts at the identity
    randomize_lora(model)
    tokentune.save_trained(model, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "local-dir:../backbone"
    monkeypatch.chdir(tmp_path / "run")
    with torch.no_grad():
        assert (tokentune.load_trained(tmp_path / "run").eval()(X) - model(X)).abs().max() < 1e-6
    # an export of it is self-contained: it loads without the backbone folder
    tokentune.export_deployed(model, tmp_path / "export")
    shutil.move(str(tmp_path / "backbone"), str(tmp_path / "gone"))
    with torch.no_grad():
        assert (tokentune.load_deployed(tmp_path / "export")(X) - model(X)).abs().max() < 1e-5
    shutil.move(str(tmp_path / "gone"), str(tmp_path / "backbone"))
    with pytest.raises(TokenTuneError, match="brings its own weights"):
        tokentune.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained="x.npz")
    with pytest.raises(TokenTuneError, match="tokentune run or export"):
        tokentune.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)


# ----------------------------------------------------------------------------- attention-pool heads
SIGLIP = "vit_base_patch16_siglip_224"
MAP = tiny(class_token=False, global_pool="map", no_embed_class=True)


def test_map_head_without_merging_is_timms_model():
    base = timm.create_model(SIGLIP, num_classes=5, **MAP).eval()
    model = tokentune.create_model(SIGLIP, method="lora+tome", tome_r=0, num_classes=5, **MAP).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        assert (model(X) - base(X)).abs().max() < 1e-5


def test_map_head_weights_a_merged_token_as_its_copies():
    """The pool over merged tokens with sizes == timm's pool over every token repeated size times."""
    model = tokentune.create_model(SIGLIP, method="lora+tome", tome_r=[4, 3, 2, 1], num_classes=5, **MAP).eval()
    with torch.no_grad():
        x, state = model.forward_tokens(X)
        assert state.size is not None and int(state.size.max()) > 1
        ours = model.forward_head_sized(x, state, pre_logits=True)
        copies = [torch.repeat_interleave(x[b], state.size[b, :, 0].round().long(), dim=0) for b in range(len(X))]
        theirs = torch.stack([model.attn_pool(c[None])[0] for c in copies])
        assert (ours - theirs).abs().max() < 1e-5
        unweighted = model.attn_pool(x)
        assert (ours - unweighted).abs().max() > 1e-4       # the sizes matter
    deployed = tokentune.deploy(model)
    with torch.no_grad():
        assert (deployed(X) - model(X)).abs().max() < 1e-5


def test_eva_models_adapt_and_post_norm_eva_blocks_are_refused():
    """timm's Eva class works (tests/test_eva.py); its post-norm block is the one refused."""
    model = tokentune.create_model("eva02_tiny_patch14_224", method="lora+tome", tome_r=2, num_classes=3, img_size=28,
                                   depth=1, embed_dim=48, num_heads=3)
    assert isinstance(model, timm.models.eva.Eva)
    with pytest.raises(TokenTuneError, match="post-norm Eva blocks.*not supported") as info:
        tokentune.create_model("eva02_enormous_patch14_clip_224", method="lora", num_classes=3, img_size=28, depth=1,
                               embed_dim=32, num_heads=2, mlp_ratio=2.0)
    assert "\n" not in str(info.value)
