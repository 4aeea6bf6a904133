"""DyT's small-data options (all-active warm-up, rate warm-up, calibrated start), keep_layers in
training, the complete model against plain adapters, the small-data recipe, and the ablation
script's bookkeeping."""
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from safetensors.torch import load_file

import tokentune
from tokentune import TrainConfig, get_recipe
from tokentune.cli import build_parser
from tokentune.cli import train as cli_train
from tokentune.engine.training import train
from tokentune.errors import TokenTuneError
from tokentune.methods import dyt
from tokentune.methods.dyt import VARIANTS
from tokentune.tools.demo import ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(method="dyt", seed=0, num_classes=3, **options):
    torch.manual_seed(seed)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=num_classes, **options, **tiny())


@torch.no_grad()
def _randomize(model):
    """Non-zero adapters and dispatchers whose logits spread around 0."""
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "adapter" in name or "dispatcher" in name:
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.05))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3


# ----------------------------------------------------------------------------- schedules
def test_rate_target_schedule():
    cfg = dyt.DyTConfig(target_rate=0.5, active_warmup=0.2, rate_warmup=0.4)
    assert dyt.target_rate_at(0.0, cfg) is None and dyt.target_rate_at(0.1999, cfg) is None    # all active
    assert dyt.target_rate_at(0.2, cfg) == pytest.approx(1.0)
    assert dyt.target_rate_at(0.4, cfg) == pytest.approx(0.75)                                 # half-way down
    assert dyt.target_rate_at(0.6, cfg) == dyt.target_rate_at(1.0, cfg) == 0.5
    ref = dyt.DyTConfig(target_rate=0.7)                                                       # the reference
    assert not ref.scheduled and all(dyt.target_rate_at(p, ref) == 0.7 for p in (0.0, 0.5, 1.0))


def test_options_are_checked_in_one_line():
    for bad in (dict(dyt_active_warmup=1.0), dict(dyt_rate_warmup=-0.1), dict(dyt_active_warmup=0.6, dyt_rate_warmup=0.5)):
        with pytest.raises(TokenTuneError, match=r"invalid dyt_active_warmup=.*fractions of training") as err:
            _model(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(TokenTuneError, match="dyt_calibrate_init"):
        _model(dyt_calibrate_init="yes")


def test_schedule_needs_the_training_progress():
    model = _model(dyt_rate_warmup=0.5).train()
    x, y = _data()
    with pytest.raises(TokenTuneError, match=r"call tokentune.dyt.update_schedule\(model, step / total_steps\)"):
        dyt.dyt_loss(model, x, y, F.cross_entropy)
    dyt.update_schedule(model, 0.5)
    assert dyt.training_progress(model) == 0.5
    dyt.dyt_loss(model, x, y, F.cross_entropy)                       # the reference defaults need nothing
    dyt.dyt_loss(_model().train(), x, y, F.cross_entropy)


# ----------------------------------------------------------------------------- the complete model and adapters
def test_complete_dyt_model_equals_the_adapter_method_with_the_same_weights():
    """DyT with every token active is AdaptFormer-style adapters (same names, same place): the
    baseline DyT at r = 1 has to match."""
    model = _model(dyt_bottleneck=8)
    _randomize(model)
    adapter = _model("adapter", adapter_bottleneck=8)
    missing, unexpected = adapter.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("dispatcher" in k for k in unexpected)
    x, _ = _data(4)
    with torch.no_grad():
        want = adapter.eval()(x)
        assert torch.allclose(model.eval()(x, dyt_complete=True), want, atol=1e-5)
        _, state = model(x, return_state=True)
        assert 0.2 < dyt.activation_rate(state).item() < 0.8        # the dynamic model does skip ...
        assert (model(x) - want).abs().max() > 1e-4                  # ... and that changes its output


def test_active_warmup_trains_the_adapter_model_and_leaves_dispatchers_alone():
    model = _model(dyt_bottleneck=8, dyt_adapter_dropout=0.0, dyt_active_warmup=0.3)
    _randomize(model)
    adapter = _model("adapter", adapter_bottleneck=8, adapter_dropout=0.0)
    adapter.load_state_dict(model.state_dict(), strict=False)
    x, y = _data()
    dyt.update_schedule(model.train(), 0.1)
    loss, logs = dyt.dyt_loss(model, x, y, F.cross_entropy)
    loss.backward()
    want = F.cross_entropy(adapter.train()(x), y)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5) and logs == {"ce": pytest.approx(want.item()), "rate": 1.0}
    for name, p in adapter.named_parameters():
        if p.requires_grad:
            other = dict(model.named_parameters())[name].grad
            assert torch.allclose(other, p.grad, atol=1e-6), name
    assert all(d.linear.weight.grad is None for d in dyt.dispatchers(model))
    # after the warm-up: the full DyT loss again
    dyt.update_schedule(model, 0.3)
    _, logs = dyt.dyt_loss(model, x, y, F.cross_entropy)
    assert {"rate", "rate_loss", "ce_complete", "kl"} <= set(logs)


def test_rate_warmup_uses_the_scheduled_target():
    x, y = _data()
    scheduled = _model(dyt_target_rate=0.5, dyt_rate_warmup=0.5)
    fixed = _model(dyt_target_rate=0.75)
    _randomize(scheduled)
    fixed.load_state_dict(scheduled.state_dict())
    dyt.update_schedule(scheduled.train(), 0.25)                  # half of the warm-up: target 0.75
    results = []
    for m in (scheduled, fixed.train()):
        torch.manual_seed(7)                                      # the same Gumbel noise and dropout
        results.append(dyt.dyt_loss(m, x, y, F.cross_entropy))
    (a, la), (b, lb) = results
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert la["rate_loss"] == pytest.approx((la["rate"] - 0.75) ** 2, abs=1e-6)


def test_calibrate_init_sets_the_rate_at_the_first_step_only():
    x, y = _data()
    model = _model(dyt_target_rate=0.3, dyt_calibrate_init=True)
    _randomize(model)
    dyt.update_schedule(model.train(), 0.0)
    dyt.dyt_loss(model, x, y, F.cross_entropy)
    assert dyt.activation_stats(model, [x]).overall == pytest.approx(0.3, abs=0.02)
    biases = [d.linear.bias.clone() for d in dyt.dispatchers(model)]
    dyt.update_schedule(model, 0.1)
    dyt.dyt_loss(model, x, y, F.cross_entropy)
    assert all(torch.equal(b, d.linear.bias) for b, d in zip(biases, dyt.dispatchers(model)))
    # with a rate warm-up the start is calibrated to the warm-up's first target, every token
    model = _model(dyt_target_rate=0.3, dyt_calibrate_init=True, dyt_rate_warmup=0.5)
    _randomize(model)
    dyt.update_schedule(model.train(), 0.0)
    dyt.dyt_loss(model, x, y, F.cross_entropy)
    assert dyt.activation_stats(model, [x]).overall == 1.0


def test_training_with_the_small_data_options_follows_the_schedule_and_resumes_exactly(tmp_path):
    x, y = _data(16)
    data = torch.utils.data.TensorDataset(x, y)
    opts = dict(dyt_bottleneck=8, dyt_active_warmup=0.25, dyt_rate_warmup=0.25, dyt_calibrate_init=True)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, warmup_epochs=1, num_workers=0, eval_every=100)   # 1 step/epoch
    full = train(_model(**opts), data, None, cfg, out_dir=str(tmp_path / "full"), log=None)
    epochs = full.history
    assert epochs[0]["rate"] == 1.0 and "kl" not in epochs[0]          # step 1 of 4: every token active
    assert "kl" in epochs[1] and "kl" in epochs[3]
    part = train(_model(**opts), data, None, cfg, out_dir=str(tmp_path / "cut"), max_steps=2, log=None)
    assert not part.finished
    done = train(_model(**opts), data, None, cfg, out_dir=str(tmp_path / "cut"), resume=True, log=None)
    assert done.finished
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- keep_layers
@pytest.mark.parametrize("keep", [1, 2])
def test_keep_layers_trains_in_every_variant(keep):
    """The reference crashes with keep_layers > 0 (blocks without a dispatcher); here the first
    ``keep`` blocks run every token, have adapters that train, and the rate counts the others."""
    x, y = _data(4)
    for variant in VARIANTS:
        # (target 0.3: the last block's dispatcher learns from the rate loss alone, the CLS token
        # being the only output, so the rate must differ from the target for it to get a gradient)
        model = _model(dyt_variant=variant, dyt_keep_layers=keep, dyt_bottleneck=8, dyt_target_rate=0.3).train()
        _randomize(model)
        loss, logs = dyt.dyt_loss(model, x, y, F.cross_entropy)
        loss.backward()
        assert math.isfinite(loss.item())
        assert sorted({d.layer for d in dyt.dispatchers(model)}) == list(range(keep, 4))
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (variant, name)
        with torch.no_grad():                                    # inference skips for real, same outputs
            model.eval()
            assert torch.allclose(model(x), model(x, dyt_execution="mask"), atol=1e-5)


# ----------------------------------------------------------------------------- the small-data recipe
def test_small_data_recipe_reaches_the_config_and_keeps_the_reference_defaults():
    recipe = get_recipe(dyt.SMALL_DATA)
    assert recipe.method == "dyt" and recipe.train_options == {}
    cfg = dyt.config_of(_model(**recipe.model_options))
    assert cfg.bottleneck == 64
    defaults = dyt.DyTConfig()
    # everything but the adapters' width is the reference's: the ablation found no other option to change
    assert {k: v for k, v in vars(cfg).items() if k != "bottleneck"} == {k: v for k, v in vars(defaults).items()
                                                                        if k != "bottleneck"}
    assert not cfg.scheduled


def test_small_data_recipe_from_the_command_line_and_explicit_options_override_it():
    args = build_parser().parse_args(["train", "--recipe", "dyt-small-data", "--dyt-target-rate", "0.7", "--lr", "3e-3"])
    opts = cli_train._resolve_train_options(args)
    assert opts["method"] == "dyt" and opts["recipe"] == "dyt-small-data"
    assert opts["model_options"] == {"dyt_bottleneck": 64, "dyt_target_rate": 0.7}
    assert opts["train"] == {"lr": 3e-3}
    args = build_parser().parse_args(["train", "--recipe", "dyt-small-data", "--dyt-bottleneck", "32"])
    assert cli_train._resolve_train_options(args)["model_options"] == {"dyt_bottleneck": 32}


# ----------------------------------------------------------------------------- the demo and the ablation script
def test_demo_has_an_adapter_row_of_the_same_size_as_dyt():
    rows = {r.method: r for r in reversed(ROWS) if r.reuse is None}     # the trained rows, the first of each method
    assert rows["adapter"].options["adapter_bottleneck"] == rows["dyt"].options["dyt_bottleneck"]
    assert [r.method for r in ROWS].index("adapter") == [r.method for r in ROWS].index("dyt") - 1


def _ablation(monkeypatch):
    spec = importlib.util.spec_from_file_location("dyt_ablation", os.path.join(ROOT, "benchmarks", "dyt_ablation.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "dyt_ablation", module)
    spec.loader.exec_module(module)
    return module


def test_ablation_summary_pairs_runs_with_the_reference(monkeypatch):
    """The table's bookkeeping on made-up runs (the runs themselves are the real pipeline)."""
    m = _ablation(monkeypatch)
    rows = [r for r in m.ROWS if r.key in ("adapter", "ref", "rate-warmup")]

    def run(key, data, seed, top1, macs, rate=None):
        rec = dict(key=key, data_seed=data, seed=seed, top1=top1, macs=macs, trainable=100, train_s=1.0, test_images=10,
                   last_epoch={"rate": rate} if rate is not None else {})
        if rate is not None:
            rec.update(names=["blocks.0.mlp", "blocks.1.mlp"], per_layer=[rate + data / 10, rate / 2],
                       overall=0.75 * rate, agreement=0.8)
        return rec

    records = [run("adapter", 0, s, 70.0 + s, 10e6) for s in range(3)]
    records += [run("ref", 0, s, 72.0 - s, 8e6, 0.5) for s in range(3)] + [run("ref", 1, 0, 60.0, 8e6, 0.5)]
    records += [run("rate-warmup", 0, s, 73.0 - s + (s == 2) * -5, 9e6, 0.6) for s in range(3)]
    records += [run("rate-warmup", 1, 0, 60.0, 9e6, 0.6)]
    table = {s["key"]: s for s in m.summarize(rows, records)}
    adapter, ref, warm = table["adapter"], table["ref"], table["rate-warmup"]
    assert adapter["data"]["0"]["mean"] == 71.0 and adapter["data"]["0"]["std"] == pytest.approx(1.0)
    assert adapter["vs_reference"] == pytest.approx((-2 + 0 + 2) / 3) and adapter["beats_reference"] == 1
    assert warm["vs_reference"] == pytest.approx((1 + 1 - 4 + 0) / 4)
    assert (warm["beats_reference"], warm["ties_reference"], warm["pairs"]) == (2, 1, 4)
    assert warm["macs_vs_adapter"] == pytest.approx(0.9) and warm["train_rate"] == pytest.approx(0.6)
    assert warm["data"]["1"]["per_layer"] == pytest.approx([0.7, 0.3]) and warm["per_layer"] == pytest.approx([0.625, 0.3])
    assert "vs_reference" not in ref and "1" not in adapter["data"]
    text = m.markdown(list(table.values()), dict(data_seeds=[0, 1], seeds_text="s", budget="b", machine="m", workers=2,
                                                 wall_s=1.0, load_before="0", load_after="0", cpu_s={"0": 5.0, "1": 2.0}))
    assert "| DyT r=0.5 (reference defaults) | 71.0 ± 1.0 | 60.0 ± 0.0 |  |  |" in text
    assert "| 71.0 ± 1.0 |  | +0.0 ± 2.0 | 1/3 (1 tied) | 10.00 (100%) | 1 (all) |" in text   # the adapter: one data seed
    assert "| -0.5 ± 2.4 | 2/4 (1 tied) | 9.00 (90%) | 0.45 [0.62 0.30] | 0.60 | 0.80 | 100 | 1 |" in text
    assert "- r=0.5, rate target 1.0 -> 0.5 over the first 50%: data 0: 73.0 72.0 66.0; data 1: 60.0" in text
    assert "CPU time of the jobs (data seed 0: 5 s, data seed 1: 2 s)" in text


def test_ablation_rows_outside_the_grid_are_selectable_and_unknown_rows_fail(monkeypatch):
    m = _ablation(monkeypatch)
    grid = {r.key for r in m.ROWS}
    assert {r.key for r in m.EXTRA_ROWS}.isdisjoint(grid) and {"adapter", "ref", "r1.0", "keep2", "moe"} <= grid
    with pytest.raises(SystemExit, match="unknown row.* nope; choose from .*adapter64,? dyt64"):
        m.main(["--rows", "adapter64,nope", "--no-pictures"])


@pytest.mark.slow
def test_ablation_script_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _ablation(monkeypatch)
    threads = torch.get_num_threads()
    try:
        out = m.main(["--quick", "--workers", "1", "--out", str(tmp_path / "abl")])
    finally:
        torch.set_num_threads(threads)
    keys = [r["key"] for r in out["rows"]]
    assert keys == ["adapter", "ref", "keep2"]
    rows = {r["key"]: r for r in out["rows"]}
    assert rows["keep2"]["names"] == ["blocks.2.mlp", "blocks.3.mlp"]
    assert rows["ref"]["macs"] < rows["adapter"]["macs"]
    for suffix in (".json", ".md", "_rates_data0.png", "_tokens_ref.png"):
        assert (tmp_path / f"abl{suffix}").is_file()
