"""Data from anywhere: torchvision and Hugging Face datasets, iterable streams and webdataset shards
train and evaluate like tokentune's own datasets; a stream's epochs are the same with any number of
loader workers, and a run stopped inside an epoch resumes to the uninterrupted run's weights."""
import io

import numpy as np
import pytest
import torch
from conftest import tiny
from PIL import Image
from safetensors.torch import load_file

import tokentune
from tokentune import ImageSource, StreamDataset, TrainConfig
from tokentune.engine.data import build_transform, set_transforms
from tokentune.engine.evaluate import evaluate
from tokentune.engine.training import train
from tokentune.errors import TokenTuneError


def photos(n=24, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % classes
        array = rng.integers(0, 120, (36, 40, 3), dtype=np.uint8)
        array[..., label] += 100                     # a learnable colour cue
        out.append((Image.fromarray(array), label))
    return out


class Photos(torch.utils.data.IterableDataset):
    """A deterministic stream that counts its epochs (set_epoch) and reshuffles per epoch."""

    def __init__(self, items):
        self.items, self.epoch = items, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng(100 + self.epoch).permutation(len(self.items))
        for i in order:
            yield self.items[i]


def model(seed=0):
    return tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3, seed=seed, **tiny())


def cfg(**kw):
    base = dict(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0, num_workers=0, eval_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_torchvision_dataset_and_evaluation_equal_the_tensor_dataset():
    from torchvision.datasets import FakeData

    fake = FakeData(size=10, image_size=(3, 36, 40), num_classes=3, random_offset=3)
    m = model().eval()
    source = ImageSource(fake, name="fake")
    set_transforms([source], m)
    assert source.num_classes == 3 and len(source) == 10
    transform = build_transform(m)
    tensors = torch.utils.data.TensorDataset(torch.stack([transform(fake[i][0]) for i in range(10)]),
                                             torch.tensor([fake[i][1] for i in range(10)]))
    assert evaluate(m, source, batch_size=4) == evaluate(m, tensors, batch_size=4)


def test_a_tensor_dataset_is_evaluated_in_slices_with_the_data_loaders_result(monkeypatch):
    m = model().eval()
    g = torch.Generator().manual_seed(0)
    tensors = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32, generator=g), torch.randint(0, 3, (10,), generator=g))
    loaded = evaluate(m, torch.utils.data.Subset(tensors, range(10)), batch_size=4)     # through a DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", None)                          # slices need none
    sliced = evaluate(m, tensors, batch_size=4)                                         # 4 + 4 + 2 images
    assert sliced["total"] == 10 and sliced["correct"] == loaded["correct"] and 0 < sliced["correct"] < 10
    assert sliced["loss"] == pytest.approx(loaded["loss"], rel=1e-5)


def test_hugging_face_dataset_dict_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    items = photos(12)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"img": [p for p, _ in items], "fine_label": [y for _, y in items]},
                                    features=features)
    source = ImageSource(ds, name="hf-photos")
    assert source.num_classes == 3
    m = model()
    set_transforms([source], m)
    result = train(m, source, source, cfg(epochs=1), log=None, out_dir=str(tmp_path / "run"))
    assert result.finished and result.results["dataset"] == "hf-photos" and result.results["data"]["kind"] == "source"
    plain = [(build_transform(m)(to), y) for to, y in items]
    tensors = torch.utils.data.TensorDataset(torch.stack([x for x, _ in plain]), torch.tensor([y for _, y in plain]))
    assert evaluate(m, source, batch_size=5) == evaluate(m, tensors, batch_size=5)
    with pytest.raises(TokenTuneError, match="image column"):
        ImageSource(ds.rename_column("img", "picture"))[0]


def _stream(items=None, **kw):
    stream = StreamDataset(Photos(items or photos(24)), epoch_size=kw.pop("epoch_size", 20), num_classes=3, **kw)
    stream.transform = build_transform(model())
    return stream


def test_stream_stopped_inside_an_epoch_resumes_exactly(tmp_path):
    c = cfg(epochs=2)
    train(model(), _stream(epoch_size=16), None, c, out_dir=str(tmp_path / "a"), log=None)
    train(model(), _stream(epoch_size=16), None, c, out_dir=str(tmp_path / "b"), log=None, max_steps=3)   # epoch 1
    train(model(), _stream(epoch_size=16), None, c, out_dir=str(tmp_path / "b"), log=None, resume=True)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stream_batches_do_not_depend_on_loader_workers(tmp_path):
    c = cfg(epochs=2)
    train(model(), _stream(), _stream(epoch_size=None), c, out_dir=str(tmp_path / "a"), log=None)
    train(model(), _stream(), _stream(epoch_size=None), cfg(epochs=2, num_workers=2), out_dir=str(tmp_path / "w"),
          log=None)
    a, w = (load_file(str(tmp_path / d / "model.safetensors")) for d in "aw")
    for k in a:
        assert torch.equal(a[k], w[k]), k


def test_evaluating_a_stream_reads_each_sample_once():
    m = model().eval()
    items = photos(13)
    transform = build_transform(m)
    tensors = torch.utils.data.TensorDataset(torch.stack([transform(p) for p, _ in items]),
                                             torch.tensor([y for _, y in items]))
    stream = StreamDataset(iter_items(items), transform=transform)        # any re-iterable, no epoch size
    assert evaluate(m, stream, batch_size=5) == evaluate(m, tensors, batch_size=5)


class iter_items:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_short_stream_is_one_line(tmp_path):
    with pytest.raises(TokenTuneError, match="ended after 24 samples.*epoch_size=40") as info:
        train(model(), _stream(epoch_size=40), None, cfg(epochs=1, batch_size=8), log=None)
    assert "\n" not in str(info.value)
    with pytest.raises(TokenTuneError, match="epoch_size"):
        train(model(), StreamDataset(Photos(photos(4))), None, cfg(epochs=1), log=None)


def test_webdataset_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    items = photos(16)
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:06d}.tar")) as sink:
            for i in range(8):
                image, label = items[shard * 8 + i]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sink.write({"__key__": f"s{shard}_{i:03d}", "png": buf.getvalue(), "cls": str(label).encode()})
    urls = str(tmp_path / "shard-{000000..000001}.tar")
    shards = tokentune.WebDatasetShards(urls, seed=1)
    stream = StreamDataset(shards, epoch_size=16, num_classes=3, name="shards")
    stream.transform = build_transform(model())
    orders = []
    for epoch in (0, 1, 0):
        stream.set_epoch(epoch)
        orders.append([int(y) for _, y in stream])
    assert orders[0] == orders[2] and len(orders[0]) == 16          # an epoch is always the same sequence
    assert sorted(orders[0]) == sorted(y for _, y in items)
    result = train(model(), stream, None, cfg(epochs=1), out_dir=str(tmp_path / "a"), log=None)
    assert result.finished and result.global_step == 4 and result.results["data"]["kind"] == "stream"


# ----------------------------------------------------------------------------- prepare-vtab
def _dump(root, counts=(("train800", 6), ("val200", 3), ("test", 4)), classes=3):
    rng = np.random.default_rng(0)
    for split, n in counts:
        for i in range(n):
            d = root / split / str(i % classes)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"img{i}.png")


def test_prepare_vtab_from_split_folders_is_read_by_training(tmp_path, capsys):
    from tokentune.cli import main
    from tokentune.engine.data import vtab_dataset

    _dump(tmp_path / "dump")
    assert main(["data", "prepare-vtab", str(tmp_path / "dump"), "--task", "eurosat", "--out", str(tmp_path / "vtab")]) == 0
    out = capsys.readouterr().out
    assert "train800 6" in out and "train800val200 9" in out and "note: train800 has 6 images (VTAB-1k: 800)" in out
    train_ds = vtab_dataset(str(tmp_path / "vtab"), "eurosat", "train800val200")
    test_ds = vtab_dataset(str(tmp_path / "vtab"), "eurosat", "test")
    assert len(train_ds) == 9 and len(test_ds) == 4 and train_ds.num_classes == 10
    first = (tmp_path / "vtab" / "eurosat" / "train800.txt").read_text().splitlines()[0]
    assert first == "images/train800/000000.png 0"
    # the bytes are copied, not re-encoded
    src = sorted((tmp_path / "dump" / "train800" / "0").iterdir())[0].read_bytes()
    assert (tmp_path / "vtab" / "eurosat" / "images" / "train800" / "000000.png").read_bytes() == src
    assert main(["data", "prepare-vtab", str(tmp_path / "dump"), "--task", "eurosat", "--out", str(tmp_path / "v"),
                 "--splits", "val200=validation"]) == 2
    assert "lacks the split val200 (as 'validation')" in capsys.readouterr().err


def test_prepare_vtab_from_a_saved_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")
    from tokentune.engine.data import vtab_dataset
    from tokentune.tools.vtab import prepare_vtab

    parts = {}
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        items = photos(n, seed=len(parts))
        parts[split] = datasets.Dataset.from_dict({"image": [p for p, _ in items], "label": [y for _, y in items]},
                                                  features=datasets.Features({"image": datasets.Image(),
                                                                              "label": datasets.Value("int64")}))
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    counts = prepare_vtab(str(tmp_path / "hf"), str(tmp_path / "vtab"), "dtd",
                          splits={"train800": "train", "val200": "validation"})
    assert counts == {"train800": 5, "val200": 2, "test": 3, "train800val200": 7}
    ds = vtab_dataset(str(tmp_path / "vtab"), "dtd", "test")
    image, label = ds[1]
    assert label == photos(3, seed=2)[1][1]
    assert np.array_equal(np.asarray(image), np.asarray(photos(3, seed=2)[1][0]))     # lossless
