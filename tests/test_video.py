"""Video recognition: clips as batches of frames, DyT's attentive pooling against a literal
reimplementation, mean pooling against the image model, multi-view testing, sampling, decoding,
bad clips, DyT statistics on clips and the real train / resume / eval / export path."""
import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import tiny
from video_data import moving_square, write_frames, write_lists, write_video

import tokentune
from tokentune import cli
from tokentune.core.dispatch import activation_stats
from tokentune.errors import TokenTuneError
from tokentune.methods.dyt import calibrate_activation
from tokentune.tasks.video import load_data, read_frames, set_transforms
from tokentune.tasks.video.data import eval_indices, random_indices

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--pretrained", "none", "--timm", "img_size=32", "--timm", "patch_size=8",
             "--timm", "embed_dim=48", "--timm", "depth=4", "--timm", "num_heads=3", "--batch-size", "2",
             "--num-workers", "0", "--no-progress", "--video-frames", "4", "--video-sampling-rate", "3",
             "--video-test-clips", "2"]


def video_model(method="lora", pool="attentive", frames=4, **options):
    torch.manual_seed(0)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=3, task="video", video_pool=pool,
                                  video_frames=frames, **options, **tiny())


def test_mean_pooling_of_one_frame_equals_the_image_model():
    model = video_model("lora+tome", pool="mean", frames=1, tome_r=2).eval()
    torch.manual_seed(0)
    image_model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=3, tome_r=2,
                                         **tiny()).eval()
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(frames[:, None]), image_model(frames), atol=1e-6)
        clip = torch.randn(2, 4, 3, 32, 32)     # several frames: the mean of the frames' pooled features
        pooled = torch.stack([image_model.forward_head(image_model.forward_features(clip[:, t]), pre_logits=True)
                              for t in range(4)]).mean(0)
        assert torch.allclose(model(clip), image_model.head(pooled), atol=1e-5)


def test_attentive_pooling_equals_the_reference_math():
    model = video_model("dyt").eval()
    head = model.task_head.attentive
    with torch.no_grad():
        for p in head.parameters():                # away from the zero init, so every term counts
            p.normal_(0, 0.1)
    clip = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(clip.flatten(0, 1), dyt_complete=True)        # [(b t), n, c], final norm
        x = tokens.reshape(2, -1, 48)                                                 # b (t n) c
        # the reference's AttentiveBlock + CrossAttention, written out (3 heads of 16)
        q = torch.nn.functional.layer_norm(head.query.expand(2, -1, -1), (48,), head.norm_q.weight, head.norm_q.bias, 1e-6)
        k = torch.nn.functional.layer_norm(x, (48,), head.norm_k.weight, head.norm_k.bias, 1e-6)
        v = torch.nn.functional.layer_norm(x, (48,), head.norm_v.weight, head.norm_v.bias, 1e-6)
        q = (q @ head.q.weight.T + head.q_bias).reshape(2, 1, 3, 16).permute(0, 2, 1, 3)
        k = (k @ head.k.weight.T).reshape(2, -1, 3, 16).permute(0, 2, 1, 3)
        v = (v @ head.v.weight.T + head.v_bias).reshape(2, -1, 3, 16).permute(0, 2, 1, 3)
        attn = (q * 16 ** -0.5 @ k.transpose(-2, -1)).softmax(-1)
        pooled = (attn @ v).transpose(1, 2).reshape(2, 1, 48) @ head.proj.weight.T + head.proj.bias
        assert torch.allclose(model(clip, dyt_complete=True), model.head(pooled[:, 0]), atol=1e-5)


def test_views_are_averaged_and_deployment_keeps_the_head():
    model = video_model("dyt")
    calibrate_activation(model, torch.randn(2, 4, 3, 32, 32), 0.5)
    model.eval()
    views = torch.randn(2, 3, 4, 3, 32, 32)
    deployed = tokentune.deploy(model)
    with torch.no_grad():
        want = torch.stack([model(views[:, v]) for v in range(3)]).mean(0)
        assert torch.allclose(model(views), want, atol=1e-5)
        assert torch.allclose(deployed(views), want, atol=1e-5)      # real skipping == mask path


def test_dyt_complete_rows_and_statistics_reach_every_frame():
    model = video_model("dyt").train()
    clips = torch.randn(2, 4, 3, 32, 32)
    _, state = model(clips, return_state=True, dyt_complete=torch.tensor([False, True]))
    record = [r["dispatch"] for r in state.records if "dispatch" in r][0]
    assert record.complete.tolist() == [False] * 4 + [True] * 4
    calibrate_activation(model, clips, 0.5)
    stats = activation_stats(model, [(clips, torch.tensor([0, 1]))], keep_masks=True)
    assert stats.num_images == 8 and stats.masks.shape == (8, 4, 16) and 0 < stats.overall < 1


def test_sampling_follows_the_reference():
    assert eval_indices(100, 8, 4, 3) == [[s + 4 * k for k in range(8)] for s in (0, 36, 71)]
    assert eval_indices(100, 8, 4, 1) == [[35 + 4 * k for k in range(8)]]
    assert eval_indices(10, 4, 4, 1) == [[0, 4, 8, 9]]                  # short: the last frame repeats
    assert eval_indices(17, 4, 0, 1) == [[2, 6, 10, 14]]                 # segments: their middle frames
    rng = random.Random(0)
    for _ in range(20):
        idx = random_indices(50, 8, 4, rng)
        assert idx == list(range(idx[0], idx[0] + 32, 4)) and 0 <= idx[0] <= 50 - 29
        seg = random_indices(17, 4, 0, rng)
        assert all(round(4 * i) <= f <= round(4 * (i + 1)) for i, f in enumerate(seg))
    assert random_indices(10, 4, 4, rng) == [0, 4, 8, 9]


def test_video_files_and_frame_folders_decode_the_sampled_frames(tmp_path):
    pytest.importorskip("av")
    frames = np.stack([np.full((24, 32, 3), 10 * t, np.uint8) for t in range(20)])
    write_video(str(tmp_path / "a.avi"), frames)
    write_frames(str(tmp_path / "b"), frames)
    for path in (str(tmp_path / "a.avi"), str(tmp_path / "b")):
        got = read_frames(path, [3, 9, 3, 15])
        assert got.shape == (4, 24, 32, 3)
        assert np.abs(got.reshape(4, -1).mean(1) - np.array([30, 90, 30, 150])).max() < 4


def test_list_files_transforms_and_bad_clips(tmp_path):
    pytest.importorskip("av")
    root = write_lists(str(tmp_path / "vid"), per_split=(4, 2), frames=20)
    options = {"video_frames": 4, "video_sampling_rate": 3, "video_test_clips": 2, "video_test_crops": 3}
    train, test = load_data(data_root=root, options=options)
    assert (len(train), train.num_classes, train.split, test.split) == (4, 2, "train", "val")
    model = video_model(frames=4, video_sampling_rate=3, video_test_clips=2, video_test_crops=3)
    set_transforms(train, test, model, tokentune.TrainConfig())
    clip, label = train[0]
    assert clip.shape == (4, 3, 32, 32) and label == 0
    views, _ = test[1]
    assert views.shape == (6, 4, 3, 32, 32)            # 2 clips x 3 crops
    with torch.no_grad():
        assert model.eval()(views[None]).shape == (1, 3)
    # a clip too short for the sampling, and a file that is not a video
    write_video(os.path.join(root, "clips", "train_0.avi"), moving_square(0, frames=6))
    with open(os.path.join(root, "clips", "train_1.avi"), "wb") as fh:
        fh.write(os.urandom(300))
    with pytest.raises(TokenTuneError, match=r"2 clip\(s\) cannot be used, e.g. .*train_0.avi \(listed at .*train.txt:1\) "
                                             r"has 6 frame\(s\) but a clip of 4 frames at sampling rate 3 spans 10"):
        load_data(data_root=root, options=options)
    train, _ = load_data(data_root=root, options=options, skip_bad_images=True)
    assert len(train) == 2 and len(train.skipped) == 2 and "train_1.avi" in train.skipped[1]["file"]
    train, _ = load_data(data_root=root, options=dict(options, video_short_clips="repeat"), skip_bad_images=True)
    assert len(train) == 3                              # the short clip repeats its last frame; the broken file stays out
    with pytest.raises(TokenTuneError, match="video_test_crops must be 1 or 3"):
        load_data(data_root=root, options=dict(options, video_test_crops=2))


def test_cli_trains_resumes_evaluates_and_exports_frame_folders(tmp_path, capsys):
    data = write_lists(str(tmp_path / "vid"), per_split=(4, 2), frames=12, as_video=False)
    base = ["train", "--task", "video", "--data", data, "--method", "dyt", "--epochs", "2"] + TINY_ARGS
    base += ["--num-workers", "2"]           # exact resume with loader workers
    assert cli.main(base + ["--out", str(tmp_path / "full")]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--max-steps", "1"]) == 0
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    load = tokentune.engine.checkpoint.load_safetensors
    full = load(str(tmp_path / "full" / "model.safetensors"), "")
    cut = load(str(tmp_path / "cut" / "model.safetensors"), "")
    assert sorted(full) == sorted(cut) and all(torch.equal(full[k], cut[k]) for k in full)
    results = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert results["task"] == "video" and results["metric"] == "top1" and results["top1"] is not None
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "cut"), "--deploy", "--num-workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"vid val: top-1 {results['top1']:.2f}%")
    assert cli.main(["export", str(tmp_path / "cut"), str(tmp_path / "exp"), "--verify"]) == 0
    loaded = tokentune.load_deployed(str(tmp_path / "exp"))
    model = tokentune.load_trained(str(tmp_path / "cut")).eval()
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(clips), model(clips), atol=1e-5)


def test_a_video_model_refuses_images_in_one_line():
    with pytest.raises(TokenTuneError, match=r"clips \[B, T, 3, H, W\]"):
        video_model()(torch.randn(2, 3, 32, 32))


def test_token_pictures_of_a_clips_frames(tmp_path):
    pytest.importorskip("matplotlib")
    from tokentune.tools.viz.dispatch import plot_activated_tokens

    model = video_model("dyt")
    calibrate_activation(model, torch.randn(1, 4, 3, 32, 32), 0.5)
    frames = [torch.rand(3, 32, 32) for _ in range(4)]           # the frames of one clip, as pictures
    plot_activated_tokens(model, frames, str(tmp_path / "tokens.png"))
    assert (tmp_path / "tokens.png").stat().st_size > 0
