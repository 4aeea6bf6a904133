"""tokentune bench for the tasks: per-clip and per-segmentation-image FLOPs, throughput and training steps."""
import pytest
import torch
from conftest import tiny

import tokentune
from tokentune.core.flops import count_flops
from tokentune.tools.bench import BenchSettings, _targets, display_rows, measure, parse_config

TINY_TIMM = {k: v for k, v in tiny().items()}


def _settings(task, train, **options):
    return BenchSettings(model="vit_tiny_patch16_224", timm_kwargs=TINY_TIMM, batch_size=2, rounds=1, warmup=1,
                         latency=False, memory=False, train=train, train_steps=1, num_classes=3, task=task,
                         task_options=options)


@pytest.mark.parametrize("task,options,unit,shape", [
    ("video", {"video_frames": 3}, "clip", (2, 3, 3, 32, 32)),
    pytest.param("segmentation", {"segmentation_channels": 8}, "image", (2, 3, 32, 32), marks=pytest.mark.slow),
])
def test_bench_measures_per_sample_of_a_task(task, options, unit, shape):
    train = task == "segmentation"           # the training step with per-pixel targets (slow: memory tracing)
    result = measure([parse_config("lora"), parse_config("lora+tome:tome_r=2")], _settings(task, train, **options))
    lora, tome = result.rows
    assert lora["unit"] == unit and f"{task} task, per {unit}" in result.title
    assert ((lora["train_step_s"] or 0) > 0) == train and lora["img_per_s"] > 0 and tome["tokens_out"] < tome["tokens_in"]
    assert tome["flops"] < lora["flops"] and tome["flops_ratio"] > 1
    per = "img" if unit == "image" else "clips"
    assert f"{per}/s" in display_rows(result)[0]
    # FLOPs per sample = one forward of the whole batch (clips, images) / batch
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3, task=task, **options, **tiny())
    inputs = model.task_head.example_input(model, 2)
    assert inputs.shape == shape
    assert lora["flops"] == pytest.approx(count_flops(tokentune.deploy(model), inputs) / 2, rel=1e-6)


def test_training_targets_follow_the_task_outputs():
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3, task="segmentation",
                                   segmentation_channels=8, **tiny()).eval()
    targets = _targets(model, model.task_head.example_input(model, 2))
    assert targets.shape == (2, 32, 32) and targets.dtype == torch.int64 and 0 <= int(targets.min()) <= int(targets.max()) < 3
