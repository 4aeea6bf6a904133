"""VTAB-1k folders, image folders, transforms and one-line errors for bad data."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import tiny
from PIL import Image

import tokentune
import tokentune.engine.data as D
from tokentune.engine.data import (
    VTAB_TASKS,
    build_datasets,
    build_transform,
    image_folder_dataset,
    image_problem,
    load_datasets,
    load_image,
    normalization_stats,
    set_transforms,
    skipped_summary,
    to_rgb,
    vtab_dataset,
    vtab_task,
)
from tokentune.engine.evaluate import evaluate
from tokentune.errors import TokenTuneError
from tokentune.errors import error_line as clean_error


def write_image(path, value=128, size=8, seed=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if seed is None:
        arr = np.full((size, size, 3), value, dtype=np.uint8)
    else:
        arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def make_vtab(root, name="eurosat", splits=None, labels=(0, 1, 2, 9)):
    """A tiny prepared VTAB-1k task: images/<split>/NNNNNN.jpg plus <split>.txt."""
    splits = splits or {"train800val200": labels, "test": labels}
    base = os.path.join(root, name)
    for split, labs in splits.items():
        lines = []
        for i, label in enumerate(labs):
            rel = f"images/{split}/{i:06d}.jpg"
            write_image(os.path.join(base, rel), value=20 * i, seed=i)
            lines.append(f"{rel} {label}")
        with open(os.path.join(base, f"{split}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return base


def make_folder(root, classes=("cat", "dog", "emu"), per_class=2, splits=("train", "test")):
    for split in splits:
        for c, cls in enumerate(classes):
            for i in range(per_class):
                write_image(os.path.join(root, split, cls, f"{i}.jpg"), value=60 * c + i, seed=10 * c + i)
    return root


# ----------------------------------------------------------------------------- VTAB-1k
def test_vtab_registry_has_the_19_tasks_with_groups_and_aliases():
    assert len(VTAB_TASKS) == 19
    groups = [t.group for t in VTAB_TASKS.values()]
    assert groups.count("Natural") == 7 and groups.count("Specialized") == 4 and groups.count("Structured") == 8
    assert vtab_task("cifar100").name == "cifar" and vtab_task("CIFAR").num_classes == 100
    assert vtab_task("oxford_pet").name == "oxford_iiit_pet" and vtab_task("oxford-iiit-pet").num_classes == 37
    assert vtab_task("sun397").num_classes == 397 and vtab_task("smallnorb_ele").num_classes == 9
    assert sum(t.num_classes for t in VTAB_TASKS.values()) == (100 + 102 + 47 + 102 + 37 + 10 + 397 + 2 + 10 + 45 + 5
                                                               + 8 + 6 + 6 + 4 + 16 + 16 + 18 + 9)


def test_unknown_vtab_name_suggests_close_names():
    with pytest.raises(TokenTuneError, match="did you mean clevr_count"):
        vtab_task("clevr_cnt")
    with pytest.raises(TokenTuneError, match="choose from cifar, caltech101"):
        vtab_task("imagenet")


def test_vtab_dataset_reads_list_and_images(tmp_path):
    make_vtab(tmp_path, "eurosat")
    ds = vtab_dataset(tmp_path, "eurosat", "train800val200")
    assert len(ds) == 4 and ds.num_classes == 10 and ds.group == "Specialized" and ds.targets == [0, 1, 2, 9]
    image, label = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 9
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=10, **tiny())
    set_transforms([ds], model)
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # the alias name finds the canonical folder, and a folder named by an alias is found too
    make_vtab(tmp_path, "cifar100", labels=(0, 99))
    assert vtab_dataset(tmp_path, "cifar", "test").name == "cifar"
    # the one-call helper applies the TrainConfig's data options
    from tokentune import TrainConfig
    train, test = build_datasets(model, TrainConfig(normalization="imagenet"), data_root=str(tmp_path), dataset="eurosat")
    assert len(train) == len(test) == 4 and train[0][0].shape == (3, 32, 32)
    assert not torch.allclose(train[0][0], ds[0][0])                       # imagenet mean/std, not 0.5


def test_transform_is_bicubic_resize_and_the_models_normalisation():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3, **tiny())
    assert normalization_stats("auto", model) == ((0.5,) * 3, (0.5,) * 3)      # Google ViT: 0.5/0.5
    assert normalization_stats("imagenet")[0] == pytest.approx((0.485, 0.456, 0.406))
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, 4:] = 255
    img = Image.fromarray(arr)
    x = build_transform(model)(img)
    expected = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    assert torch.allclose(x, (torch.from_numpy(expected).permute(2, 0, 1) - 0.5) / 0.5, atol=1e-6)
    with pytest.raises(TokenTuneError, match="create the model with img_size=64"):
        build_transform(model, image_size=64)
    with pytest.raises(TokenTuneError, match="unknown normalization"):
        build_transform(model, normalization="imagenet21k")


@pytest.mark.parametrize("case, pattern", [
    ("no_root", r"VTAB-1k root .* does not exist"),
    ("no_task", r"no folder for VTAB-1k task 'dtd' in .*; found eurosat"),
    ("no_split", r"no split file test.txt in .*eurosat \(found: train800val200\)"),
])
def test_missing_folders_and_split_files(tmp_path, case, pattern):
    make_vtab(tmp_path, "eurosat", splits={"train800val200": (0, 1)})
    args = {"no_root": (tmp_path / "nope", "eurosat", "test"), "no_task": (tmp_path, "dtd", "test"),
            "no_split": (tmp_path, "eurosat", "test")}[case]
    with pytest.raises(TokenTuneError, match=pattern):
        vtab_dataset(*args)


def test_list_file_errors_name_file_line_and_fix(tmp_path):
    base = make_vtab(tmp_path, "eurosat", splits={"test": (0, 1, 2)})
    list_file = os.path.join(base, "test.txt")
    lines = open(list_file).read().splitlines()

    def rewrite(new_lines):
        with open(list_file, "w") as fh:
            fh.write("\n".join(new_lines) + "\n")

    rewrite(lines[:1] + ["images/test/000001.jpg"] + lines[2:])
    with pytest.raises(TokenTuneError, match=r"malformed line .*test.txt:2: 'images/test/000001.jpg'; expected"):
        vtab_dataset(tmp_path, "eurosat", "test")
    rewrite(lines[:2] + ["images/test/000002.jpg 10"])
    with pytest.raises(TokenTuneError, match=r"label 10 at .*test.txt:3 is out of range 0..9"):
        vtab_dataset(tmp_path, "eurosat", "test")
    rewrite(lines[:2] + ["images/test/000002.jpg -1"])
    with pytest.raises(TokenTuneError, match="label -1"):
        vtab_dataset(tmp_path, "eurosat", "test")
    rewrite(lines + ["images/test/000099.jpg 3"])
    with pytest.raises(TokenTuneError, match=r"1 of 4 images listed in .* do not exist, e.g. .*000099.jpg \(.*test.txt:4\)"):
        vtab_dataset(tmp_path, "eurosat", "test")
    rewrite([])
    with pytest.raises(TokenTuneError, match="lists no images"):
        vtab_dataset(tmp_path, "eurosat", "test")
    with open(list_file, "wb") as fh:
        fh.write(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenTuneError, match="is not a text file"):
        vtab_dataset(tmp_path, "eurosat", "test")


def test_corrupt_image_fails_lazily_naming_the_file(tmp_path):
    base = make_vtab(tmp_path, "eurosat", splits={"test": (0, 1)})
    bad = os.path.join(base, "images/test/000001.jpg")
    with open(bad, "wb") as fh:
        fh.write(b"not a jpeg at all")
    ds = vtab_dataset(tmp_path, "eurosat", "test")        # construction only checks the list
    ds[0]
    with pytest.raises(TokenTuneError, match=r"cannot read image .*000001.jpg \(listed at .*test.txt:2\)"):
        ds[1]


def test_worker_errors_come_back_as_one_line(tmp_path):
    """A TokenTuneError raised in a DataLoader worker reaches the user as its own line."""
    base = make_vtab(tmp_path, "eurosat", splits={"test": (0, 1)})
    with open(os.path.join(base, "images/test/000000.jpg"), "wb") as fh:
        fh.write(b"\x00" * 10)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=10, **tiny())
    ds = vtab_dataset(tmp_path, "eurosat", "test")
    set_transforms([ds], model)
    with pytest.raises(TokenTuneError) as info:
        evaluate(model, ds, batch_size=2, num_workers=1)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot read image") and "000000.jpg" in message
    wrapped = TokenTuneError("Caught TokenTuneError in DataLoader worker process 0.\nOriginal Traceback:\n  ...\n"
                             "tokentune.errors.TokenTuneError: cannot read image x.jpg: bad; fix it")
    assert clean_error(wrapped) == "cannot read image x.jpg: bad; fix it"


# ----------------------------------------------------------------------------- image folders
def test_image_folder_train_test_share_class_indices(tmp_path):
    make_folder(tmp_path / "pets", classes=("cat", "dog", "emu"))
    train, test = load_datasets(image_folder=str(tmp_path / "pets"))       # train800val200 -> train
    assert train.classes == ["cat", "dog", "emu"] and train.num_classes == 3 and len(train) == 6
    assert test.split == "test" and test.targets == train.targets
    # the test split may lack a class but keeps the training indices; a "val" folder stands in for "test"
    make_folder(tmp_path / "few", classes=("a", "b", "c"), splits=("train",))
    make_folder(tmp_path / "few", classes=("b", "c"), splits=("val",))
    train, test = load_datasets(image_folder=str(tmp_path / "few"))
    assert test.split == "val" and sorted(set(test.targets)) == [1, 2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(TokenTuneError, match="does not exist"):
        image_folder_dataset(tmp_path / "missing")
    make_folder(tmp_path / "d", classes=("a", "b"), splits=("train",))
    with pytest.raises(TokenTuneError, match=r"has no 'test' split \(sub-folders: train\)"):
        image_folder_dataset(tmp_path / "d", "test")
    make_folder(tmp_path / "d", classes=("a", "zebra"), splits=("test",))
    with pytest.raises(TokenTuneError, match="class folder.*zebra that the training split lacks"):
        load_datasets(image_folder=str(tmp_path / "d"))
    os.makedirs(tmp_path / "e" / "train" / "empty")
    make_folder(tmp_path / "e", classes=("full",), splits=("train",))
    with pytest.raises(TokenTuneError, match=r"class folder .*empty holds no images"):
        image_folder_dataset(tmp_path / "e", "train")
    with pytest.raises(TokenTuneError, match="either a VTAB-1k dataset .* or --image-folder"):
        load_datasets(data_root=str(tmp_path), dataset="cifar", image_folder=str(tmp_path / "d"))
    with pytest.raises(TokenTuneError, match="needs --data ROOT"):
        load_datasets(dataset="cifar")
    with pytest.raises(TokenTuneError, match="no data"):
        load_datasets()


def test_bom_in_a_list_file_is_not_part_of_the_first_path(tmp_path):
    base = make_vtab(tmp_path, "eurosat", splits={"test": (0, 1)})
    list_file = os.path.join(base, "test.txt")
    text = open(list_file, encoding="utf-8").read()
    with open(list_file, "w", encoding="utf-8-sig") as fh:        # what Windows editors write
        fh.write(text)
    assert open(list_file, "rb").read(3) == b"\xef\xbb\xbf"
    ds = vtab_dataset(tmp_path, "eurosat", "test")
    assert ds.samples[0] == (os.path.join(base, "images/test/000000.jpg"), 0)


# ----------------------------------------------------------------------------- image modes
def png_bytes(array, color_type):
    """A PNG with 16 bits per sample, written by hand: PIL cannot write 16-bit colour PNGs."""
    height, width = array.shape[:2]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


GRADIENT16 = np.arange(0, 65536, 300, dtype=np.uint16)          # 219 grey levels, 16-bit


@pytest.mark.parametrize("mode, fmt", [("I;16", "png"), ("I;16B", "tiff"), ("I;16L", "tiff"), ("I", "tiff")])
def test_16_bit_grey_keeps_its_levels(tmp_path, mode, fmt):
    values = np.tile(GRADIENT16, (2, 1))
    dtype = {"I;16B": ">u2", "I": "<i4"}.get(mode, "<u2")
    path = str(tmp_path / f"grey.{fmt}")
    Image.frombytes(mode, values.shape[::-1], values.astype(dtype).tobytes()).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (2, len(GRADIENT16), 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert len(np.unique(rgb)) >= 200                                # convert("RGB") left 2 of them
    assert (rgb[0, :, 0] == GRADIENT16 >> 8).all()                   # the documented scaling: v >> 8


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4)])
def test_16_bit_colour_png(tmp_path, color_type, channels):
    array = np.zeros((2, len(GRADIENT16), channels), dtype=np.uint16)
    array[..., 0] = GRADIENT16
    array[..., 1] = 65535 - GRADIENT16
    array[..., 2] = 40000
    if channels == 4:
        array[..., 3] = 65535                                         # opaque: no background shows
    path = tmp_path / "colour16.png"
    path.write_bytes(png_bytes(array, color_type))
    rgb = np.asarray(load_image(str(path)))
    assert len(np.unique(rgb[..., 0])) >= 200
    assert (rgb[0, :, 0] == GRADIENT16 >> 8).all() and (rgb[0, :, 1] == (65535 - GRADIENT16) >> 8).all()
    assert (rgb[..., 2] == 40000 >> 8).all()


def test_float_images_in_0_1_and_refused_otherwise(tmp_path):
    values = np.linspace(0, 1, 256, dtype=np.float32).reshape(2, 128)
    Image.fromarray(values).save(tmp_path / "ok.tiff")
    rgb = np.asarray(load_image(str(tmp_path / "ok.tiff")))
    assert (rgb[..., 1] == np.round(values * 255)).all() and len(np.unique(rgb)) == 256
    Image.fromarray(values * 300).save(tmp_path / "bright.tiff")
    with pytest.raises(TokenTuneError, match=r"cannot use image .*bright.tiff: float image \(mode F\) with values "
                                             r"from 0 to 300, not within \[0, 1\]; scale it"):
        load_image(str(tmp_path / "bright.tiff"))
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "wide.tiff")
    with pytest.raises(TokenTuneError, match=r"wide.tiff: 32-bit integer image \(mode I\) with values from 0 to 70000"):
        load_image(str(tmp_path / "wide.tiff"))


def test_palette_and_alpha_composite_on_white(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(str(tmp_path / "p.png"))).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    pal.save(tmp_path / "p_trns.png", transparency=1)                 # green is the transparent index
    assert np.asarray(load_image(str(tmp_path / "p_trns.png"))).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8))
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(load_image(str(tmp_path / "rgba.png"))).astype(int)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - 127).max() <= 1                         # half-transparent black on white
    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(str(tmp_path / "la.png"))).tolist() == [[[100] * 3, [255] * 3]]


def test_cmyk_ycbcr_bilevel_and_exif_orientation(tmp_path):
    Image.new("CMYK", (2, 2), (100, 50, 0, 50)).save(tmp_path / "cmyk.tiff")
    expected = [(255 - c) * (255 - 50) / 255 for c in (100, 50, 0)]          # (125.0, 165.0, 205.0)
    assert np.abs(np.asarray(load_image(str(tmp_path / "cmyk.tiff")))[0, 0] - expected).max() <= 1
    red = to_rgb(Image.new("YCbCr", (1, 1), (76, 85, 255))).getpixel((0, 0))
    assert np.abs(np.subtract(red, (255, 0, 0))).max() <= 2
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "bw.png")
    assert np.asarray(load_image(str(tmp_path / "bw.png"))).tolist() == [[[0] * 3, [255] * 3]]
    # stored 16 wide x 8 high, left half red; orientation 6 = "rotate 90 degrees clockwise to view"
    arr = np.zeros((8, 16, 3), dtype=np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(str(tmp_path / "phone.jpg"))).astype(int)
    assert upright.shape == (16, 8, 3)
    assert upright[2, 4, 0] > 200 and upright[2, 4, 2] < 50            # the left (red) half is now on top
    assert upright[13, 4, 2] > 200 and upright[13, 4, 0] < 50


def test_unsupported_mode_is_one_line_naming_file_and_mode(tmp_path):
    Image.new("LAB", (2, 2), (50, 0, 0)).save(tmp_path / "lab.tiff")
    path = str(tmp_path / "lab.tiff")
    with pytest.raises(TokenTuneError) as info:
        load_image(path, where="list.txt:7")
    message = str(info.value)
    assert message.startswith(f"cannot use image {path} (listed at list.txt:7): image mode LAB is not supported")
    assert message.endswith("convert the image to 8-bit RGB") and "\n" not in message
    assert image_problem(path).startswith("image mode LAB is not supported")
    assert image_problem(str(tmp_path / "nope.jpg")) == "does not exist"


# ----------------------------------------------------------------------------- checking every image
def break_vtab(base):
    """One missing training image (line 3 of its list) and one corrupt test image (line 2)."""
    os.remove(os.path.join(base, "images/train800val200/000002.jpg"))
    with open(os.path.join(base, "images/test/000001.jpg"), "wb") as fh:
        fh.write(b"not a jpeg at all")


def test_load_datasets_checks_both_splits_before_anything_runs(tmp_path):
    base = make_vtab(tmp_path, "eurosat")
    break_vtab(base)
    with pytest.raises(TokenTuneError) as info:
        load_datasets(data_root=str(tmp_path), dataset="eurosat")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("2 image(s) cannot be used (1 of 4 in eurosat train800val200, 1 of 4 in eurosat test), "
                              f"e.g. {base}/images/train800val200/000002.jpg (listed at {base}/train800val200.txt:3): "
                              "does not exist; re-extract the dataset")
    assert message.endswith("or pass --skip-bad-images (Python: skip_bad_images=True) to leave them out")
    train, test = load_datasets(data_root=str(tmp_path), dataset="eurosat", skip_bad_images=True)
    assert len(train) == len(test) == 3 and train.targets == [0, 1, 9] and test.targets == [0, 2, 9]
    assert [s["origin"] for s in test.describe()["skipped"]] == [f"{base}/test.txt:2"]
    assert test.skipped[0]["reason"].startswith("cannot identify image file")
    assert all(test[i][0].size == (8, 8) for i in range(len(test)))   # what is left reads
    summary = skipped_summary([train, test])
    assert summary.startswith("skipped 2 unusable image(s) (1 of 4 in eurosat train800val200, 1 of 4 in eurosat test): ")
    assert summary.endswith("000001.jpg (listed at " + f"{base}/test.txt:2): cannot identify image file")
    assert "000002.jpg (listed at" in summary and "000001.jpg (listed at" in summary and "\n" not in summary


def test_check_images_in_image_folders_unsupported_modes_and_empty_splits(tmp_path, capsys, monkeypatch):
    folder = make_folder(tmp_path / "pets", classes=("cat", "dog"))
    Image.new("LAB", (4, 4)).save(folder / "test" / "dog" / "lab.tiff")
    with pytest.raises(TokenTuneError, match=r"1 image\(s\) cannot be used \(1 of 5 in pets test\), e.g. "
                                             r".*lab.tiff: image mode LAB is not supported"):
        load_datasets(image_folder=str(folder))
    monkeypatch.setattr(D, "PROGRESS_MIN_IMAGES", 3)                  # large splits show a bar
    train, test = load_datasets(image_folder=str(folder), skip_bad_images=True, progress=True)
    assert "checking pets train images" in capsys.readouterr().err
    assert len(test) == 4 and test.skipped[0]["origin"] == str(folder / "test" / "dog" / "lab.tiff")
    for cls in ("cat", "dog"):                                        # nothing left to train on: still an error
        for name in os.listdir(folder / "train" / cls):
            (folder / "train" / cls / name).write_bytes(b"")
    with pytest.raises(TokenTuneError, match=r"none of the 4 images of pets train can be used, e.g. .*cat.0.jpg: "
                                             r"cannot identify image file"):
        load_datasets(image_folder=str(folder), skip_bad_images=True)
