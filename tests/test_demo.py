"""The offline demo, reduced (patch 8: 17 tokens, fewer epochs) but through the real pipeline."""
import os
import re

import pytest
import torch

from tokentune.errors import TokenTuneError
from tokentune.tools.demo import ROWS, DemoConfig, run_demo


def test_demo_table(tmp_path, monkeypatch):
    """The pipeline and the table; the other rows (PYRA, DyT) go through the same code and have
    their own method tests, so three rows keep this test short."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    lines = []
    try:
        table = run_demo(DemoConfig(pretrain_epochs=4, epochs=6, patch_size=8, tome_r=(4, 3, 2, 2), bench_batch=64,
                                    bench_rounds=2, threads=1, workdir=str(tmp_path / "work")), rows=ROWS[:3],
                         out=lines.append)
    finally:
        torch.set_num_threads(threads)
    rows = {r["label"]: r for r in table}
    assert list(rows)[:3] == ["linear probe", "LoRA r=8", "LoRA r=8 + ToMe"]
    linear, lora, tome = rows["linear probe"], rows["LoRA r=8"], rows["LoRA r=8 + ToMe"]
    assert lora["top1"] > 55, lora                       # 5 classes: chance is 20%
    assert linear["trainable"] == 64 * 5 + 5              # the head only
    assert tome["trainable"] == lora["trainable"] > linear["trainable"]
    assert linear["tokens"] == "17" and tome["tokens"] == "17 -> 6"
    assert tome["macs"] < 0.8 * lora["macs"] and abs(lora["macs"] - linear["macs"]) < 1e-6 * linear["macs"]
    assert all(r["img_per_s"] > 0 for r in table)
    text = "\n".join(lines)
    assert "| method" in text and "| LoRA r=8 + ToMe" in text and "img/s" in text and "1 CPU thread" in text
    assert re.search(r"from scratch on \d+ digits 0-4", text) and "measurement noise" in text
    # the run directories are real tokentune runs, and the backbone went to the cache
    assert os.path.isfile(tmp_path / "work" / "runs" / "lora-r-8" / "results.json")
    assert len(os.listdir(tmp_path / "cache" / "tokentune" / "demo")) == 1


def test_every_demo_row_names_registered_methods():
    """The demo's rows are built with the methods that ship; a typo in a row fails here, not in the demo."""
    from tokentune.core.method import parse_method

    for row in ROWS:
        parse_method(row.method)
    assert [r.label for r in ROWS][:3] == ["linear probe", "LoRA r=8", "LoRA r=8 + ToMe"]


def test_every_demo_row_builds_trains_and_deploys_at_demo_size(tmp_path):
    """Each row's model, built as the demo builds it (the pre-trained backbone's file and architecture,
    the row's options), takes a training step and deploys: a row that cannot run fails here."""
    from safetensors.torch import save_file
    from torch.utils.data import TensorDataset

    from tokentune import create_model, deploy
    from tokentune.tools.demo import BACKBONE, _rate_option, searched_options

    cfg = DemoConfig(patch_size=8)
    arch = dict(img_size=32, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=max(1, cfg.embed_dim // 16), global_pool="avg")
    torch.manual_seed(0)
    backbone = create_model(BACKBONE, method="full", num_classes=5, pretrained=False, **arch)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    models = {}
    for row in ROWS:
        options = {**arch, **row.options, **({_rate_option(row.method): 2} if row.merge else {})}
        if row.search:       # the row's search runs from the earlier row's model, as in the demo
            found, record = searched_options(row, models[row.search_from], TensorDataset(x, y))
            assert found and record["num_tokens"] == 17 and len(record["history"]) == row.search["epochs"], row.label
            options.update(found)
        torch.manual_seed(0)
        model = create_model(BACKBONE, method=row.method, num_classes=5, pretrained=str(tmp_path / "backbone.safetensors"),
                             head_init_std=0.01, **options)
        models[row.label] = model
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            assert deploy(model, **row.deploy)(x).shape == (4, 5), row.label
    assert any(r.search for r in ROWS) and any("dynamicvit" in r.method for r in ROWS)
    assert DemoConfig(rows="all").rows == "all"
    with pytest.raises(TokenTuneError, match="demo rows must be one of default, all"):
        DemoConfig(rows="everything")


@pytest.mark.slow
def test_demo_row_reusing_a_trained_model(tmp_path, monkeypatch):
    """A row with ``reuse`` deploys an earlier row's trained model another way (DyT's static shapes)."""
    from tokentune.tools.demo import DemoRow

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    rows = [DemoRow("DyT", "dyt"),
            DemoRow("DyT capacity 0.5", "dyt", deploy={"dyt_execution": "capacity", "dyt_capacity": 0.5}, reuse="DyT")]
    try:
        table = run_demo(DemoConfig(pretrain_epochs=2, epochs=2, patch_size=8, bench_batch=16, bench_rounds=1,
                                    threads=1, cache=False), rows=rows, out=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    dyt_row, capacity = table
    assert capacity["train_s"] == 0.0 and capacity["trainable"] == dyt_row["trainable"]
    # k = ceil(0.5 * 0.5 * 16) = 4 patch tokens per image in each MLP: fewer multiply-adds than the threshold rule
    assert capacity["macs"] < dyt_row["macs"]
