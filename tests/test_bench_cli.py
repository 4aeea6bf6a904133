"""`tokentune bench` and the paper-table script: structure of the outputs, counts, errors (never times)."""
import csv
import importlib.util
import json
import os
import sys

import pytest
import torch
from conftest import tiny

import tokentune
from tokentune import cli, timing
from tokentune.core import flops as flop_counter
from tokentune.methods import dyt
from tokentune.methods.tome import token_counts
from tokentune.tools import bench as bench_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "vit_tiny_patch16_224"
B = 2
TINY_ARGS = ["--model", MODEL, "--timm", "patch_size=8", "--timm", "embed_dim=48", "--timm", "depth=4",
             "--timm", "num_heads=3", "--image-size", "32", "--batch-size", str(B), "--rounds", "2", "--warmup", "1",
             "--latency-iters", "1", "--train-steps", "1", "--device", "cpu", "--quiet"]


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text):
    """Data rows of the first Markdown table in ``text`` (as lists of cells)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    return header, [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def reference(method, images, rate=None, **options):
    """The model the command builds for a config (same seed), its parameter counts and FLOPs."""
    torch.manual_seed(0)
    model = tokentune.create_model(MODEL, method=method, num_classes=100, **tiny(), **options)
    counts = tokentune.count_parameters(model)
    if rate is not None:
        dyt.calibrate_activation(model, images, rate)
    return counts, flop_counter.count_flops(tokentune.deploy(model), images) / images.shape[0]


def test_bench_command_outputs(tmp_path, capsys):
    configs = ["lora", "lora+tome:tome_r=3x2,2,1,label=ToMe 3-3-2-1", "pyra:r=2", "dyt:variant=layer,rate=0.5"]
    argv = ["bench", *TINY_ARGS, "--threads", str(torch.get_num_threads()), "--out", str(tmp_path), "--name", "t"]
    for c in configs:
        argv += ["--config", c]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    labels = ["lora", "ToMe 3-3-2-1", "pyra:r=2", "dyt:variant=layer,rate=0.5"]

    # screen table: the documented columns, one row per configuration, in order
    header, rows = table_rows(out)
    assert header == ["config", "method", "params", "trainable", "paper count (%)", "tokens", "active", "GMACs",
                      "FLOPs ratio", "img/s", "img/s min-max", "speed-up", "b1 latency ms", "infer MiB",
                      "train s/step", "train MiB"]
    assert [r[0] for r in rows] == labels
    assert [r[1] for r in rows] == ["lora", "lora+tome", "lora+tome+pyra", "dyt"]
    assert [r[5] for r in rows] == ["17", "17->8", "17->9", "17"]
    assert rows[0][header.index("speed-up")] == "1.00x" and rows[0][header.index("FLOPs ratio")] == "1.00x"
    assert "Environment: device=cpu" in out and out.rstrip().endswith("t.csv")

    # files: markdown (same table), JSON (environment, settings, raw rows), CSV (same rows)
    md = (tmp_path / "t.md").read_text()
    assert table_rows(md)[0] == header and [r[0] for r in table_rows(md)[1]] == labels
    data = json.loads((tmp_path / "t.json").read_text())
    env = data["environment"]
    assert {"device", "threads", "dtype", "torch", "timm", "tokentune", "python"} <= set(env)
    assert env["dtype"] == "fp32" and env["threads"] == torch.get_num_threads() and env["device"].startswith("cpu")
    s = data["settings"]
    assert (s["batch_size"], s["image_size"], s["rounds"], s["warmup"], s["baseline"]) == (B, 32, 2, 1, "lora")
    jrows = data["rows"]
    assert [r["label"] for r in jrows] == labels
    with open(tmp_path / "t.csv") as fh:
        crows = list(csv.DictReader(fh))
    assert list(crows[0]) == list(bench_cli.CSV_KEYS) and [r["label"] for r in crows] == labels

    # parameters and FLOPs are exactly what count_parameters / count_flops give for the same model
    images = timing.random_images(B, 32, seed=0)
    refs = [reference("lora", images), reference("lora+tome", images, tome_r=[3, 3, 2, 1]),
            reference("pyra", images, tome_r=2), reference("dyt", images, rate=0.5, dyt_variant="layer")]
    for row, crow, (counts, flops) in zip(jrows, crows, refs):
        assert row["params_total"] == counts["total"] and row["params_trainable"] == counts["trainable"]
        assert row["paper_trainable"] == counts["paper_trainable"]
        assert row["paper_pct"] == pytest.approx(counts["paper_pct"])
        assert row["flops"] == flops and row["gmacs"] == pytest.approx(flops / 2e9)
        assert row["flops_ratio"] == pytest.approx(jrows[0]["flops"] / flops)
        assert int(crow["params_total"]) == counts["total"] and float(crow["flops"]) == flops
        for key in ("img_per_s", "latency_ms", "train_step_s", "train_peak_mib", "infer_peak_mib"):
            assert row[key] > 0
        assert row["img_per_s_low"] <= row["img_per_s"] <= row["img_per_s_high"]
        assert row["deployed"] is True
    assert jrows[1]["tokens_out"] == token_counts([3, 3, 2, 1], 17)[-1]
    assert jrows[1]["flops"] < jrows[0]["flops"]
    assert jrows[3]["calibrated_rate"] == 0.5 and abs(jrows[3]["activation"] - 0.5) < 0.05
    assert jrows[0]["activation"] is None and jrows[0]["calibrated_rate"] is None
    assert rows[3][header.index("active")].endswith("%") and rows[0][header.index("active")] == ""


def test_runs_and_options(tmp_path, capsys):
    """--run rows (trained run directories), --no-train/--no-latency/--no-memory, per-row model and timm keywords."""
    torch.manual_seed(0)
    trained = tokentune.create_model(MODEL, method="dyt", num_classes=7, **tiny())
    tokentune.save_trained(trained, str(tmp_path / "my-dyt-run"))
    argv = ["bench", *TINY_ARGS, "--no-train", "--no-latency", "--no-memory", "--out", str(tmp_path / "o"),
            "--config", "lora", "--run", str(tmp_path / "my-dyt-run"),
            "--config", "lora:model=vit_small_patch16_224,timm_embed_dim=24,label=small"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    header, rows = table_rows(out)
    assert "train s/step" not in header and "b1 latency ms" not in header and "infer MiB" not in header
    assert "model" in header                             # several models: the column appears
    assert [r[0] for r in rows] == ["lora", "my-dyt-run", "small"]
    files = os.listdir(tmp_path / "o")
    assert sorted(files) == sorted(f"bench-{MODEL}-32px-b{B}-fp32-cpu.{e}" for e in ("md", "json", "csv"))
    jrows = json.loads((tmp_path / "o" / f"bench-{MODEL}-32px-b{B}-fp32-cpu.json").read_text())["rows"]
    run_row, small = jrows[1], jrows[2]
    counts = tokentune.count_parameters(tokentune.load_trained(str(tmp_path / "my-dyt-run")))
    assert run_row["params_total"] == counts["total"] and run_row["paper_trainable"] == counts["paper_trainable"]
    assert run_row["method"] == "dyt" and run_row["calibrated_rate"] is None    # a run is measured as trained
    assert run_row["activation"] is not None and run_row["train_step_s"] is None
    assert small["model"] == "vit_small_patch16_224" and small["params_total"] < jrows[0]["params_total"]


def test_parse_config_syntax():
    c = bench_cli.parse_config("lora+tome:tome_r=16x2,8,lora_rank=4,label=a, b")
    assert c.method == "lora+tome" and c.label == "a, b"
    assert c.options == {"tome_r": [16, 16, 8], "lora_rank": 4}
    c = bench_cli.parse_config("dyt+tome:r=low,variant=mlp,rate=none,deploy=false,timm_embed_dim=64")
    assert c.options == {"tome_r": "low", "dyt_variant": "mlp"} and c.rate is None and c.deploy is False
    assert c.timm_kwargs == {"embed_dim": 64}
    c = bench_cli.parse_config("pyra")
    assert (c.label, c.options, c.rate, c.deploy) == ("pyra", {}, bench_cli.AUTO, True)
    assert bench_cli.parse_config("dyt:rate=0.3").rate == 0.3


@pytest.mark.parametrize("config, message", [
    ("nosuch", "unknown method 'nosuch'"),
    ("lora:", "nothing after ':'"),
    ("lora:rank", "'rank' is not KEY=VALUE"),
    ("lora:rank=", "option 'rank' has no value"),
    ("lora,tome", "expected METHOD[+METHOD...]"),
    ("lora:foo=1", "unknown option 'foo'"),
    ("lora+tome:tome_x=1", "unknown tome option 'x'"),
    ("lora:tome_r=4", "belongs to method 'tome'"),
    ("lora:rank=abc", "lora_rank='abc'"),
    ("lora+adapter:dropout=0.1", "ambiguous"),
    ("lora:rank=2,rank=3", "given twice"),
    ("dyt:rate=2", "outside [0, 1]"),
    ("lora:rate=0.5", "calibrates DyT"),
    ("lora:deploy=maybe", "deploy='maybe'"),
])
def test_bad_configs_are_one_line_errors(config, message, capsys):
    code, out, err = run(["bench", *TINY_ARGS, "--config", "lora", "--config", config], capsys)
    assert code == 2 and err.startswith("error: --config ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_other_bad_input(tmp_path, capsys):
    code, _, err = run(["bench", *TINY_ARGS], capsys)
    assert code == 2 and err.startswith("error: nothing to measure") and err.count("\n") == 1
    code, _, err = run(["bench", *TINY_ARGS, "--run", str(tmp_path / "missing")], capsys)
    assert code == 2 and "is not a directory" in err and err.count("\n") == 1
    code, _, err = run(["bench", *TINY_ARGS, "--config", "lora", "--rounds", "0"], capsys)
    assert code == 2 and err == "error: rounds must be at least 1, got 0\n"
    code, _, err = run(["bench", *TINY_ARGS, "--config", "lora:model=vit_nosuch_model"], capsys)
    assert code == 2 and "unknown model 'vit_nosuch_model'" in err and err.count("\n") == 1


def test_shared_frozen_tensors_keep_outputs():
    torch.manual_seed(0)
    a = tokentune.deploy(tokentune.create_model(MODEL, method="lora", **tiny()))
    torch.manual_seed(0)
    b = tokentune.deploy(tokentune.create_model(MODEL, method="lora+tome", tome_r=2, **tiny()))
    x = torch.randn(2, 3, 32, 32)
    want = b(x)
    pool = {}
    assert bench_cli.share_frozen_tensors(a, pool) == 0
    saved = bench_cli.share_frozen_tensors(b, pool)
    assert saved == sum(p.numel() * 4 for p in b.parameters())            # same seed: the whole backbone
    assert b.blocks[0].attn.qkv.weight is a.blocks[0].attn.qkv.weight
    assert torch.equal(b(x), want)


def _reproduce_tables(monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce_tables", os.path.join(ROOT, "benchmarks",
                                                                                   "reproduce_tables.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce_tables", module)      # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_reproduce_tables_puts_each_paper_number_beside_the_right_ratio(monkeypatch):
    """The table wiring on made-up measurements (the measuring itself is tested above)."""
    module = _reproduce_tables(monkeypatch)
    specs = module.rows_for("vit_b")
    fake = [dict(paper_pct=0.3, paper_trainable=1e5 * i, tokens_in=197, tokens_out=197 - i, activation=None,
                 gmacs=20.0 - i, flops_ratio=20.0 / (20.0 - i), img_per_s=100.0 + 10 * i, img_per_s_low=99.0,
                 img_per_s_high=101.0,
                 speedup=(100.0 + 10 * i) / 100.0) for i in range(len(specs))]
    rows = {r["row"]: r for r in module.table("vit_b", specs, type("R", (), {"rows": fake})())}
    keys = [s.key for s in specs]
    ips = {k: 100.0 + 10 * i for i, k in enumerate(keys)}
    assert rows["ToMe (high)"]["paper speed-up"] == pytest.approx(1381 / 425)
    assert rows["ToMe (high)"]["ours vs paper baseline"] == pytest.approx(ips["tome_high"] / ips["lora"])
    dyt_row = rows["DyT r=0.5 (MLP Dispatch)"]
    assert dyt_row["paper speed-up"] == pytest.approx(912.39 / 941.70)
    assert dyt_row["paper FLOPs ratio"] == pytest.approx(17.58 / 12.54)
    assert dyt_row["ours vs paper baseline"] == pytest.approx(ips["dyt_mlp"] / ips["adapter_tome"])
    assert rows["DyT r=0.5 (Layer Dispatch)"]["paper img/s"] is None and rows["LoRA"]["paper baseline"].startswith("LoRA")
    assert rows["Full + ToMe (r=8)"]["tokens"] == f"197->{197 - keys.index('full_tome')}"
    evit = rows["EViT + AdaptFormer"]
    assert (evit["paper GFLOPs"], evit["paper trainable (M)"]) == (11.77, 0.16)
    assert evit["ours vs paper baseline"] == pytest.approx(ips["evit_adapter"] / ips["adapter_tome"])
    assert evit["trainable (M)"] == pytest.approx(0.1 * keys.index("evit_adapter"))
    assert rows["DynamicViT (rho 0.7)"]["paper speed-up"] == pytest.approx(1010.40 / 941.70)
    assert rows["DiffRate (low)"]["paper speed-up"] == pytest.approx(709 / 425)


@pytest.mark.slow
def test_reproduce_tables_quick(tmp_path, capsys, monkeypatch):
    module = _reproduce_tables(monkeypatch)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "reproduce_vit_b_b2_quick.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert len(rows) == 18 and data["quick"] is True
    assert rows["LoRA"]["FLOPs ratio vs LoRA"] == 1.0 and rows["LoRA"]["speed-up vs LoRA"] == 1.0
    assert rows["ToMe (high)"]["paper speed-up"] == pytest.approx(1381 / 425)
    assert rows["ToMe (low)"]["paper baseline"].startswith("LoRA")
    dyt_row = rows["DyT r=0.5 (MLP Dispatch)"]
    assert dyt_row["paper speed-up"] == pytest.approx(912.39 / 941.70)
    assert dyt_row["paper FLOPs ratio"] == pytest.approx(17.58 / 12.54)
    assert dyt_row["ours vs paper baseline"] == pytest.approx(
        dyt_row["img/s"] / rows["AdaptFormer + ToMe (r=8)"]["img/s"])
    assert rows["ToMe (high)"]["tokens"] == "197->5" and rows["ToMe (low)"]["tokens"] == "197->11"
    assert rows["ToMe (high)"]["GMACs"] < rows["ToMe (low)"]["GMACs"] < rows["LoRA"]["GMACs"]
    assert rows["DyT r=0.5 (Layer Dispatch)"]["paper img/s"] is None
    assert "QUICK" in out and (tmp_path / "reproduce_vit_b_b2_quick.md").exists()
    evit, dvit = rows["EViT (keep 0.7)"], rows["DynamicViT (rho 0.7)"]
    assert evit["tokens"] == "197->72" and dvit["tokens"] == "197->68"   # 196 -> 138+1 -> 98+1 -> 70+1; 137 -> 96 -> 67
    assert evit["paper trainable (M)"] == 85.80 and evit["paper GFLOPs"] == 11.62
    assert rows["DiffRate (low)"]["tokens"] == "197->3" and rows["DiffRate (low)"]["paper img/s"] == 709


def test_batch_size_sweep(tmp_path, capsys):
    """--sweep: every row timed at each batch size (interleaved), with peak memory growing with the batch."""
    argv = ["bench", *TINY_ARGS, "--no-train", "--no-latency", "--sweep", "1,3", "--out", str(tmp_path), "--name", "s",
            "--config", "lora", "--config", "dyt:inference=capacity,capacity=1.0,rate=0.5"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "### Batch-size sweep" in out
    sweep_table = out[out.index("### Batch-size sweep"):]
    header, rows = table_rows(sweep_table)
    assert header == ["config", "b1 img/s", "b1 MiB", "b3 img/s", "b3 MiB"]
    assert [r[0] for r in rows] == ["lora", "dyt:inference=capacity,capacity=1.0,rate=0.5"]
    assert rows[0][1].endswith("(1.00x)")
    jrows = json.loads((tmp_path / "s.json").read_text())["rows"]
    for row in jrows:
        assert list(row["sweep"]) == ["1", "3"]
        one, three = row["sweep"]["1"], row["sweep"]["3"]
        assert one["img_per_s"] > 0 and one["img_per_s_low"] <= one["img_per_s"] <= one["img_per_s_high"]
        assert 0 < one["peak_mib"] < three["peak_mib"]
    assert jrows[0]["sweep"]["3"]["speedup"] == 1.0
    with open(tmp_path / "s.csv") as fh:
        crows = list(csv.DictReader(fh))
    assert {"b1_img_per_s", "b3_speedup", "b3_peak_mib"} <= set(crows[0])
    assert float(crows[1]["b3_img_per_s"]) == pytest.approx(jrows[1]["sweep"]["3"]["img_per_s"])
    code, _, err = run(["bench", *TINY_ARGS, "--config", "lora", "--sweep", "1,0"], capsys)
    assert code == 2 and err.startswith("error: --sweep batch sizes must be at least 1") and err.count("\n") == 1


# ----------------------------------------------------------------------------- the token-reduction baselines
BASELINES = {   # config -> (method as built, options of the same model, tokens entering the first block and leaving the last)
    "lora+evit:evit_keep_rate=0.5": ("lora+evit", dict(evit_keep_rate=0.5), 17, 5),       # 16 -> 8+1 -> 5+1 -> 3+1
    "lora+dynamicvit": ("lora+dynamicvit", {}, 17, 6),                                    # int(16 x 0.7^3) = 5
    "lora+diffrate:prune_kept=17,15,11,8,merge_kept=17,13,9,5":
        ("lora+diffrate", dict(diffrate_prune_kept=[17, 15, 11, 8], diffrate_merge_kept=[17, 13, 9, 5]), 17, 5),
    "vpt:vpt_deep=true,vpt_tokens=3": ("vpt", dict(vpt_deep=True, vpt_tokens=3), 20, 20),  # prompts are prefix tokens
    "vpt+pyra:tome_r=2,vpt_tokens=3": ("vpt+tome+pyra", dict(tome_r=2, vpt_tokens=3), 20, 12),  # 16 patches - 4 x 2
    "adapter+pyra:tome_r=2": ("adapter+tome+pyra", dict(tome_r=2), 17, 9),
    "evit+pyra:evit_keep_rate=0.5": ("lora+evit+pyra", dict(evit_keep_rate=0.5), 17, 5),
    "lora+pitome:r=0.75": ("lora+pitome", dict(pitome_r=0.75), 17, 7),    # 16 -> 12 -> 9 -> 7 -> 6 patches + CLS
    "lora+tofu:r=3,2,2,1": ("lora+tofu", dict(tofu_r=[3, 2, 2, 1]), 17, 9),
}


@pytest.mark.slow
def test_bench_rows_of_the_baselines(tmp_path, capsys):
    """`tokentune bench` builds, deploys and times every baseline; tokens, parameters and FLOPs are those
    of the same model (the training step, the methods' own losses, is tested with the training loop)."""
    argv = ["bench", *TINY_ARGS, "--no-latency", "--no-memory", "--no-train", "--out", str(tmp_path), "--name", "b",
            "--config", "lora"]
    for config in BASELINES:
        argv += ["--config", config]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    jrows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["label"] for r in jrows] == ["lora", *BASELINES]
    images = timing.random_images(B, 32, seed=0)
    for row, (method, options, tokens_in, tokens_out) in zip(jrows[1:], BASELINES.values()):
        counts, flops = reference(method, images, **options)
        assert (row["method"], row["tokens_in"], row["tokens_out"]) == (method, tokens_in, tokens_out), row["label"]
        assert row["params_trainable"] == counts["trainable"] and row["paper_trainable"] == counts["paper_trainable"]
        assert row["flops"] == flops and row["deployed"] is True
        assert row["img_per_s"] > 0
        reduces = tokens_out < tokens_in
        assert (row["flops"] < jrows[0]["flops"]) == reduces, row["label"]   # VPT alone adds prompt tokens


@pytest.mark.parametrize("config, message", [
    ("evit:keep_rate=1.5", "invalid evit_keep_rate=1.5: the share of tokens kept must be in (0, 1]"),
    ("lora+dynamicvit:keep_rate=0", "invalid dynamicvit_keep_rate=0.0: the share of tokens kept must be in (0, 1]"),
    ("lora+evit:locations=1,4", "evit_locations has block 4 but the model has 4 blocks (0..3)"),
    ("dynamicvit:locations=1,9", "dynamicvit_locations has block 9 but the model has 4 blocks (0..3)"),
    ("dynamicvit:keep_rate=0.2", "keeps int(16 x 0.2^3) = 0 of the 16 patch tokens"),
    ("lora+diffrate:preset=deit_base:8.7", "is for 12 blocks and 197 tokens"),
    ("evit+tome", "'evit' and 'tome' both reduce tokens and cannot be combined"),
    ("lora+dynamicvit+diffrate", "both reduce tokens and cannot be combined"),
    ("dyt+evit", "both reduce tokens and cannot be combined"),
])
def test_bad_baseline_options_are_one_line_errors(config, message, capsys):
    """The issue's bad options (keep rate outside (0, 1], a location beyond the depth, a schedule the model
    cannot run, two token reducers that cannot compose) on the command line: one line, exit code 2."""
    code, out, err = run(["bench", *TINY_ARGS, "--no-latency", "--no-memory", "--no-train", "--config", "lora",
                          "--config", config], capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- int8 rows
def test_int8_rows_beside_fp32(tmp_path, capsys):
    """quantize=int8-dynamic: the row is the deployed model with int8 Linear layers, timed with the fp32 rows,
    marked in the table; its logits are close to (not equal to) its fp32 row's, its FLOPs are the fp32 form's."""
    dyt_row = "dyt:inference=capacity,capacity=1.0,rate=0.5"
    configs = ["lora+tome:tome_r=2", "lora+tome:tome_r=2,quantize=int8-dynamic", dyt_row,
               dyt_row + ",quantize=int8-dynamic"]
    argv = ["bench", *TINY_ARGS, "--no-latency", "--no-memory", "--no-train", "--rounds", "1", "--warmup", "0",
            "--out", str(tmp_path), "--name", "q"]
    for c in configs:
        argv += ["--config", c]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    header, rows = table_rows(out)
    precision, diff = header.index("precision"), header.index("int8 logit diff")
    assert [r[precision] for r in rows] == ["fp32", "int8-dynamic", "fp32", "int8-dynamic"]
    assert rows[0][diff] == "" and float(rows[1][diff]) > 0 and "precision int8-dynamic" in out
    jrows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert [r["quantize"] for r in jrows] == [None, "int8-dynamic", None, "int8-dynamic"]
    for fp32, int8 in ((jrows[0], jrows[1]), (jrows[2], jrows[3])):
        assert int8["flops"] == fp32["flops"] and int8["img_per_s"] > 0 and fp32["int8_logit_diff"] is None
    assert abs(jrows[3]["activation"] - jrows[2]["activation"]) < 0.1     # the dispatchers still decide in int8
    # the timed int8 network against the same model deployed in fp32 (the fp32 row's network), on the timed batch
    images = timing.random_images(B, 32, seed=0)
    torch.manual_seed(0)
    model = tokentune.create_model(MODEL, method="lora+tome", num_classes=100, tome_r=2, **tiny())
    with torch.no_grad():
        want = tokentune.deploy(model)(images)
        got = tokentune.deploy(model, quantize="int8-dynamic")(images)
    err_max = float((got - want).abs().max())
    assert 0.0 < err_max < 0.25 * float(want.abs().max())    # a wrong scale moves logits by their own size
    assert jrows[1]["int8_logit_diff"] == pytest.approx(err_max, rel=0.05)


@pytest.mark.parametrize("extra, message", [
    (["--config", "lora:quantize=int4"], "quantize='int4' is not supported"),
    (["--config", "lora:quantize=int8-dynamic,deploy=false"], "drop deploy=false"),
    (["--config", "lora:quantize=int8-dynamic", "--dtype", "bf16"], "runs PyTorch's int8 CPU kernels on fp32 models"),
])
def test_int8_rows_refuse_what_cannot_apply(extra, message, capsys):
    code, out, err = run(["bench", *TINY_ARGS, "--no-latency", "--no-memory", "--no-train", "--config", "lora", *extra],
                         capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
