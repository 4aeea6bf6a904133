"""Saving only the trained parameters, loading them back, clear errors on mismatch, safe and
clear loading of every checkpoint file, seeds of random initialisation, offline hub."""
import json
import os
import time
import zipfile

import pytest
import torch
from conftest import randomize_lora, tiny
from safetensors.torch import load_file, save_file

import tokentune
from tokentune.core import backbone
from tokentune.core.backbone import create_backbone
from tokentune.core.weights import load_weights_file
from tokentune.engine.rundir import RunDir
from tokentune.errors import TokenTuneError
from tokentune.methods import dyt, pyra


def _model(method="lora+tome", **kw):
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=6, tome_r=[3, 2],
                                  **tiny(**kw))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model().eval()
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    tokentune.save_trained(model, str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora" in k or k.startswith("head.") for k in saved)   # frozen backbone not saved
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "lora+tome" and config["configs"]["tome"]["r"][:2] == [3, 2]
    loaded = tokentune.load_trained(str(tmp_path)).eval()    # random backbone: rebuilt from the recorded seed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_backbone_from_local_files(tmp_path):
    """Pretrained weights from .safetensors and .pth files (timm state dicts)."""
    import timm
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=6, **tiny()).eval()
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": ref.state_dict()}, str(tmp_path / "w.pth"))
    x = torch.randn(2, 3, 32, 32)
    for f in ("w.safetensors", "w.pth"):
        m = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=6, pretrained_head=True,
                                   pretrained=str(tmp_path / f), **tiny()).eval()
        with torch.no_grad():
            assert torch.allclose(m(x), ref(x), atol=1e-6), f
    # a different class count drops the head and keeps the backbone
    m = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3,
                               pretrained=str(tmp_path / "w.safetensors"), **tiny())
    assert torch.equal(m.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_backbone_from_google_npz(tmp_path):
    """Google's original .npz layout goes through timm's npz loader."""
    import numpy as np
    import timm
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=6, **tiny()).eval()
    sd = ref.state_dict()
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0).numpy(),
         "embedding/bias": sd["patch_embed.proj.bias"].numpy(),
         "cls": sd["cls_token"].numpy(),
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"].numpy(),
         "Transformer/encoder_norm/scale": sd["norm.weight"].numpy(),
         "Transformer/encoder_norm/bias": sd["norm.bias"].numpy(),
         "head/kernel": sd["head.weight"].T.numpy(), "head/bias": sd["head.bias"].numpy()}
    heads, dim = 3, 48
    for i in range(4):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"].numpy(), sd[b + "norm1.bias"].numpy()
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"].numpy(), sd[b + "norm2.bias"].numpy()
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            wj = qkv_w[j * dim:(j + 1) * dim]                       # [out, in]
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = wj.T.reshape(dim, heads, dim // heads).numpy()
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, -1).numpy()
        proj = sd[b + "attn.proj.weight"].T
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = proj.reshape(heads, dim // heads, dim).numpy()
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"].numpy()
        for k, n in ((0, "fc1"), (1, "fc2")):
            w[p + f"MlpBlock_3/Dense_{k}/kernel"] = sd[b + f"mlp.{n}.weight"].T.numpy()
            w[p + f"MlpBlock_3/Dense_{k}/bias"] = sd[b + f"mlp.{n}.bias"].numpy()
    np.savez(tmp_path / "ViT-T.npz", **w)
    m = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", tome_r=0, num_classes=6,
                               pretrained=str(tmp_path / "ViT-T.npz"), pretrained_head=True, **tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), atol=1e-5)
    # adapting to a new 6-class task: the backbone is loaded, the head starts afresh
    new = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=6,
                                 pretrained=str(tmp_path / "ViT-T.npz"), **tiny())
    assert torch.equal(new.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    assert not torch.allclose(new.head.weight, ref.head.weight) and torch.all(new.head.bias == 0)


def test_weight_errors_are_one_line(tmp_path):
    with pytest.raises(TokenTuneError, match="does not exist") as e:
        _model(pretrained=str(tmp_path / "missing.npz"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(5, 5)}, str(bad))
    with pytest.raises(TokenTuneError, match="do not fit") as e:
        _model(pretrained=str(bad))
    assert "\n" not in str(e.value)


def test_hub_failure_says_how_to_pass_a_file(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(backbone, "_hub_unavailable", lambda name: None)    # the hub seemed reachable
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TokenTuneError, match="pass the local file"):
        tokentune.create_model("vit_tiny_patch16_224", method="lora", pretrained=True)


def test_trained_checkpoint_mismatch(tmp_path):
    model = _model()
    tokentune.save_trained(model, str(tmp_path))
    other = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=9, tome_r=[3, 2], **tiny())
    with pytest.raises(TokenTuneError, match=r"'head\.(weight|bias)' has shape"):
        tokentune.load_trained(str(tmp_path), model=other)
    with pytest.raises(TokenTuneError, match="has no config.json"):
        tokentune.load_trained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- untrusted files
class _MakeDir:
    """Unpickling this calls os.makedirs(path): a stand-in for any code a crafted checkpoint runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _crafted(tmp_path):
    """A checkpoint with real weights and a payload that would create ``tmp_path/ran``."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(48)}, "extra": _MakeDir(tmp_path / "ran")}, path)
    return path


def _as_run_dir(path):
    """A run directory whose resume.pt is the file at ``path``."""
    run = path.parent / "run"
    run.mkdir()
    os.replace(path, run / "resume.pt")
    return run


LOADERS = {
    "load_weights_file": lambda p: load_weights_file(str(p)),
    "create_backbone": lambda p: create_backbone("vit_tiny_patch16_224", pretrained=str(p), **tiny()),
    "create_model": lambda p: tokentune.create_model("vit_tiny_patch16_224", method="lora", pretrained=str(p),
                                                     **tiny()),
    "dyt_reference": lambda p: dyt.load_reference_checkpoint(
        tokentune.create_model("vit_tiny_patch16_224", method="dyt", num_classes=5, **tiny()), p),
    "pyra_reference": lambda p: pyra.load_reference_checkpoint(
        tokentune.create_model("vit_tiny_patch16_224", method="pyra", num_classes=5, tome_r=[5, 3, 2, 1], **tiny()),
        str(p)),
    "resume_state": lambda p: RunDir(_as_run_dir(p)).read_resume(),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_crafted_pickle_is_refused_by_every_loader(tmp_path, loader):
    path = _crafted(tmp_path)
    with pytest.raises(TokenTuneError) as e:
        LOADERS[loader](path)
    message = str(e.value)
    if loader == "resume_state":
        path = tmp_path / "run" / "resume.pt"
    assert "\n" not in message and message.startswith(f"{path} pickles os.makedirs, which safe (weights-only) loading")
    # foreign files name the opt-in; tokentune's own resume state never needs it
    assert ("trust_checkpoint=True" in message) == (loader != "resume_state")
    assert not (tmp_path / "ran").exists()


def test_trust_checkpoint_unpickles_fully(tmp_path):
    path = _crafted(tmp_path)
    tensors = load_weights_file(str(path), trust_checkpoint=True)
    assert (tmp_path / "ran").is_dir()          # the opt-in is what runs the file's code
    assert set(tensors) == {"blocks.0.norm1.weight"}
    os.rmdir(tmp_path / "ran")
    model = tokentune.create_model("vit_tiny_patch16_224", method="dyt", num_classes=5, **tiny())
    with pytest.raises(TokenTuneError, match="lacks"):      # fully read, then checked as usual
        dyt.load_reference_checkpoint(model, path, trust_checkpoint=True)
    assert (tmp_path / "ran").is_dir()


def _damaged_files(tmp_path):
    """{file name: (bytes, what the error says)} for every way a weights file can be unreadable."""
    import io
    buffer = io.BytesIO()
    torch.save({"blocks.0.norm1.weight": torch.ones(48)}, buffer)
    torch_bytes = buffer.getvalue()
    save_file({"blocks.0.norm1.weight": torch.ones(48)}, str(tmp_path / "tmp.safetensors"))
    safe_bytes = (tmp_path / "tmp.safetensors").read_bytes()
    with zipfile.ZipFile(tmp_path / "tmp.zip", "w") as archive:
        archive.writestr("weights.txt", "1 2 3")
    buffer = io.BytesIO()
    torch.save([torch.ones(2)], buffer)
    list_bytes = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"epoch": 3, "note": "no tensors"}, buffer)
    return {
        "text.pth": (b"weights: see the project page\n", "it is a text file (starting 'weights: see the project'), "
                                                          "not one written by torch.save"),
        "empty.pt": (b"", "the file is empty"),
        "cut.pth": (torch_bytes[:len(torch_bytes) // 2], "it is truncated or damaged"),
        "archive.pth": ((tmp_path / "tmp.zip").read_bytes(), "it is a zip archive, but not one written by torch.save"),
        "list.pth": (list_bytes, "holds a list, not a state dict"),
        "no_tensors.bin": (buffer.getvalue(), "holds a dict without tensors, not a state dict"),
        "cut.safetensors": (safe_bytes[:len(safe_bytes) - 20], "it is not a complete safetensors file"),
        "cut.npz": (b"PK\x03\x04" + bytes(20), "it is not a complete .npz archive"),
    }


def test_unreadable_weight_files_are_one_line(tmp_path):
    for name, (data, says) in _damaged_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(TokenTuneError) as e:
            tokentune.create_model("vit_tiny_patch16_224", method="lora", pretrained=str(path), **tiny())
        message = str(e.value)
        assert "\n" not in message and str(path) in message and says in message, (name, message)
        if name.endswith((".pth", ".pt", ".bin")):
            assert "expected a state dict saved with torch.save" in message, name


def test_reference_arguments_load_without_the_opt_in(tmp_path):
    """Training scripts pickle their argparse.Namespace next to the weights: allow-listed, weights-only."""
    import argparse
    torch.save({"model": {"module.blocks.0.norm1.weight": torch.full((48,), 2.0)}, "epoch": 7,
                "args": argparse.Namespace(lr=1e-3, model="vit_tiny", drop_path=0.1, nb_classes=5)},
               tmp_path / "checkpoint.pth")
    tensors = load_weights_file(str(tmp_path / "checkpoint.pth"))
    assert list(tensors) == ["blocks.0.norm1.weight"] and tensors["blocks.0.norm1.weight"][0] == 2.0


# ----------------------------------------------------------------------------- damaged run directories
def test_damaged_run_files_are_one_line(tmp_path):
    tokentune.save_trained(_model(), str(tmp_path))
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good_config = config.read_text()
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(TokenTuneError, match=r"model\.safetensors: it is not a complete safetensors file .*"
                                             r"save the model again with save_trained") as e:
        tokentune.load_trained(str(tmp_path))
    assert "\n" not in str(e.value)
    for text, says in (('{"model": "vit_tiny', "is damaged (not valid JSON: Unterminated string"),
                       (b"\xff\xfe\x00\x01", "is damaged (not UTF-8 text)"),
                       ("[1, 2]", "is not a tokentune model config")):
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(TokenTuneError) as e:
            tokentune.load_trained(str(tmp_path))
        assert "\n" not in str(e.value) and says in str(e.value) and "restore it from a copy" in str(e.value)
    config.write_text(good_config)


# ----------------------------------------------------------------------------- seeds of random initialisation
def test_random_backbone_is_rebuilt_from_its_recorded_seed(tmp_path):
    torch.manual_seed(123)
    model = _model().eval()
    randomize_lora(model)
    tokentune.save_trained(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pretrained"] is False and config["init_seed"] == 123   # the seed torch was just seeded with
    torch.manual_seed(999)                      # a later process: another state of the global generator
    torch.randn(100)
    x = torch.randn(2, 3, 32, 32)
    loaded = tokentune.load_trained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert torch.equal(loaded.patch_embed.proj.weight, model.patch_embed.proj.weight)
    # an older run without the seed cannot be rebuilt: refused rather than silently different
    del config["init_seed"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenTuneError, match="does not record the seed it was initialised with") as e:
        tokentune.load_trained(str(tmp_path))
    assert "\n" not in str(e.value)
    # ... unless `tokentune train` wrote it: it seeded torch with the training seed just before building
    config.update(run={"cli": {"method": "lora+tome"}}, train_config={"seed": 123})
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = tokentune.load_trained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_seed_of_create_model():
    state = torch.get_rng_state()
    a = _model(seed=7)
    assert torch.equal(torch.get_rng_state(), state)     # an explicit seed leaves the global generator alone
    assert a.tokentune_spec["init_seed"] == 7
    torch.manual_seed(7)
    b, c = _model(), _model()             # right after torch.manual_seed(7): seed 7; the next one another seed
    assert b.tokentune_spec["init_seed"] == 7 and c.tokentune_spec["init_seed"] != 7
    assert torch.equal(a.patch_embed.proj.weight, b.patch_embed.proj.weight)
    assert not torch.equal(b.patch_embed.proj.weight, c.patch_embed.proj.weight)
    assert torch.equal(_model(seed=c.tokentune_spec["init_seed"]).patch_embed.proj.weight, c.patch_embed.proj.weight)


# ----------------------------------------------------------------------------- offline hub
def _nothing_cached(monkeypatch):
    import huggingface_hub
    import timm

    def no_download(*a, **k):
        raise AssertionError("timm must not be asked to download")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(timm, "create_model", no_download)


def test_offline_hub_fails_at_once(monkeypatch):
    _nothing_cached(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tic = time.perf_counter()
    with pytest.raises(TokenTuneError) as e:
        tokentune.create_model("vit_base_patch16_224.orig_in21k", method="lora", pretrained=True, **tiny())
    assert time.perf_counter() - tic < 10
    message = str(e.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set, and they are not in the local cache" in message
    assert "(https://huggingface.co/timm/vit_base_patch16_224.orig_in21k;" in message
    assert "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz" in message
    assert "--pretrained PATH" in message and "--pretrained none" in message


def test_unreachable_hub_is_found_by_a_short_probe(monkeypatch):
    from huggingface_hub import constants

    _nothing_cached(monkeypatch)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")     # nothing listens on the discard port
    tic = time.perf_counter()
    with pytest.raises(TokenTuneError, match=r"127\.0\.0\.1:9 cannot be reached \(no answer within 3 s\)"):
        tokentune.create_model("vit_tiny_patch16_224", method="lora", pretrained=True, **tiny())
    assert time.perf_counter() - tic < 10


def test_cached_hub_weights_are_used_without_probing(monkeypatch):
    import huggingface_hub
    import timm

    def probe(*a):
        raise AssertionError("no probe when the weights are cached")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **k: f"/cache/{repo}/{name}")
    monkeypatch.setattr(backbone, "_answers", probe)
    built = torch.nn.Linear(1, 1)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built)
    assert create_backbone("vit_base_patch16_224.orig_in21k", pretrained=True) is built
