"""Random augmentation with data-loader workers: every sample's draws depend on (seed, epoch, index)
only, so runs with 0, 1 or 2 workers see the same samples and a run stopped and resumed ends with
the weights of an uninterrupted one, for classification (timm's RandAugment), segmentation and video
(LoRA, LoRA + ToMe here; DyT with 2 workers in test_segmentation's and test_video's CLI tests)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from seg_data import write_ade
from test_cli import TINY_ARGS
from test_data import make_folder
from test_segmentation import TINY_ARGS as SEG_ARGS
from test_video import TINY_ARGS as VIDEO_ARGS
from video_data import write_lists

from tokentune import StreamDataset, TrainConfig, cli
from tokentune.engine.seeding import sample_seed, seeded_generators
from tokentune.engine.training import training_loader


class _Draws(torch.utils.data.Dataset):
    """Each item: what Python's, numpy's and torch's global generators give, and the index."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(())), index],
                            dtype=torch.float64)


def _epochs(workers, start=0, epochs=(0, 1)):
    sampler, loader, _ = training_loader(_Draws(), TrainConfig(batch_size=4, num_workers=workers, seed=3))
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch, start=start if epoch == epochs[0] else 0)
        out.append(torch.cat(list(loader)))
    return out


def test_sample_draws_depend_on_seed_epoch_and_index_only_whatever_the_workers():
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    ref = _epochs(0)
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    for workers in (1, 2):
        got = _epochs(workers)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), workers
    resumed = _epochs(2, start=4, epochs=(1,))                    # a resume inside epoch 2 with 2 workers
    assert torch.equal(resumed[0], ref[1][4:])
    # other epochs and other samples draw other values
    by_index = [{int(r[3]): r[:3] for r in e} for e in ref]
    assert all(not torch.equal(by_index[0][i], by_index[1][i]) for i in range(12))
    assert len({tuple(v.tolist()) for v in by_index[0].values()}) == 12
    with seeded_generators(sample_seed(3, 1, 5)):
        expected = [random.random(), float(np.random.rand()), float(torch.rand(()))]
    assert by_index[1][5].tolist() == expected


class _DrawingTransform:
    """A stream's transform: the image's mean, then the three generators' draws."""

    def __call__(self, image):
        return torch.tensor([float(np.asarray(image).mean()), random.random(), float(np.random.rand()),
                             float(torch.rand(()))], dtype=torch.float64)


def _stream_epochs(workers, start=0, epochs=(0, 1)):
    items = [(Image.new("RGB", (4, 4), (10 * i, 0, 0)), i % 3) for i in range(12)]
    stream = StreamDataset(items, epoch_size=12, transform=_DrawingTransform(), num_classes=3)
    sampler, loader, _ = training_loader(stream, TrainConfig(batch_size=4, num_workers=workers, seed=3))
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch, start=start if epoch == epochs[0] else 0)
        out.append(torch.cat([x for x, _ in loader]))
    return out


def test_stream_transforms_draw_the_same_whatever_the_workers_and_after_a_resume():
    ref = _stream_epochs(0)
    got = _stream_epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert torch.equal(_stream_epochs(2, start=8, epochs=(1,))[0], ref[1][8:])
    assert not torch.equal(ref[0][:, 1:], ref[1][:, 1:])              # another epoch, other draws


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


def _stopped_and_resumed(base, tmp_path):
    assert cli.main(base + ["--out", str(tmp_path / "full")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--max-steps", "1"]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    _assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_classification_with_randaugment_resumes_exactly_with_workers(tmp_path):
    folder = make_folder(tmp_path / "shapes", per_class=2)
    base = (["train", "--image-folder", str(folder), "--epochs", "2", "--augment", "timm",
             "--auto-augment", "rand-m9-mstd0.5", "--lora-dropout", "0.1"] + TINY_ARGS + ["--num-workers", "2"])
    _stopped_and_resumed(base, tmp_path)
    assert cli.main(base[:-2] + ["--num-workers", "0", "--out", str(tmp_path / "w0")]) == 0
    _assert_same_run(tmp_path / "full", tmp_path / "w0")        # the same run in the training process


@pytest.mark.slow          # the default suite: test_segmentation's CLI test, with 2 workers
def test_segmentation_resumes_exactly_with_workers(tmp_path):
    data = write_ade(str(tmp_path / "ade"), num_train=4, num_val=2)
    _stopped_and_resumed(["train", "--task", "segmentation", "--data", data, "--method", "lora", "--epochs", "2",
                          "--eval-every", "0"] + SEG_ARGS + ["--num-workers", "2"], tmp_path)


@pytest.mark.slow          # the default suite: test_video's CLI test, with 2 workers
def test_video_resumes_exactly_with_workers(tmp_path):
    data = write_lists(str(tmp_path / "vid"), per_split=(4, 2), frames=12, as_video=False)
    _stopped_and_resumed(["train", "--task", "video", "--data", data, "--method", "lora+tome", "--tome-r", "2",
                          "--epochs", "2", "--eval-every", "0"] + VIDEO_ARGS + ["--num-workers", "2"], tmp_path)
