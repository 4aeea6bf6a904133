"""Semantic segmentation: the head on multi-level features, data layouts and checks, transforms, sliding
inference and scores, DyT's losses per pixel, and the real train / resume / eval / export path."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny
from PIL import Image
from seg_data import write_ade, write_folder

import tokentune
from tokentune import cli
from tokentune.engine.checkpoint import trained_state_dict
from tokentune.errors import TokenTuneError
from tokentune.methods.dyt.loss import dyt_loss
from tokentune.tasks.segmentation import (
    ade20k_dataset,
    evaluate_segmentation,
    infer,
    load_data,
    mask_folder_dataset,
    scores,
    set_transforms,
)
from tokentune.tasks.segmentation.data import TrainTransform

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--pretrained", "none", "--timm", "img_size=32", "--timm", "patch_size=8",
             "--timm", "embed_dim=48", "--timm", "depth=4", "--timm", "num_heads=3", "--segmentation-channels", "16",
             "--segmentation-scale", "64,32", "--batch-size", "2", "--num-workers", "0", "--no-progress"]


def seg_model(method="lora", classes=5, **options):
    torch.manual_seed(0)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=classes, task="segmentation",
                                  segmentation_channels=16, segmentation_scale=(64, 32), **options, **tiny())


@pytest.mark.parametrize("method,options", [("lora+tome", {"tome_r": 2}), ("pyra", {"tome_r": 2}), ("dyt", {})])
def test_model_outputs_pixel_logits_and_deploys(method, options):
    model = seg_model(method, **options)
    randomize_lora(model)
    x = torch.randn(2, 3, 32, 32)
    out, state = model(x, return_state=True)
    assert out.shape == (2, 5, 32, 32) and model.num_classes == 0          # timm's classifier is gone
    assert all(p.requires_grad for p in model.task_head.parameters())
    counts = tokentune.count_parameters(model)
    assert counts["head"] == sum(p.numel() for p in model.task_head.parameters())   # outside the paper count
    model.eval()
    deployed = tokentune.deploy(model)
    assert "task_head" in deployed._modules
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)


def test_head_reads_the_unmerged_levels_of_the_reference_blocks():
    model = seg_model("lora+tome", tome_r=2).eval()
    assert model.task_head.levels == [0, 1, 2, 3]          # depth 4: evenly spaced, ending with the last block
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        levels = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        head = model.task_head
        want = F.interpolate(head.decoder(head.neck(levels)), size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(model(x), want, atol=1e-6)
    assert [t.shape[-1] for t in head.neck(levels)] == [16, 8, 4, 2]      # strides 2, 4, 8, 16 of an /8 grid


def test_scores_from_a_confusion_matrix():
    confusion = torch.tensor([[3.0, 1, 0], [0, 2, 0], [0, 0, 0]])          # class 2 neither labelled nor predicted
    s = scores(confusion)
    assert s["miou"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)
    assert s["pixel_acc"] == pytest.approx(100 * 5 / 6)
    assert s["macc"] == pytest.approx(100 * (3 / 4 + 1) / 2)
    assert s["per_class_iou"][2] is None


def test_slide_inference_equals_mmseg_loop_and_whole_at_the_input_size():
    model = seg_model().eval()
    image = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        got = infer(model, image, 5, "slide", stride=21, batch_size=3)
        # mmseg's slide_inference written out: window by window
        total, count = torch.zeros(1, 5, 40, 52), torch.zeros(1, 1, 40, 52)
        for r in range((40 - 32 + 20) // 21 + 1):
            for c in range((52 - 32 + 20) // 21 + 1):
                y1, x1 = min(r * 21 + 32, 40), min(c * 21 + 32, 52)
                y0, x0 = max(y1 - 32, 0), max(x1 - 32, 0)
                total[..., y0:y1, x0:x1] += model(image[..., y0:y1, x0:x1])
                count[..., y0:y1, x0:x1] += 1
        assert torch.allclose(got, total / count, atol=1e-5)
        square = torch.randn(1, 3, 32, 32)
        assert torch.allclose(infer(model, square, 5, "slide"), infer(model, square, 5, "whole"), atol=1e-5)
        small = torch.randn(1, 3, 20, 24)                                     # padded to one window
        assert infer(model, small, 5, "slide").shape == (1, 5, 20, 24)


def test_ade20k_layout_labels_and_transforms(tmp_path):
    root = write_ade(str(tmp_path / "ade"), num_train=2, num_val=1)
    train, test = load_data(data_root=root)
    assert (train.num_classes, train.split, test.split, len(train)) == (150, "training", "validation", 2)
    raw = np.asarray(Image.open(train.samples[0][1]), dtype=np.int64)
    labels = train.labels(0)
    assert (labels[raw == 0] == 255).all() and (labels[raw > 0] == raw[raw > 0] - 1).all()   # reduce_zero_label
    model = seg_model()
    set_transforms(train, test, model, tokentune.TrainConfig(normalization="inception"))
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    x, y = test[0]
    assert x.shape == (3, 32, 38) and y.shape == (40, 48)       # rescaled into (64, 32) for the model; mask kept


def test_train_crop_pads_with_the_ignore_index_and_flips_image_and_mask_together():
    image = Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8))
    mask = np.arange(120).reshape(10, 12) % 3
    t = TrainTransform(16, scale=(12, 10), ratio_range=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1), photometric=False)
    x, y = t(image, mask)
    assert x.shape == (3, 16, 16) and (y[10:] == 255).all() and (y[:, 12:] == 255).all() and (x[:, 10:] == 0).all()
    flips = set()
    for _ in range(8):
        _, y = t(image, mask)
        flips.add(int(y[0, 0]))
    assert flips == {0, 2}                # unflipped starts with label 0, flipped with mask[0, 11] = 2


def test_bad_masks_are_one_line_and_skipped_only_when_asked(tmp_path):
    root = write_folder(str(tmp_path / "seg"), num_classes=3)
    with pytest.raises(TokenTuneError, match="--num-classes"):
        load_data(image_folder=root, train_split="train", test_split="test")
    train, _ = load_data(image_folder=root, train_split="train", test_split="test", num_classes=3)
    Image.fromarray(np.full((36, 36), 7, dtype=np.uint8), "L").save(train.samples[0][1])
    with pytest.raises(TokenTuneError, match=r"holds label 7, outside the 3 classes \(0..2, 255 ignored\)"):
        train.labels(0)
    Image.fromarray(np.zeros((30, 36), dtype=np.uint8), "L").save(train.samples[1][1])
    with pytest.raises(TokenTuneError, match="1 image/mask pair.*is 36x36 but its mask .* is 36x30.*--skip-bad-images"):
        load_data(image_folder=root, train_split="train", test_split="test", num_classes=3)
    train, _ = load_data(image_folder=root, train_split="train", test_split="test", num_classes=3, skip_bad_images=True)
    assert len(train) == 3 and "36x30" in train.skipped[0]["reason"] and train.describe()["skipped"]
    os.remove(mask_folder_dataset(root, "test", 3).samples[0][1])
    with pytest.raises(TokenTuneError, match="have no mask"):
        mask_folder_dataset(root, "test", 3)


def test_dyt_losses_apply_per_pixel():
    model = seg_model("dyt", classes=3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    y[0, :4] = 255
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    torch.manual_seed(5)
    loss, logs = dyt_loss(model, x, y, criterion)
    torch.manual_seed(5)            # the same forward by hand: dynamic rows, then complete rows
    rows = torch.tensor([False, False, True, True])
    out, state = model(torch.cat([x, x]), return_state=True, dyt_complete=rows)
    dyn, full = out[:2].detach(), out[2:].detach()
    kl = (full.softmax(1) * (full.log_softmax(1) - dyn.log_softmax(1))).sum(1).mean()
    assert logs["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert logs["ce"] == pytest.approx(float(criterion(dyn, y)), rel=1e-5)
    assert logs["ce_complete"] == pytest.approx(float(criterion(full, y)), rel=1e-5)
    assert 0 < logs["rate"] < 1
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "dispatcher" in n)


def test_batchnorm_statistics_are_saved_with_the_trained_tensors():
    model = seg_model()
    names = trained_state_dict(model)
    assert any(n.endswith("running_mean") for n in names) and any(n.endswith("num_batches_tracked") for n in names)


def _files(path):
    return {n: t.clone() for n, t in tokentune.engine.checkpoint.load_safetensors(os.path.join(path, "model.safetensors"),
                                                                                   "").items()}


def test_cli_trains_resumes_evaluates_and_exports(tmp_path, capsys):
    data = write_ade(str(tmp_path / "ade"), num_train=4, num_val=2)
    base = ["train", "--task", "segmentation", "--data", data, "--method", "dyt", "--epochs", "2"] + TINY_ARGS
    base += ["--num-workers", "2"]           # exact resume with loader workers
    assert cli.main(base + ["--out", str(tmp_path / "full")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--max-steps", "1"]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = _files(str(tmp_path / "full")), _files(str(tmp_path / "cut"))
    assert sorted(full) == sorted(cut) and all(torch.equal(full[k], cut[k]) for k in full)   # bit-exact resume
    results = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert results["metric"] == "miou" and results["task"] == "segmentation" and results["miou"] is not None
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "cut"), "--deploy", "--num-workers", "0", "--no-progress",
                     "--json", str(tmp_path / "eval.json")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("ade20k validation: miou ") and "pixel_acc" in line and "[deployed]" in line
    assert json.loads((tmp_path / "eval.json").read_text())["miou"] == pytest.approx(results["miou"], abs=1e-6)
    assert cli.main(["export", str(tmp_path / "cut"), str(tmp_path / "exp"), "--verify"]) == 0
    loaded = tokentune.load_deployed(str(tmp_path / "exp"))
    model = tokentune.load_trained(str(tmp_path / "cut")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    test = ade20k_dataset(data, "validation")
    set_transforms(None, test, loaded, tokentune.TrainConfig())
    assert evaluate_segmentation(loaded, test)["miou"] == pytest.approx(results["miou"], abs=1e-6)


def test_cli_refuses_task_options_without_the_task(tmp_path, capsys):
    assert cli.main(["train", "--image-folder", str(tmp_path), "--segmentation-channels", "8"]) == 2
    assert "need --task segmentation" in capsys.readouterr().err


def test_summarize_puts_task_runs_in_their_own_columns(tmp_path):
    from tokentune.engine.evaluate import summarize, summary_markdown

    for name, rec in (("seg", {"dataset": "ade20k", "method": "dyt", "task": "segmentation", "metric": "miou",
                               "miou": 41.5, "best_miou_over_epochs": 42.0, "data": {"kind": "ade20k"}}),
                      ("cls", {"dataset": "cifar", "method": "dyt", "top1": 70.0, "data": {"kind": "vtab"}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(rec))
    summary = summarize([str(tmp_path)])
    assert summary["tasks"] == ["cifar"] and summary["other_datasets"] == ["ade20k (miou)"]
    assert summary["other_rows"][0]["per_dataset"] == {"ade20k (miou)": 41.5}
    assert summarize([str(tmp_path)], metric="best_top1_over_epochs")["other_rows"][0]["per_dataset"]["ade20k (miou)"] == 42.0
    assert "ade20k (miou)" in summary_markdown(summary)
