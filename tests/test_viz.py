"""Pictures: merged-token maps follow the model's own token state; charts are valid PNGs of the asked size."""
import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import tiny

import tokentune
from tokentune.core.dispatch import activation_stats
from tokentune.errors import TokenTuneError
from tokentune.tools import measure, viz
from tokentune.tools.viz import common as viz_common
from tokentune.tools.viz import merge as viz_merge

pytest.importorskip("matplotlib")


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    with open(path, "rb") as fh:
        head = fh.read(33)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _image(seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((32, 32, 3), dtype=np.float32)
    img[:, 16:, 0] = 1.0
    img[8:24, 4:14, 1] = 1.0
    return np.clip(img + rng.uniform(0, 0.1, img.shape), 0, 1)


def _tome(method="lora+tome", **kw):
    torch.manual_seed(0)
    opts = dict(tome_r=[3, 2, 2, 1])
    opts.update(kw)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, **tiny(**opts)).eval()


@pytest.mark.parametrize("method,kw", [("lora+tome", {}), ("pyra", {}), ("lora+tome", dict(reg_tokens=2, no_embed_class=True))])
def test_token_groups_follow_the_token_state(method, kw):
    model = _tome(method, **kw)
    prefix = model.num_prefix_tokens
    x = torch.randn(2, 3, 32, 32)
    groups = viz.token_groups(model, x)
    assert sorted(groups) == [1, 2, 3, 4]
    counts = tokentune.methods.tome.token_counts([3, 2, 2, 1], 16 + prefix)[1:]
    assert [groups[d][1] for d in (1, 2, 3, 4)] == counts
    # the final groups are exactly the tokens the model ends with, with the sizes it carries
    with torch.no_grad():
        _, state = model(x, return_state=True, trace_source=True)
    g, tokens = groups[4]
    assert g.shape == (2, 4, 4)
    for b in range(2):
        ids, sizes = np.unique(g[b].numpy(), return_counts=True)
        assert len(ids) == tokens - prefix                       # every patch token is some group
        want = state.size[b, prefix + torch.from_numpy(ids), 0]
        assert torch.equal(torch.from_numpy(sizes).float(), want)
    # tracing is a per-forward option (the model is unchanged), hooks removed
    assert model.tokentune.trace_source is False
    assert all(not blk._forward_hooks for blk in model.blocks)


def test_token_groups_before_any_merge_are_single_patches():
    model = _tome(tome_r=[0, 3, 2])
    g, tokens = viz.token_groups(model, torch.randn(1, 3, 32, 32), depths=[1, 2])[1]
    assert tokens == 17 and sorted(g.flatten().tolist()) == list(range(16))
    assert viz.default_depths(model) == [2, 3, 4]


def test_merged_tokens_picture_is_a_png_of_the_asked_size(tmp_path):
    model = _tome()
    path = viz.plot_merged_tokens(model, _image(), tmp_path / "merge.png", depths=[1, 4], panel_size=2.0, dpi=50)
    assert png_size(path) == (3 * 100, 120)                      # 3 panels of 2 in; 2.4 in high; 50 dpi
    # several images (path, PIL, tensor), deployed model, random colours
    from PIL import Image
    Image.fromarray((_image(1) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    images = [str(tmp_path / "in.png"), Image.open(tmp_path / "in.png"), torch.from_numpy(_image(2)).permute(2, 0, 1)]
    path = viz.plot_merged_tokens(tokentune.deploy(model), images, tmp_path / "merge3.png", style="random",
                                  panel_size=1.5, dpi=40)
    assert png_size(path) == (5 * 60, 3 * 76)                    # input + 4 default depths; 1.9 in per row
    assert os.path.getsize(path) > 1000


def test_group_colours_are_group_means():
    pixels = np.zeros((4, 4, 3))
    pixels[:, :2, 0] = 1.0
    groups = np.array([[0, 0], [1, 1]])                          # top row of patches one group, bottom another
    pixels[:2, :2, 1] = 1.0
    out = viz_merge._group_colours(pixels, groups, "mean")
    assert np.allclose(out[0, 0], [0.5, 0.5, 0]) and np.allclose(out[3, 3], [0.5, 0, 0])
    segs = viz_merge._boundaries(groups, 4, 4)
    assert len(segs) == 2                                        # one horizontal border, two patches long


def test_merged_tokens_errors():
    plain = tokentune.create_model("vit_tiny_patch16_224", method="lora", **tiny())
    with pytest.raises(TokenTuneError, match="merges no tokens"):
        viz.token_groups(plain, torch.randn(1, 3, 32, 32))
    with pytest.raises(TokenTuneError, match="depth 9 is outside 1..4"):
        viz.token_groups(_tome(), torch.randn(1, 3, 32, 32), depths=[9])
    with pytest.raises(TokenTuneError, match="does not exist"):
        viz.plot_merged_tokens(_tome(), "missing.jpg", "x.png")
    with pytest.raises(TokenTuneError, match="unknown style"):
        viz_merge._group_colours(np.zeros((4, 4, 3)), np.zeros((2, 2), dtype=int), "fancy")


def test_missing_matplotlib_is_one_clear_line(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(TokenTuneError, match=r"pip install 'tokentune\[viz\]'"):
        viz_common._matplotlib()


def _write_runs(root, runs):
    for i, run in enumerate(runs):
        method, acc, dataset = run if len(run) == 3 else (*run, "cifar")
        d = root / f"run{i}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"method": method, "model": "vit", "top1": acc,
                                                   "best_top1_over_epochs": acc + 1.0, "dataset": dataset}))


def test_tradeoff_accuracy_is_the_vtab_mean_of_group_means(tmp_path):
    _write_runs(tmp_path / "runs", [("lora", 80.0, "cifar"), ("lora", 60.0, "dtd"), ("lora", 90.0, "eurosat"),
                                    ("lora", 30.0, "clevr_count"), ("lora", 34.0, "clevr_count"),
                                    ("tome", 50.0, "cifar"), ("tome", 70.0, "my_folder_data"),
                                    ("mine", 65.0, "my_folder_data")])
    by = {p.label: p for p in viz.load_tradeoff_points([tmp_path / "runs"])}
    assert by["mine"].accuracy == 65.0 and by["mine"].runs == 1      # only image-folder runs: their mean
    # Natural (80, 60) -> 70, Specialized 90, Structured (30, 34 seeds averaged) -> 32
    assert by["lora"].accuracy == pytest.approx((70 + 90 + 32) / 3) and by["lora"].runs == 5
    assert by["tome"].accuracy == pytest.approx(50.0)          # only its VTAB task counts in the VTAB mean


def test_tradeoff_points_join_runs_and_bench_tables(tmp_path):
    _write_runs(tmp_path / "runs", [("lora", 70.0), ("lora", 72.0), ("lora+tome", 69.0), ("pyra", 69.5)])
    rows = [{"model": "lora (merged)", "GMACs": 4.0, "GFLOPs": 8.0, "img/s (median)": 100.0, "img/s (min-max)": "90-110"},
            {"model": "lora+tome", "GMACs": 2.5, "GFLOPs": 5.0, "img/s (median)": 160.0},
            {"model": "pyra", "GMACs": 2.6, "GFLOPs": 5.2, "img/s (median)": 155.0}]
    measure.write_results(str(tmp_path / "bench"), rows, {"device": "cpu: test", "dtype": "fp32"}, list(rows[0]))
    points = viz.load_tradeoff_points([tmp_path / "runs", tmp_path / "bench.json"], rename={"lora (merged)": "lora"})
    by = {p.label: p for p in points}
    assert by["lora"].accuracy == 71.0 and by["lora"].runs == 2
    assert by["lora"].throughput == 100.0 and by["lora"].gmacs == 4.0 and by["lora"].gflops == 8.0
    assert by["pyra"].environment["device"] == "cpu: test"
    best = viz.load_tradeoff_points([tmp_path / "runs"], metric="best_top1_over_epochs")
    assert {p.label: p.accuracy for p in best}["lora"] == 72.0
    for x in ("throughput", "gmacs", "gflops"):
        path = viz.plot_tradeoff(points, tmp_path / f"trade_{x}.png", x=x, size=(4.0, 3.0), dpi=50, title="t")
        assert png_size(path) == (200, 150)
    # straight from files
    path = viz.plot_tradeoff([tmp_path / "runs", tmp_path / "bench.json"], tmp_path / "t.png",
                             rename={"lora (merged)": "lora"}, dpi=40)
    assert png_size(path) == (240, 180)


def test_tradeoff_errors(tmp_path):
    _write_runs(tmp_path / "runs", [("lora", 70.0)])
    rows = [{"method": "lora+tome", "img/s": 10.0}]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with pytest.raises(TokenTuneError, match=r"no method has both an accuracy and a throughput value "
                                             r"\(accuracy: \['lora'\]; throughput: \['lora\+tome'\]\)"):
        viz.plot_tradeoff([tmp_path / "runs", tmp_path / "b.json"], tmp_path / "x.png")
    (tmp_path / "c.json").write_text(json.dumps([{"method": "lora+tome", "img/s": 12.0}]))
    with pytest.raises(TokenTuneError, match="throughput of 'lora\\+tome' is given in both"):
        viz.load_tradeoff_points([tmp_path / "b.json", tmp_path / "c.json"])
    (tmp_path / "d.json").write_text(json.dumps([{"method": "a", "img/s": 1.0}, {"method": "a", "img/s": 2.0}]))
    with pytest.raises(TokenTuneError, match="given twice"):
        viz.load_tradeoff_points([tmp_path / "d.json"])
    with pytest.raises(TokenTuneError, match="unknown x axis"):
        viz.plot_tradeoff([tmp_path / "runs"], tmp_path / "x.png", x="speed")
    with pytest.raises(TokenTuneError, match="does not exist"):
        viz.load_tradeoff_points([tmp_path / "nothing"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TokenTuneError, match="not valid JSON"):
        viz.load_tradeoff_points([tmp_path / "bad.json"])


def _cli(argv):
    from tokentune.cli import main
    return main(["viz"] + argv)


def _error(capsys, text):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and text in err and err.count("\n") == 1, err


def test_viz_commands(tmp_path, capsys):
    from PIL import Image

    from tokentune.tools.export import export_deployed

    export_deployed(_tome(), tmp_path / "export")
    Image.fromarray((_image() * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert _cli(["merge", str(tmp_path / "export"), str(tmp_path / "a.png"), "--out", str(tmp_path / "m.png"),
                 "--depths", "2,4", "--dpi", "40"]) == 0
    assert png_size(tmp_path / "m.png") == (300, 116)               # 3 panels of 2.5 in, 2.9 in high, 40 dpi
    assert "wrote" in capsys.readouterr().out
    _write_runs(tmp_path / "runs", [("lora", 70.0), ("lora+tome", 69.0)])
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [{"model": "lora (merged)", "GMACs": 4.0},
                                                               {"model": "lora+tome", "GMACs": 2.0}]}))
    assert _cli(["tradeoff", str(tmp_path / "runs"), str(tmp_path / "bench.json"), "--x", "gmacs",
                 "--rename", "lora (merged)=lora", "--out", str(tmp_path / "t.png")]) == 0
    assert png_size(tmp_path / "t.png") == (600, 450)
    assert _cli(["tradeoff", str(tmp_path / "runs"), "--rename", "lora", "--out", str(tmp_path / "t.png")]) == 2
    _error(capsys, "--rename expects OLD=NEW")


# ----------------------------------------------------------------------------- DyT pictures
def _dyt(method="dyt", **kw):
    import math
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, dyt_bottleneck=4,
                                   **kw, **tiny()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dispatcher.linear.weight"):
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    return model


@pytest.mark.parametrize("method,kw", [("dyt", {}), ("dyt+tome", dict(tome_r=2)), ("dyt", dict(dyt_variant="attn_mlp"))])
def test_dyt_activation_on_images_equals_activation_stats(method, kw):

    model = _dyt(method, **kw)
    images = [_image(i) for i in range(3)]
    stats, pixels = viz.dyt_activation(model, images, batch_size=2)
    assert len(pixels) == 3 and pixels[0].shape == (32, 32, 3)
    batch, _ = viz_common._model_inputs(model, images, None, None)
    want = activation_stats(model, [batch], keep_masks=True)
    assert stats.names == want.names and stats.per_layer == pytest.approx(want.per_layer)
    assert torch.equal(stats.masks, want.masks) and stats.num_images == 3
    assert 0.05 < stats.overall < 0.95                         # the picture shows a real mix


def test_dyt_pictures_are_pngs_of_the_asked_size(tmp_path):
    model = _dyt()
    path = viz.plot_activated_tokens(tokentune.deploy(model), [_image(0), _image(1)], tmp_path / "tok.png",
                                     layers=[0, 3], panel_size=2.0, dpi=50)
    assert png_size(path) == (300, 240)                        # 3 panels of 2 in; 2 rows of 2.4 in
    stats, _ = viz.dyt_activation(model, [_image(0), _image(1)])
    path = viz.plot_activation_rates(stats, tmp_path / "rates.png", size=(5.0, 3.0), dpi=40)
    assert png_size(path) == (200, 120)
    other, _ = viz.dyt_activation(model, [_image(2)])
    path = viz.plot_activation_rates({"a": stats, "b": other}, tmp_path / "rates2.png", dpi=40)
    assert png_size(path) == (280, 140)
    attn_mlp, _ = viz.dyt_activation(_dyt(dyt_variant="attn_mlp"), [_image(0)])
    with pytest.raises(TokenTuneError, match="same DyT variant"):
        viz.plot_activation_rates({"a": stats, "b": attn_mlp}, tmp_path / "x.png")
    path = viz.plot_activation_rates(attn_mlp, tmp_path / "rates3.png", dpi=40)
    assert png_size(path) == (280, 140)


def test_activated_tokens_dim_exactly_the_skipped_patches(tmp_path, monkeypatch):
    """The panels show the mask of activation_stats: skipped patches dimmed, active ones untouched."""
    model = _dyt()
    shown = []
    from matplotlib.axes import Axes
    real_imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, img, **kw: (shown.append(np.array(img)), real_imshow(self, img, **kw))[1])
    viz.plot_activated_tokens(model, [_image(0)], tmp_path / "tok.png", layers=[1], dim=0.0)
    stats, pixels = viz.dyt_activation(model, [_image(0)])
    mask = np.repeat(np.repeat(stats.masks[0, 1].reshape(4, 4).numpy(), 8, 0), 8, 1)
    assert np.array_equal(shown[1][mask], pixels[0][mask])
    assert np.allclose(shown[1][~mask], 0.5) and (~mask).any() and mask.any()


def test_dyt_picture_errors():
    with pytest.raises(TokenTuneError, match="no token dispatchers"):
        viz.dyt_activation(_tome(), [_image()])
    with pytest.raises(TokenTuneError, match="dispatcher 7 is outside 0..3"):
        viz.plot_activated_tokens(_dyt(), [_image()], "x.png", layers=[7])


def test_dyt_viz_commands(tmp_path, capsys):
    from PIL import Image

    from tokentune.tools.export import export_deployed

    export_deployed(_dyt(), tmp_path / "export")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray((_image(i) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    assert _cli(["dyt-tokens", str(tmp_path / "export"), str(tmp_path / "imgs"), "--max-images", "2",
                 "--layers", "0,2", "--out", str(tmp_path / "t.png"), "--dpi", "40"]) == 0
    assert png_size(tmp_path / "t.png") == (300, 232)          # 3 panels of 2.5 in, 2 rows of 2.9 in
    assert _cli(["dyt-rates", str(tmp_path / "export"), str(tmp_path / "imgs"), "--out", str(tmp_path / "r.png")]) == 0
    assert png_size(tmp_path / "r.png") == (700, 350)
    assert "overall activation" in capsys.readouterr().out
    assert _cli(["dyt-rates", str(tmp_path / "export"), str(tmp_path / "export"), "--out", str(tmp_path / "r.png")]) == 2
    _error(capsys, "no images")


def test_prepare_image_reads_files_as_training_does(tmp_path):
    """16-bit levels survive (plain convert("RGB") leaves 2 of them); alpha is composited on white."""
    from PIL import Image

    grey = np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (4, 1))              # 256 levels
    Image.frombytes("I;16", grey.shape[::-1], grey.astype("<u2").tobytes()).save(tmp_path / "g16.png")
    _, pixels = viz.prepare_image(str(tmp_path / "g16.png"), (4, 256), (0.5,) * 3, (0.5,) * 3)
    assert len(np.unique(np.round(pixels * 255))) >= 200
    clear = np.zeros((4, 4, 4), dtype=np.uint8)                                       # fully transparent
    _, pixels = viz.prepare_image(Image.fromarray(clear), (4, 4), (0.5,) * 3, (0.5,) * 3)
    assert np.allclose(pixels, 1.0)
