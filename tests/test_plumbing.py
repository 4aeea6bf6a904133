"""Experiment plumbing: config files and --print-config, loggers (file always, TensorBoard when
installed), optimizers (SGD, timm's) and layer-wise lr decay, timm's schedulers, EMA of the trained
weights (with exact resume), timm augmentation and mixup."""
import json
import os

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file

import tokentune
from tokentune import TrainConfig
from tokentune.cli import main
from tokentune.engine.optim import build_optimizer, layer_id, learning_rate, param_groups
from tokentune.engine.training import train
from tokentune.errors import TokenTuneError


def make_data(n=16, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % classes
    x[:, 0] += y[:, None, None].float()
    return torch.utils.data.TensorDataset(x, y)


def make_model(method="lora", seed=0):
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=3, seed=seed, **tiny())


def cfg(**kw):
    base = dict(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=1, num_workers=0, eval_every=1)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- config files
def test_config_file_values_count_as_options_and_flags_override_them(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("data: vtab-1k\ndataset: cifar\nmethod: lora+tome\ntome_r: [3, 2, 2, 1]\nlr: 2.0e-3\n"
                    "amp: 'off'\ntimm: {drop_path_rate: 0.1}\nskip_bad_images: true\nbetas: [0.8, 0.9]\n")
    assert main(["train", "--config", str(path), "--lr", "0.01", "--print-config"]) == 0
    printed = capsys.readouterr().out
    import yaml
    values = yaml.safe_load(printed)
    assert values["lr"] == 0.01 and values["tome_r"] == [3, 2, 2, 1] and values["method"] == "lora+tome"
    assert values["timm"] == {"drop_path_rate": 0.1} and values["skip_bad_images"] is True
    assert values["betas"] == [0.8, 0.9] and values["epochs"] == 100          # defaults of the rest
    # what --print-config prints reads back as a config file (JSON too) and prints the same
    (tmp_path / "again.json").write_text(json.dumps(values))
    assert main(["train", "--config-file", str(tmp_path / "again.json"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == values


@pytest.mark.parametrize("text,match", [
    ("lrr: 0.1\n", "no option --lrr; did you mean lr"),
    ("epochs: many\n", "epochs"),
    ("- lr\n", "holds a list"),
    ("lr: [1\n", "not valid YAML at line"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    import re
    assert re.search(match, err), err


def test_every_command_takes_a_config_file(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("batch_size: 7\n")
    assert main(["eval", "some-run", "--config", str(tmp_path / "e.yaml"), "--print-config"]) == 0
    assert "batch_size: 7" in capsys.readouterr().out
    (tmp_path / "b.yaml").write_text("batch_size: 3\nthreads: 1\n")   # bench: --config is a configuration spec
    assert main(["bench", "--config-file", str(tmp_path / "b.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 3" in out or "batch_sizes" in out


# ----------------------------------------------------------------------------- optimizers, schedules
def test_sgd_timm_optimizers_and_layer_decay():
    model = make_model("full")
    opt = build_optimizer(model, cfg(optimizer="sgd", momentum=0.8))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    lamb = build_optimizer(model, cfg(optimizer="lamb"))
    assert type(lamb).__name__.lower() == "lamb"
    groups = param_groups(model, cfg(layer_decay=0.5))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    depth = 4
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** depth)
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1)) == scale["cls_token"]
    assert layer_id("blocks.11.norm1.weight", 12) == 12
    with pytest.raises(TokenTuneError, match="optimizer"):
        train(make_model(), make_data(), None, cfg(optimizer="nonsense"))


def test_timm_schedulers_match_timm():
    from timm.scheduler import StepLRScheduler

    c = cfg(epochs=12, lr=1e-2, warmup_epochs=2, warmup_lr=1e-5, lr_schedule="timm:step", decay_epochs=4,
            decay_rate=0.5, schedule_step="epoch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.lr)
    sched = StepLRScheduler(opt, decay_t=4, decay_rate=0.5, warmup_lr_init=1e-5, warmup_t=2, warmup_prefix=False)
    for epoch in range(12):
        assert learning_rate(c, epoch, 3, 10) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        sched.step(epoch + 1)                  # timm's train script: epoch e trains at the value for e
    it = cfg(epochs=4, lr=1e-2, warmup_epochs=1, lr_schedule="timm:cosine")
    values = [learning_rate(it, e, s, 5) for e in range(4) for s in range(5)]
    assert values[0] < values[4] and values[5] > values[-1] and len(set(values)) == len(values)


# ----------------------------------------------------------------------------- loggers
def test_file_logs_and_resume_rewrites_them_as_uninterrupted(tmp_path):
    data = make_data()
    train(make_model(), data, None, cfg(epochs=3, log_every=1), out_dir=str(tmp_path / "a"), log=None)
    train(make_model(), data, None, cfg(epochs=3, log_every=1), out_dir=str(tmp_path / "b"), log=None, max_steps=3)
    # the killed run logged more after its checkpoint: a resume drops it
    with open(tmp_path / "b" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "step", "global_step": 4, "epoch": 2, "loss": 99.0}) + "\n" + '{"kind": "st')
    train(make_model(), data, None, cfg(epochs=3, log_every=1), out_dir=str(tmp_path / "b"), log=None, resume=True)
    a = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert [(r["kind"], r["global_step"]) for r in a] == [(r["kind"], r["global_step"]) for r in b]
    assert [r.get("loss", r.get("train_loss")) for r in a] == [r.get("loss", r.get("train_loss")) for r in b]
    csv = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,train_loss,lr,time_s") and len(csv) == 4
    import csv as csvlib
    rows = [[{k: v for k, v in r.items() if k != "time_s"} for r in csvlib.DictReader(open(tmp_path / d / "metrics.csv"))]
            for d in ("a", "b")]
    assert rows[0] == rows[1]


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    data = make_data()
    train(make_model(), data, data, cfg(epochs=1, warmup_epochs=0, loggers=("tensorboard",), log_every=1), out_dir=str(tmp_path),
          log=None)
    events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/top1"} <= set(acc.Tags()["scalars"])


def test_optional_logger_needs_a_run_directory():
    with pytest.raises(TokenTuneError, match="pass out_dir"):
        train(make_model(), make_data(), None, cfg(loggers=("tensorboard",)), log=None)


# ----------------------------------------------------------------------------- EMA
def test_ema_weights_are_saved_and_resume_exactly(tmp_path):
    data = make_data()
    c = cfg(epochs=2, ema_decay=0.5)
    model = make_model()
    train(model, data, None, c, out_dir=str(tmp_path / "a"), log=None)
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    raw = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    name = next(n for n in saved if "lora_B" in n)
    assert not torch.equal(saved[name], raw[name])        # the average, not the last weights
    assert 0 < float(saved[name].abs().max()) < float(raw[name].abs().max())   # B starts at 0 and grows
    # stopped mid-run and resumed: the same average and the same raw weights as the uninterrupted run
    train(make_model(), data, None, c, out_dir=str(tmp_path / "b"), log=None, max_steps=3)
    other = make_model()
    train(other, data, None, c, out_dir=str(tmp_path / "b"), log=None, resume=True)
    again = load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in saved:
        assert torch.equal(saved[k], again[k]), k
    for n, p in other.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), raw[n]), n


def test_ema_update_formula():
    from tokentune.engine.ema import TrainedEMA

    model = make_model()
    ema = TrainedEMA(model, 0.9)
    name = "blocks.0.attn.qkv.lora_A"
    before = dict(model.named_parameters())[name].detach().clone()
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow[name], before + 0.1, atol=1e-6)
    with ema.applied(model):
        assert torch.allclose(dict(model.named_parameters())[name], before + 0.1, atol=1e-6)
    assert torch.allclose(dict(model.named_parameters())[name], before + 1.0)


# ----------------------------------------------------------------------------- augmentation
def test_timm_augmentation_and_mixup_train(tmp_path):
    from PIL import Image

    from tokentune.engine.data import image_folder_dataset, set_transforms

    for split in ("train", "test"):
        for c in range(2):
            d = tmp_path / "imgs" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 36), (40 * c + 10 * i, 90, 30)).save(d / f"{i}.png")
    train_ds = image_folder_dataset(str(tmp_path / "imgs"), "train")
    test_ds = image_folder_dataset(str(tmp_path / "imgs"), "test", classes=train_ds.classes)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=2, seed=0, **tiny())
    set_transforms([train_ds, test_ds], model)
    plain = train_ds.transform
    c = cfg(epochs=1, warmup_epochs=0, batch_size=4, augment="timm", mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    result = train(model, train_ds, test_ds, c, log=None)
    assert result.finished and result.top1 is not None
    assert train_ds.transform is not plain and test_ds.transform is plain
    assert "RandAugment" in repr(train_ds.transform) or "rand" in repr(train_ds.transform).lower()
    with pytest.raises(TokenTuneError, match="even batch size"):
        train(model, train_ds, None, cfg(epochs=1, warmup_epochs=0, batch_size=3, mixup=0.2), log=None)


@pytest.mark.parametrize("module,extra,call", [
    ("wandb", "wandb", lambda tmp: train(make_model(), make_data(), None, cfg(loggers=("wandb",)), out_dir=str(tmp),
                                         log=None)),
    ("tensorboard", "tensorboard", lambda tmp: train(make_model(), make_data(), None, cfg(loggers=("tensorboard",)),
                                                     out_dir=str(tmp), log=None)),
    ("huggingface_hub", "hub", lambda tmp: tokentune.push_to_hub(make_model(), "me/x")),
    ("webdataset", "webdataset", lambda tmp: tokentune.WebDatasetShards(["a.tar"])),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, module, extra, call):
    import sys
    monkeypatch.setitem(sys.modules, module, None)        # import fails as if it were not installed
    with pytest.raises(TokenTuneError, match=rf"pip install 'tokentune\[{extra}\]'") as info:
        call(tmp_path / "run")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_wandb_logger_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = make_data()
    train(make_model(), data, data, cfg(epochs=1, warmup_epochs=0, loggers=("wandb",), log_every=1),
          out_dir=str(tmp_path), log=None)
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))
