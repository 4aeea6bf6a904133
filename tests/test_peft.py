"""peft interop, against peft itself: tokentune's LoRA saved in peft's format loads into peft and
computes the same; peft's LoRA adapters of timm ViTs load into tokentune and compute the same;
what tokentune cannot represent is refused in one line."""
import json

import pytest
import timm
import torch
from conftest import randomize_lora, tiny
from safetensors.torch import load_file, save_file

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.lora.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft, save_peft

peft = pytest.importorskip("peft")

NAME = "vit_tiny_patch16_224"
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def base_file(tmp_path):
    """A backbone weights file both sides build from (peft's base model and tokentune's backbone)."""
    base = timm.create_model(NAME, num_classes=5, **tiny())
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return path


def timm_base(path):
    model = timm.create_model(NAME, num_classes=5, **tiny())
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def randomize_head(head):
    with torch.no_grad():
        head.weight.normal_(0, 0.2)
        head.bias.normal_(0, 0.2)


@pytest.mark.parametrize("targets,alpha", [(("qkv",), None), (("qkv", "proj", "fc1", "fc2"), 16.0)])
def test_tokentune_lora_loads_into_peft_and_computes_the_same(tmp_path, base_file, targets, alpha):
    model = tokentune.create_model(NAME, method="lora", num_classes=5, pretrained=str(base_file), lora_rank=4,
                                   lora_alpha=alpha, lora_targets=targets, **tiny()).eval()
    randomize_lora(model)
    randomize_head(model.head)
    config = save_peft(model, tmp_path / "adapter")
    assert config["lora_alpha"] == (alpha or 4) and config["r"] == 4 and config["modules_to_save"] == ["head"]
    on_disk = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert on_disk["target_modules"] == config["target_modules"]
    loaded = peft.PeftModel.from_pretrained(timm_base(base_file), str(tmp_path / "adapter")).eval()
    lora_layers = [n for n, m in loaded.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 4 * len(targets)            # every block, exactly the targets (not patch_embed.proj)
    with torch.no_grad():
        want = model(X)
        assert (loaded(X) - want).abs().max() < 1e-5
        merged = loaded.merge_and_unload()                 # peft's merge == tokentune's deploy
        assert (merged(X) - tokentune.deploy(model)(X)).abs().max() < 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_loads_into_tokentune_and_computes_the_same(tmp_path, base_file, rslora):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["qkv", "fc2"],
                          modules_to_save=["head"], use_rslora=rslora)
    peft_model = peft.get_peft_model(timm_base(base_file), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    randomize_head(peft_model.base_model.model.head.modules_to_save["default"])
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = load_peft(tmp_path / "adapter", NAME, pretrained=str(base_file), **tiny())
    assert model.tokentune.spec["configs"]["lora"]["targets"] == ["qkv", "fc2"]
    assert model.tokentune.spec["configs"]["lora"]["dropout"] == 0.05
    with torch.no_grad():
        assert (model(X) - peft_model.eval()(X)).abs().max() < 1e-5
    # and a tokentune model it is: token merging can be added to the imported LoRA
    fast = load_peft(tmp_path / "adapter", NAME, method="lora+tome", tome_r=2, pretrained=str(base_file), **tiny())
    _, state = fast(X, return_state=True)
    assert state.size.shape[1] < 17


def test_round_trip_keeps_token_merging_through_metadata(tmp_path, base_file):
    model = tokentune.create_model(NAME, method="lora+tome", tome_r=3, num_classes=5, pretrained=str(base_file),
                                   **tiny()).eval()
    randomize_lora(model)
    with pytest.warns(UserWarning, match="without tome"):
        save_peft(model, tmp_path / "a")
    back = load_peft(tmp_path / "a", NAME, pretrained=str(base_file))
    assert back.tokentune.spec["method"] == "lora+tome"
    with torch.no_grad():
        assert (back(X) - model(X)).abs().max() < 1e-5


@pytest.mark.parametrize("option,match", [
    (dict(use_dora=True), "use_dora"),
    (dict(rank_pattern={"blocks.0.attn.qkv": 2}), "rank_pattern"),
    (dict(layers_to_transform=[0, 1], layers_pattern="blocks"), "layers_to_transform"),
    (dict(bias="lora_only"), "bias"),
])
def test_unrepresentable_peft_options_are_refused_in_one_line(tmp_path, base_file, option, match):
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"], **option)
    peft.get_peft_model(timm_base(base_file), cfg).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(TokenTuneError, match=match) as info:
        load_peft(tmp_path / "a", NAME, pretrained=str(base_file), **tiny())
    assert "\n" not in str(info.value)


def test_lora_on_other_layers_is_refused(tmp_path, base_file):
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["qkv", "patch_embed.proj"])
    peft.get_peft_model(timm_base(base_file), cfg).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(TokenTuneError, match="patch_embed.proj"):
        load_peft(tmp_path / "a", NAME, pretrained=str(base_file), **tiny())


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    pyra = tokentune.create_model(NAME, method="pyra", tome_r=2, num_classes=5, **tiny())
    with pytest.raises(TokenTuneError, match="save_trained"):
        save_peft(pyra, tmp_path / "p")
    with pytest.raises(TokenTuneError, match="LoRA"):
        save_peft(tokentune.create_model(NAME, method="adapter", num_classes=5, **tiny()), tmp_path / "q")
    assert not (tmp_path / "p" / ADAPTER_WEIGHTS).exists()


def test_export_command_writes_peft_format(tmp_path, base_file, capsys):
    from tokentune.cli import main

    model = tokentune.create_model(NAME, method="lora", num_classes=5, pretrained=str(base_file), **tiny()).eval()
    randomize_lora(model)
    tokentune.save_trained(model, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "adapter"), "--format", "peft"]) == 0
    loaded = peft.PeftModel.from_pretrained(timm_base(base_file), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (loaded(X) - model(X)).abs().max() < 1e-5
    tokentune.save_trained(tokentune.create_model(NAME, method="adapter", num_classes=5, **tiny()), tmp_path / "ad")
    assert main(["export", str(tmp_path / "ad"), str(tmp_path / "x"), "--format", "peft"]) == 2
    assert "offer no 'peft' format" in capsys.readouterr().err
