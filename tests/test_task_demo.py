"""The offline task demos, reduced (patch 8, few samples, one epoch) but through the real pipeline."""
import numpy as np
import pytest
import torch
from PIL import Image

from tokentune.tools.task_demo import TaskDemoConfig, run_task_demo, write_digit_scenes, write_moving_digits


def test_digit_scenes_and_moving_digits_are_real_task_data(tmp_path):
    root = write_digit_scenes(str(tmp_path / "scenes"), 3, 2)
    mask = np.asarray(Image.open(tmp_path / "scenes" / "train" / "masks" / "0000.png"))
    image = np.asarray(Image.open(tmp_path / "scenes" / "train" / "images" / "0000.png"))
    assert mask.shape == image.shape[:2] == (32, 32) and set(np.unique(mask)) <= set(range(6)) and mask.max() > 0
    assert (image[mask > 0].mean() > image[mask == 0].mean() + 60)      # the mask follows the strokes
    write_moving_digits(str(tmp_path / "clips"), 5, 5)
    frames = sorted((tmp_path / "clips" / "train" / "5" / "clip0000").iterdir())
    first, last = (np.asarray(Image.open(f))[..., 0] > 80 for f in (frames[0], frames[-1]))
    assert len(frames) == 8 and first.sum() > 0 and not np.array_equal(first, last)    # it moves
    assert root.endswith("scenes")


@pytest.mark.parametrize("task,metric", [("segmentation", "miou"), ("video", "top1")])
def test_task_demo_table(task, metric, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    lines = []
    try:
        table = run_task_demo(TaskDemoConfig(task=task, epochs=2, train_samples=16, test_samples=4, batch_size=8,
                                             pretrain_epochs=2, patch_size=8, tome_r=(4, 3, 2, 2), bench_batch=4,
                                             bench_rounds=1, workdir=str(tmp_path / "work")), out=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert [r["label"] for r in table] == ["LoRA r=8", "LoRA r=8 + ToMe", "DyT"]
    assert all(0 <= r[metric] <= 100 and r["per_s"] > 0 and r["macs"] > 0 for r in table)
    assert table[1]["macs"] < table[0]["macs"]                      # merging saves multiply-adds
    text = "\n".join(lines)
    assert ("images/s" if task == "segmentation" else "clips/s") in text and "| LoRA r=8 + ToMe" in text
