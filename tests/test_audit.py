"""A new user's audit (bad inputs and silent mistakes): each case is the right behaviour or one line."""
import timm
import torch
from conftest import tiny
from safetensors.torch import save_file

import tokentune


# ----------------------------------------------------------------------------- 0: a new task gets a new head
def _checkpoint(tmp_path, num_classes=10):
    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **tiny())
    with torch.no_grad():
        src.head.weight.normal_(0, 1.0)          # far from timm's trunc_normal(0.02)
        src.head.bias.fill_(3.0)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    return path, src


def test_adapting_to_as_many_classes_starts_from_a_new_head(tmp_path):
    path, src = _checkpoint(tmp_path)
    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=10, pretrained=str(path), **tiny())
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)   # the backbone is loaded
    assert not torch.allclose(model.head.weight, src.head.weight)
    assert model.head.weight.std() < 0.05 and torch.all(model.head.bias == 0)     # timm's initialisation
    assert model.tokentune.spec["pretrained_head"] is False
    kept = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=10, pretrained=str(path),
                                  pretrained_head=True, **tiny())
    assert torch.equal(kept.head.weight, src.head.weight) and kept.tokentune.spec["pretrained_head"] is True
    own = tokentune.create_model("vit_tiny_patch16_224", "lora", pretrained=str(path), **tiny())  # no new task
    assert torch.equal(own.head.weight, src.head.weight)


def test_a_saved_run_rebuilds_with_the_head_it_was_trained_from(tmp_path):
    path, src = _checkpoint(tmp_path)
    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=10, pretrained=str(path),
                                   train_head=False, pretrained_head=True, **tiny())
    tokentune.save_trained(model, tmp_path / "run")
    again = tokentune.load_trained(tmp_path / "run")
    assert torch.equal(again.head.weight, src.head.weight)


# ----------------------------------------------------------------------------- 00: --augment timm on today's Pillow
def test_the_timm_recipe_posterizes_to_zero_bits_as_older_pillow_did():
    from PIL import Image

    from tokentune.engine.augment import augment_ops, train_transform

    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=2, **tiny())
    transform = train_transform(model, tokentune.TrainConfig(augment="timm"))     # the README's recipe
    (op,) = [op for op in augment_ops(transform) if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0       # the strongest level: keep 0 bits
    image = Image.new("RGB", (8, 8), (200, 130, 60))
    assert set(op(image).getdata()) == {(0, 0, 0)}
    op.magnitude = 5                                           # 2 bits: 200 -> 192, 130 -> 128, 60 -> 0
    assert set(op(image).getdata()) == {(192, 128, 0)}
    assert torch.isfinite(transform(Image.new("RGB", (40, 36), (9, 90, 30)))).all()
