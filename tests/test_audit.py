"""A new user's audit (bad inputs and silent mistakes): each case is the right behaviour or one line."""
import json

import numpy as np
import pytest
import timm
import torch
from conftest import tiny
from safetensors.torch import save_file

import tokentune
from tokentune import cli
from tokentune.errors import TokenTuneError


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
    assert set(map(tuple, np.asarray(op(image)).reshape(-1, 3).tolist())) == {(0, 0, 0)}
    op.magnitude = 5                                           # 2 bits: 200 -> 192, 130 -> 128, 60 -> 0
    assert set(map(tuple, np.asarray(op(image)).reshape(-1, 3).tolist())) == {(192, 128, 0)}
    assert torch.isfinite(transform(Image.new("RGB", (40, 36), (9, 90, 30)))).all()


# ----------------------------------------------------------------------------- 000: misleading one-liners
@pytest.mark.parametrize("repo, says", [("local-dir:out", "not to the folder 'local-dir:out'"),
                                        ("./out", "not to the folder"), ("x", "write owner/name")])
def test_push_to_hub_to_a_folder_or_a_bad_id_says_what_it_takes(tmp_path, repo, says):
    with pytest.raises(TokenTuneError, match=says) as info:
        tokentune.push_to_hub(tmp_path, repo)
    assert "network" not in str(info.value) and "\n" not in str(info.value)


def _cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_resume_without_config_json_says_the_options_are_lost(tmp_path, capsys):
    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, **tiny())
    tokentune.save_trained(model, tmp_path / "run")
    (tmp_path / "run" / "config.json").unlink()
    code, _, err = _cli(["train", "--out", str(tmp_path / "run"), "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "config.json, which records the run's options, is missing" in err and "no data" not in err


def test_eval_of_an_export_or_a_timm_folder_says_what_it_is(tmp_path, capsys):
    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, **tiny())
    tokentune.export_deployed(model, tmp_path / "export")
    code, _, err = _cli(["eval", str(tmp_path / "export")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "is an export (deployed model), not a run directory" in err and "train" not in err.split(";")[0]
    plain = tokentune.create_model("vit_tiny_patch16_224", "full", num_classes=3, **tiny())
    tokentune.export_deployed(plain, tmp_path / "plain")      # a plain timm model: timm's own config.json
    code, _, err = _cli(["eval", str(tmp_path / "plain")], capsys)
    assert code == 2 and "is an export" in err


def test_a_folder_of_ones_own_in_the_vtab_layout_is_a_dataset(tmp_path):
    from test_data import make_vtab

    from tokentune.engine.data import load_datasets
    make_vtab(tmp_path, "my_task", labels=(0, 1, 4, 2))
    train, test = load_datasets(data_root=str(tmp_path), dataset="my_task")
    assert train.name == "my_task" and train.num_classes == 5 and train.group is None and len(test) == 4
    with pytest.raises(TokenTuneError, match="unknown VTAB-1k dataset 'other'.*in their layout"):
        load_datasets(data_root=str(tmp_path), dataset="other")


def test_the_readme_tradeoff_command_joins_runs_with_the_reproduction_table(tmp_path, capsys):
    import os

    from test_evaluate import write_run
    write_run(tmp_path / "runs", "cifar-lora", "cifar", "lora", 70.0)
    write_run(tmp_path / "runs", "cifar-tome", "cifar", "lora+tome", 68.0)
    table = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "reproduce_vit_b_b16.json")
    code, out, err = _cli(["viz", "tradeoff", str(tmp_path / "runs"), table, "--rename", "LoRA=lora",
                           "--rename", "ToMe (low)=lora+tome", "--out", str(tmp_path / "t.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "t.png").stat().st_size > 0
    from tokentune.tools.viz import load_tradeoff_points
    points = {p.label: p for p in load_tradeoff_points([tmp_path / "runs", table], {"LoRA": "lora"})}
    assert points["lora"].accuracy == 70.0 and points["lora"].throughput == pytest.approx(7.8026, rel=1e-3)


def test_the_docs_name_no_module_path_of_the_old_flat_layout():
    import os
    import re

    from tokentune._compat import MOVED
    root = os.path.join(os.path.dirname(__file__), "..")
    for doc in ("README.md", "CONTRIBUTING.md"):
        text = open(os.path.join(root, doc), encoding="utf-8").read()
        old = [m for m in MOVED if re.search(rf"(from|import) {re.escape(m)}\b|`{re.escape(m)}\.\w", text)]
        assert not old, f"{doc} uses the deprecated module path(s) {old}"


# ----------------------------------------------------------------------------- 1, 2: segmentation batches
def test_an_all_ignored_mask_adds_zero_loss_and_the_rest_is_plain_cross_entropy():
    from tokentune.tasks.segmentation import criterion
    loss = criterion(tokentune.TrainConfig(label_smoothing=0.1))
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    ignored = torch.full((2, 5, 5), 255)
    value = loss(logits, ignored)
    value.backward()
    assert value.item() == 0.0 and torch.all(logits.grad == 0)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, :2] = 255
    plain = torch.nn.CrossEntropyLoss(ignore_index=255, label_smoothing=0.1)(logits, target)
    assert torch.allclose(loss(logits, target), plain, rtol=1e-5, atol=1e-6)


def test_segmentation_trains_on_all_ignored_masks_and_a_batch_of_one(tmp_path, capsys):
    from PIL import Image
    from seg_data import write_folder
    from test_segmentation import TINY_ARGS
    root = write_folder(str(tmp_path / "seg"), num_classes=3, num_train=5, num_test=2)
    for i in range(4):                              # 4 of 5 masks all "ignore": some batch of 2 has no label
        Image.new("L", (36, 36), 255).save(tmp_path / "seg" / "train" / "masks" / f"{i:03d}.png")
    code, out, err = _cli(["train", "--task", "segmentation", "--image-folder", root, "--num-classes", "3",
                           "--method", "lora", "--epochs", "1", "--out", str(tmp_path / "run")] + TINY_ARGS
                          + ["--drop-last", "false"], capsys)
    assert code == 0, err                           # 5 images in batches of 2: the last batch holds one
    assert json.loads((tmp_path / "run" / "results.json").read_text())["miou"] is not None


# ----------------------------------------------------------------------------- 3: segmentation scales follow the data
def test_segmentation_rescales_as_the_data_needs_and_says_so(tmp_path):
    from seg_data import write_ade, write_folder

    from tokentune.tasks.segmentation import ade20k_dataset, describe, mask_folder_dataset, set_transforms
    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, task="segmentation",
                                   segmentation_channels=16, **tiny())
    folder = write_folder(str(tmp_path / "seg"), num_classes=3, size=(36, 48))
    train, test = mask_folder_dataset(folder, "train", 3), mask_folder_dataset(folder, "test", 3)
    set_transforms(train, test, model, tokentune.TrainConfig())
    assert train.transform.scale == (32, 32) and test.transform.scale == (32, 32)     # the model's input size
    line = describe(train, test, model)
    assert "training images rescaled to fit 32x32 (x0.5-2), 32x32 crops" in line
    assert "test images rescaled to fit 32x32, slide windows of 32x32, stride 21: 1 window(s) per image" in line
    ade = ade20k_dataset(write_ade(str(tmp_path / "ade"), size=(40, 48)), "validation")
    set_transforms(None, ade, model, tokentune.TrainConfig())
    assert ade.transform.scale == (2048, 512)                                        # ADE20K's setting
    assert "rescaled to fit 2048x512" in describe(None, ade, model) and "window(s) per image" in describe(None, ade, model)


# ----------------------------------------------------------------------------- 4: a peft adapter of another depth
@pytest.mark.parametrize("saved, loaded", [(4, 2), (2, 4)])
def test_load_peft_into_a_model_of_another_depth_names_both_depths(tmp_path, saved, loaded):
    model = tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, **tiny(depth=saved))
    tokentune.save_peft(model, tmp_path / "adapter")
    with pytest.raises(TokenTuneError, match=rf"trained on a model of depth {saved} .* has depth {loaded}") as info:
        tokentune.load_peft(tmp_path / "adapter", "vit_tiny_patch16_224", pretrained=False, depth=loaded)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- 8: method specs
def test_a_repeated_method_is_refused_and_diffrate_without_rates_says_nothing_is_reduced():
    with pytest.raises(TokenTuneError, match="'lora' appears more than once in 'lora\\+lora'"):
        tokentune.create_model("vit_tiny_patch16_224", "lora+lora", num_classes=3, **tiny())
    with pytest.warns(UserWarning, match="keeps every token: nothing is reduced.*search diffrate"):
        tokentune.create_model("vit_tiny_patch16_224", "lora+diffrate", num_classes=3, **tiny())


# ----------------------------------------------------------------------------- 7: hub names given as weights
@pytest.mark.parametrize("source", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "local-dir:some/folder"])
def test_a_model_source_given_as_pretrained_weights_says_where_it_belongs(source, capsys, tmp_path):
    with pytest.raises(TokenTuneError, match=f"pass it as the model: create_model\\('{source}', pretrained=True\\)"):
        tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, pretrained=source, **tiny())
    with pytest.raises(SystemExit) as info:                   # argparse's usage error
        cli.main(["train", "--image-folder", str(tmp_path), "--pretrained", source])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"pass it as the model: --model {source} --pretrained hub" in err


# ----------------------------------------------------------------------------- 5: weights of another patch/image size
def test_weights_of_another_patch_and_image_size_say_what_was_resampled(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "t4.safetensors"))
    with pytest.warns(UserWarning, match=r"t4.safetensors: timm resampled the patch embedding from 4x4 to 8x8 pixel "
                                         r"patches and the position embedding from 65 to 17 positions"):
        tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, pretrained=str(tmp_path / "t4.safetensors"),
                               **tiny(depth=2))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # the same sizes: not a word
        tokentune.create_model("vit_tiny_patch16_224", "lora", num_classes=3, pretrained=str(tmp_path / "t4.safetensors"),
                               **tiny(depth=2, patch_size=4))


# ----------------------------------------------------------------------------- 6: one source split used twice
def test_prepare_vtab_refuses_a_source_split_used_twice(tmp_path):
    from test_data import make_folder

    from tokentune.tools.vtab import prepare_vtab
    make_folder(tmp_path / "src", classes=("a", "b"), per_class=1, splits=("train", "test"))
    with pytest.raises(TokenTuneError, match="source split 'train' is used for both train800 and val200"):
        prepare_vtab(str(tmp_path / "src"), str(tmp_path / "vtab"), "eurosat", {"train800": "train", "val200": "train"})
    assert not (tmp_path / "vtab").exists()                   # nothing written
