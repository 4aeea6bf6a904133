"""The command line: generated options and help, value syntax, train/eval/summarize, errors."""
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import pytest
import torch
from safetensors.torch import load_file
from test_data import break_vtab, make_folder, make_vtab

from tokentune import TrainConfig, cli
from tokentune.cli import train as cli_train
from tokentune.core import method as R
from tokentune.methods.tome import Schedule

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--pretrained", "none", "--timm", "patch_size=8",
             "--timm", "embed_dim=48", "--timm", "depth=4", "--timm", "num_heads=3", "--image-size", "32",
             "--num-workers", "0", "--batch-size", "4", "--warmup-epochs", "0", "--no-progress"]


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def help_text(argv):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    return sub[argv].format_help() if argv else parser.format_help()


# ----------------------------------------------------------------------------- help and options
def test_every_option_is_documented_in_help():
    from tokentune.core.method import available_methods, get_method

    text = " ".join(help_text("train").split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    docs = cli.field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}      # every field has a docstring entry
    for name in available_methods():
        cfg = get_method(name).config
        if cfg is None:
            continue
        method_docs = cli.field_docs(cfg)
        for f in dataclasses.fields(cfg):
            flag = f"--{name}-{f.name.replace('_', '-')}"
            assert flag in text, flag
            assert method_docs.get(f.name), f"{cfg.__name__}.{f.name} is undocumented"
    assert "rank of the update B A" in text and "tokens merged per block" in text
    for option in ("--model", "--method", "--pretrained", "--num-classes", "--data", "--dataset", "--image-folder",
                   "--out", "--resume", "--recipe", "--device"):
        assert option in text
    top = help_text(None)
    for command in ("train", "eval", "summarize", "demo"):
        assert command in top
        assert "usage: tokentune " + command in help_text(command)
    assert "--pretrained" in help_text("eval") and "--metric" in help_text("summarize")
    assert "--pretrain-epochs" in help_text("demo")


def test_new_method_configs_appear_without_touching_the_cli(monkeypatch):
    @dataclass
    class FancyConfig:
        """Fancy options.

        Attributes:
            keep_rate: share of tokens kept
                in every block.
            layers: blocks that prune.
        """

        keep_rate: float = 0.7
        layers: Sequence[int] = (3, 6, 9)

    monkeypatch.setitem(R._REGISTRY, "fancy", R.Method("fancy", FancyConfig, lambda m, c, ctx: None, order=25,
                                                       summary="a fancy token pruner"))
    text = " ".join(help_text("train").split())
    assert "--fancy-keep-rate FLOAT share of tokens kept in every block. [FLOAT; default: 0.7]" in text
    assert "--fancy-layers VALUE blocks that prune. [INT,INT,...; default: 3,6,9]" in text
    args = cli.build_parser().parse_args(["train", "--method", "lora+fancy", "--fancy-layers", "2,4"])
    assert cli_train._resolve_train_options(args)["model_options"] == {"fancy_layers": [2, 4]}


@pytest.mark.parametrize("hint, text, value", [
    (Schedule, "16", 16),
    (Schedule, "16,16,10", [16, 16, 10]),
    (Schedule, "16x11,10", [16] * 11 + [10]),
    (Schedule, "16,-1.0", (16, -1.0)),
    (Schedule, "low", "low"),
    (Optional[float], "none", None),
    (Optional[float], "2", 2.0),
    (Sequence[str], "qkv,fc1", ["qkv", "fc1"]),
    (Tuple[float, float], "0.9,0.99", (0.9, 0.99)),
    (bool, "false", False),
    (dict, '{"blocks\\\\.0\\\\.": {"lr": 0}}', {"blocks\\.0\\.": {"lr": 0}}),
])
def test_value_syntax(hint, text, value):
    assert cli.convert(hint, text) == value


def test_option_parsing_and_recipes(monkeypatch):
    monkeypatch.setitem(R._RECIPES, "demo-recipe", R.Recipe(
        "demo-recipe", "lora+tome", model_options={"tome_r": [2, 2], "drop_path_rate": 0.1, "lora_rank": 4},
        train_options={"lr": 5e-3, "epochs": 7, "schedule_step": "epoch"}, summary="test recipe"))
    assert "demo-recipe (test recipe)" in " ".join(help_text("train").split())
    args = cli.build_parser().parse_args(["train", "--recipe", "demo-recipe", "--lr", "1e-3", "--tome-r", "3,1",
                                          "--betas", "0.9,0.99", "--clip-grad", "none", "--grad-checkpointing",
                                          "--no-drop-last"])
    opts = cli_train._resolve_train_options(args)
    assert opts["method"] == "lora+tome"
    assert opts["train"] == {"lr": 1e-3, "epochs": 7, "schedule_step": "epoch", "betas": (0.9, 0.99),
                             "clip_grad": None, "grad_checkpointing": True, "drop_last": False}
    assert opts["model_options"] == {"tome_r": [3, 1], "drop_path_rate": 0.1, "lora_rank": 4}


# ----------------------------------------------------------------------------- errors
def test_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    code, out, err = run(["train", "--data", str(tmp_path), "--dataset", "cifr"], capsys)
    assert code == 2 and err.startswith("error: unknown VTAB-1k dataset 'cifr'; did you mean cifar")
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(["train", "--dataset", "cifar"], capsys)
    assert code == 2 and "needs --data ROOT" in err
    make_vtab(tmp_path, "eurosat")
    code, _, err = run(["train", "--data", str(tmp_path), "--dataset", "eurosat", "--method", "lora", "--tome-r", "4"]
                       + TINY_ARGS, capsys)
    assert code == 2 and "option 'tome_r' belongs to method 'tome'" in err and err.count("\n") == 1
    code, _, err = run(["train", "--data", str(tmp_path), "--dataset", "eurosat", "--epochs", "2"] + TINY_ARGS
                       + ["--warmup-epochs", "5"], capsys)
    assert code == 2 and err == "error: invalid warmup_epochs=5.0: must be >= 0 and smaller than epochs (2); " \
                                "lower --warmup-epochs\n"
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--tome-r", "16,abc"])
    assert info.value.code == 2
    assert "--tome-r: '16,abc' fits none of" in capsys.readouterr().err
    code, _, err = run(["eval", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "has no config.json" in err


def test_unreadable_weights_and_offline_hub_are_one_line(tmp_path, capsys, monkeypatch):
    import time

    import huggingface_hub

    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=2)
    (tmp_path / "ViT-B_16.pth").write_text("not weights\n")
    code, _, err = run(["train", "--image-folder", str(folder), "--out", str(tmp_path / "run")] + TINY_ARGS
                       + ["--pretrained", str(tmp_path / "ViT-B_16.pth")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot read {tmp_path / 'ViT-B_16.pth'}: it is a text file")
    # the default --pretrained is the hub: offline and not cached, it fails at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    without_pretrained = [a for a in TINY_ARGS if a not in ("--pretrained", "none")]
    tic = time.perf_counter()
    code, _, err = run(["train", "--image-folder", str(folder), "--out", str(tmp_path / "run")] + without_pretrained,
                       capsys)
    assert time.perf_counter() - tic < 10
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot download the pretrained weights")
    assert "ViT-B_16.npz" in err and not (tmp_path / "run").exists()


def test_damaged_run_files_say_what_to_do(tmp_path, capsys):
    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=2)
    out = tmp_path / "run"
    evaluate = ["eval", str(out), "--num-workers", "0", "--no-progress"]
    code, _, err = run(["train", "--image-folder", str(folder), "--epochs", "2", "--max-steps", "1", "--out", str(out)]
                       + TINY_ARGS, capsys)
    assert code == 0, err
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run(evaluate, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot read {weights}: it is not a complete safetensors file")
    assert f"`tokentune train --out {out} --resume`" in err
    # the advice works: resuming rewrites the weights, and the run evaluates again
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    code, stdout, err = run(evaluate, capsys)
    assert code == 0 and stdout.startswith("shapes test: top-1"), err
    # a finished run keeps a copy of its weights in resume.pt too: --resume restores them
    want = {k: v.clone() for k, v in load_file(str(weights)).items()}
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run(evaluate, capsys)
    assert code == 2 and err.count("\n") == 1 and f"`tokentune train --out {out} --resume`" in err
    code, stdout, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0 and "rewritten from resume.pt" in stdout, err
    got = load_file(str(weights))
    assert all(torch.equal(want[k], got[k]) for k in want)
    (out / "config.json").write_text('{"model": ')
    code, _, err = run(evaluate, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {out / 'config.json'} is damaged (not valid JSON: Expecting value at line 1)")


# ----------------------------------------------------------------------------- end to end
def test_train_eval_summarize_resume_on_an_image_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "shapes", classes=("a", "b", "c"), per_class=4)
    out = tmp_path / "run"
    common = ["train", "--image-folder", str(folder), "--method", "lora+tome", "--tome-r", "2,1", "--epochs", "2",
              "--eval-every", "1", "--lr", "1e-3", "--out", str(out)] + TINY_ARGS
    code, stdout, err = run(common + ["--max-steps", "2"], capsys)
    assert code == 0, err
    assert "12 training images (train), 12 test images (test)" in stdout     # the folders read, not the config's split
    assert "head: new, 3 classes (timm's initialisation; random backbone)" in stdout
    assert "stopped at epoch 1" in stdout or "stopped after epoch 1" in stdout
    assert not (out / "results.json").exists()
    # resume with nothing but --out: the recorded options are reused
    code, stdout, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming" in stdout and "top-1 after the last epoch" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "lora+tome" and results["dataset"] == "shapes" and results["epochs_done"] == 2
    # the uninterrupted run ends with the same weights
    code, _, err = run(common[:-len(TINY_ARGS)] + TINY_ARGS + ["--out", str(tmp_path / "full")], capsys)
    assert code == 0, err
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    # eval rebuilds the model and reproduces the last evaluation, also deployed
    code, stdout, err = run(["eval", str(out), "--num-workers", "0", "--no-progress", "--json", str(tmp_path / "e.json")],
                            capsys)
    assert code == 0, err
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["top1"] == pytest.approx(results["top1"]) and evaluated["total"] == 12
    code, stdout, _ = run(["eval", str(out), "--deploy", "--num-workers", "0", "--no-progress"], capsys)
    assert code == 0 and "[deployed]" in stdout and f"{results['top1']:.2f}%" in stdout
    # summarize over the folder holding both runs
    code, stdout, err = run(["summarize", str(tmp_path), "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    assert "| method | shapes |" in stdout and "| lora+tome | " in stdout and "None" not in stdout
    assert "Mean (3 groups)" not in stdout                                   # an image folder is no VTAB-1k task
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["rows"] == [] and summary["other_rows"][0]["runs_per_dataset"] == {"shapes": 2}
    # a second fresh run into the same directory is refused
    code, _, err = run(common, capsys)
    assert code == 2 and "already holds a run" in err


def test_bad_images_stop_train_and_eval_in_one_line_unless_skipped(tmp_path, capsys):
    base = make_vtab(tmp_path / "vtab", "eurosat")
    break_vtab(base)                      # train800val200.txt:3 missing, test.txt:2 corrupt
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "vtab"), "--dataset", "eurosat", "--epochs", "1", "--out", str(out)]
    code, _, err = run(argv + TINY_ARGS, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: 2 image(s) cannot be used (1 of 4 in eurosat train800val200, 1 of 4 in eurosat test)")
    assert "--skip-bad-images" in err and not out.exists()              # refused before any training
    code, stdout, err = run(argv + TINY_ARGS + ["--batch-size", "2", "--skip-bad-images"], capsys)
    assert code == 0, err
    assert "skipped 2 unusable image(s) (1 of 4 in eurosat train800val200, 1 of 4 in eurosat test): " in stdout
    assert "(all of them are listed in the run's config.json and results.json)" in stdout
    assert "3 training images (train800val200), 3 test images (test)" in stdout
    results = json.loads((out / "results.json").read_text())
    assert [s["origin"] for s in results["data"]["train"]["skipped"]] == [f"{base}/train800val200.txt:3"]
    assert results["data"]["test"]["num_images"] == 3
    assert json.loads((out / "config.json").read_text())["run"]["cli"]["skip_bad_images"] is True
    resumed = cli_train._resolve_train_options(cli.build_parser().parse_args(["train", "--out", str(out), "--resume"]))
    assert resumed["skip_bad_images"] is True                           # --resume keeps the recorded choice
    # eval checks the split it reads in the same way
    evaluate = ["eval", str(out), "--num-workers", "0", "--no-progress"]
    code, _, err = run(evaluate, capsys)
    assert code == 2 and err.startswith("error: 1 image(s) cannot be used (1 of 4 in eurosat test), e.g. ")
    code, stdout, err = run(evaluate + ["--skip-bad-images", "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    assert stdout.startswith("skipped 1 unusable image(s)") and f"listed in {tmp_path / 'e.json'})" in stdout
    assert "/3)" in stdout
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["total"] == 3 and record["skipped"][0]["origin"] == f"{base}/test.txt:2"


def test_python_dash_m_tokentune():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "tokentune", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and "summarize" in proc.stdout


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    """The real launcher: torchrun --nproc_per_node 2 -m tokentune train (gloo on CPU)."""
    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tokentune", "train", "--image-folder", str(folder), "--method", "lora", "--epochs", "2",
           "--out", str(tmp_path / "run")] + TINY_ARGS
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("top-1 after the last epoch") == 1          # only rank 0 talks
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["train"]["num_images"] == 8 and results["finished"]


def test_eval_of_a_run_written_by_the_python_api(tmp_path, capsys):
    import torch
    from conftest import tiny

    import tokentune
    from tokentune.engine.data import load_datasets, set_transforms
    from tokentune.engine.training import train

    folder = make_folder(tmp_path / "shapes", classes=("a", "b"), per_class=3, splits=("train", "val"))
    train_ds, test_ds = load_datasets(image_folder=str(folder))
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=2, **tiny())
    set_transforms([train_ds, test_ds], model)
    result = train(model, train_ds, test_ds, TrainConfig(epochs=2, batch_size=2, warmup_epochs=0, num_workers=0),
                   out_dir=str(tmp_path / "run"), log=None)
    code, stdout, err = run(["eval", str(tmp_path / "run"), "--num-workers", "0", "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.startswith("shapes val: top-1 ") and f"{result.top1:.2f}%" in stdout      # the folder it read
