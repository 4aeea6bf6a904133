"""Training loop: schedules, parameter groups, accumulation, resume, NaN stop, loss hooks, DDP."""
import json
import math
import os
import socket

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file

import tokentune
from tokentune import TrainConfig
from tokentune.core import method as R
from tokentune.engine.training import (
    StopTraining,
    build_optimizer,
    learning_rate,
    param_groups,
    set_learning_rate,
    train,
    validate_config,
)
from tokentune.errors import TokenTuneError


def make_data(n=32, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % classes
    x[:, 0] += y[:, None, None].float()          # learnable signal
    return torch.utils.data.TensorDataset(x, y)


def make_model(method="lora", seed=0, **kw):
    torch.manual_seed(seed)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=3, **tiny(**kw))


def cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=1, num_workers=0, eval_every=1)
    base.update(kw)
    return TrainConfig(**base)


def trained(path):
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ----------------------------------------------------------------------------- schedules
def test_iter_schedule_warmup_then_cosine_to_min_lr():
    c = cfg(epochs=10, warmup_epochs=2, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert learning_rate(c, 0, 0, 10) == pytest.approx(1e-6)
    assert learning_rate(c, 1, 0, 10) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert learning_rate(c, 2, 0, 10) == pytest.approx(1e-3)
    assert learning_rate(c, 6, 0, 10) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)     # half-way through the cosine
    assert learning_rate(c, 9, 9, 10) == pytest.approx(1e-5, abs=1e-6)        # the last step: almost min_lr
    values = [learning_rate(c, e, s, 10) for e in range(2, 10) for s in range(10)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_epoch_schedule_reproduces_timm_as_stepped_by_the_pyra_reference():
    """Epoch e trains at timm's CosineLRScheduler value after scheduler.step(e - 1)."""
    from timm.scheduler import CosineLRScheduler

    c = cfg(epochs=100, warmup_epochs=10, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, schedule_step="epoch")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=c.lr)
    sched = CosineLRScheduler(opt, t_initial=c.epochs, lr_min=c.min_lr, warmup_lr_init=c.warmup_lr,
                              warmup_t=int(c.warmup_epochs), cycle_limit=1, t_in_epochs=True)
    for epoch in range(c.epochs):
        assert learning_rate(c, epoch, 7, 20) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        sched.step(epoch)                                  # the reference steps after every epoch like this


def test_config_validation_is_one_clear_line():
    with pytest.raises(TokenTuneError, match="warmup_epochs.*smaller than epochs"):
        validate_config(cfg(epochs=5, warmup_epochs=10))
    with pytest.raises(TokenTuneError, match="schedule_step"):
        validate_config(cfg(schedule_step="step"))
    with pytest.raises(TokenTuneError, match="not a regular expression"):
        validate_config(cfg(param_groups={"(": {"lr": 1.0}}))
    with pytest.raises(TokenTuneError, match="each pattern maps to"):
        validate_config(cfg(param_groups={"x": {"momentum": 1.0}}))
    with pytest.raises(TokenTuneError, match="amp"):
        validate_config(cfg(amp="half"))


# ----------------------------------------------------------------------------- parameter groups
def test_no_weight_decay_on_norms_biases_layerscale_and_pos_embed():
    model = make_model("full", init_values=1e-5)          # LayerScale on
    groups = param_groups(model, cfg(weight_decay=0.05))
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["head.weight"] == 0.05
    for name in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.ls1.gamma", "pos_embed", "cls_token"):
        assert wd[name] == 0.0, name
    groups = param_groups(model, cfg(weight_decay=0.05, no_decay_norm_bias=False))
    assert all(g["weight_decay"] == 0.05 for g in groups)


def test_param_group_overrides_really_apply():
    model = make_model("lora", lora_dropout=0.0)
    c = cfg(lr=1e-2, param_groups={r"blocks\.0\.": {"lr": 0.0}, r"^head\.weight$": {"lr": 5e-3, "weight_decay": 0.5}})
    opt = build_optimizer(model, c)
    by_name = {n: g for g in opt.param_groups for n in g["names"]}
    assert by_name["blocks.0.attn.qkv.lora_A"]["lr_scale"] == 0.0
    assert by_name["head.weight"]["lr_scale"] == 0.5 and by_name["head.weight"]["weight_decay"] == 0.5
    assert by_name["blocks.1.attn.qkv.lora_A"]["lr_scale"] == 1.0
    set_learning_rate(opt, 2e-3)
    assert by_name["head.weight"]["lr"] == pytest.approx(1e-3) and by_name["blocks.1.attn.qkv.lora_B"]["lr"] == 2e-3
    # behaviour: a group at lr 0 does not move, the others do
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, make_data(16), None, cfg(epochs=2, lr=1e-2, param_groups=c.param_groups), log=None)
    after = dict(model.named_parameters())
    assert torch.equal(after["blocks.0.attn.qkv.lora_B"], before["blocks.0.attn.qkv.lora_B"])
    assert torch.equal(after["blocks.0.attn.qkv.lora_A"], before["blocks.0.attn.qkv.lora_A"])
    assert not torch.equal(after["blocks.1.attn.qkv.lora_B"], before["blocks.1.attn.qkv.lora_B"])
    with pytest.raises(TokenTuneError, match=r"pattern 'nope' matches no trainable parameter"):
        param_groups(model, cfg(param_groups={"nope": {"lr": 1.0}}))


def test_clip_grad_limits_the_update():
    data = make_data(8)
    moved = {}
    for clip in (None, 1e-12):
        model = make_model(lora_dropout=0.0)
        model.head.weight.requires_grad_(False)
        model.head.bias.requires_grad_(False)
        before = model.blocks[0].attn.qkv.lora_B.detach().clone()
        train(model, data, None, cfg(epochs=2, lr=1e-2, clip_grad=clip, warmup_epochs=0), log=None)
        moved[clip] = (model.blocks[0].attn.qkv.lora_B - before).abs().max().item()
    assert moved[1e-12] < 0.05 * moved[None]


# ----------------------------------------------------------------------------- equivalences
def test_grad_accumulation_and_checkpointing_match_plain_training():
    data = make_data(32)
    weights = []
    for kw in (dict(batch_size=8), dict(batch_size=4, grad_accum=2), dict(batch_size=8, grad_checkpointing=True)):
        model = make_model(lora_dropout=0.0)
        train(model, data, None, cfg(epochs=2, **kw), log=None)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert_same(weights[0], weights[1], atol=1e-6)
    assert_same(weights[0], weights[2], atol=1e-6)


def test_training_learns_and_reports_last_and_best(tmp_path):
    data = make_data(48)
    model = make_model(lora_dropout=0.0)
    result = train(model, data, data, cfg(epochs=4, lr=3e-3, eval_every=2), out_dir=str(tmp_path), log=None)
    assert result.finished and [h["epoch"] for h in result.history if h["top1"] is not None] == [1, 3, 4]
    assert result.top1 == result.history[-1]["top1"] and result.top1 > 60
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["top1"] == result.top1 and rec["best_top1_over_epochs"] == max(h["top1"] for h in rec["evaluations"])
    assert rec["method"] == "lora" and rec["params"]["trainable"] > 0 and rec["finished"]
    assert rec["epochs"] == 4 and rec["train_time_s"] > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train_config"]["lr"] == 3e-3 and config["epochs_done"] == 4
    # the run directory loads back into an equal model (the random backbone re-created from the same seed)
    torch.manual_seed(0)
    loaded = tokentune.load_trained(str(tmp_path)).eval()
    x = data[:4][0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints and resume
RESUME_CFG = dict(epochs=3, batch_size=4, grad_accum=2, lr=2e-3, label_smoothing=0.1, eval_every=1)


def _resume_model():
    # dropout and drop-path consume the RNG: bit-identical resume needs the RNG state restored
    return make_model(lora_dropout=0.1, drop_path_rate=0.1)


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    data = make_data(32)
    full = train(_resume_model(), data, data, cfg(**RESUME_CFG), out_dir=str(tmp_path / "full"), log=None)

    def crash(event, info):
        if event == "epoch" and info["epoch"] == 0:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_resume_model(), data, data, cfg(**RESUME_CFG), out_dir=str(tmp_path / "cut"), callbacks=[crash], log=None)
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["epochs_done"] == 1
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = train(_resume_model(), data, data, cfg(**RESUME_CFG), out_dir=str(tmp_path / "cut"), resume=True, log=None)
    assert resumed.finished and resumed.global_step == full.global_step
    assert_same(trained(tmp_path / "full"), trained(tmp_path / "cut"))
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.top1 == full.top1


def test_resume_inside_an_epoch_is_bit_identical(tmp_path):
    data = make_data(32)
    train(_resume_model(), data, None, cfg(**RESUME_CFG), out_dir=str(tmp_path / "full"), log=None)
    part = train(_resume_model(), data, None, cfg(**RESUME_CFG), out_dir=str(tmp_path / "cut"), max_steps=6, log=None)
    assert not part.finished and part.global_step == 6 and part.epochs_done == 1        # 4 steps per epoch

    def stop(event, info):                               # a second interruption, by a callback
        if event == "step" and info["global_step"] == 9:
            raise StopTraining

    part = train(_resume_model(), data, None, cfg(**RESUME_CFG), out_dir=str(tmp_path / "cut"), resume=True,
                 callbacks=[stop], log=None)
    assert not part.finished and part.global_step == 9
    done = train(_resume_model(), data, None, cfg(**RESUME_CFG), out_dir=str(tmp_path / "cut"), resume=True, log=None)
    assert done.finished and done.global_step == 12
    assert_same(trained(tmp_path / "full"), trained(tmp_path / "cut"))
    again = train(_resume_model(), data, None, cfg(**RESUME_CFG), out_dir=str(tmp_path / "cut"), resume=True, log=None)
    assert again.finished and again.global_step == 12          # a finished run is not trained again


def test_run_directory_is_never_overwritten_and_resume_checks_options(tmp_path):
    data = make_data(16)
    train(make_model(), data, None, cfg(epochs=2), out_dir=str(tmp_path), max_steps=1, log=None)
    with pytest.raises(TokenTuneError, match="already holds a run.*resume=True"):
        train(make_model(), data, None, cfg(epochs=2), out_dir=str(tmp_path), log=None)
    with pytest.raises(TokenTuneError, match="option lr was 0.001 and is now 0.002"):
        train(make_model(), data, None, cfg(epochs=2, lr=2e-3), out_dir=str(tmp_path), resume=True, log=None)
    with pytest.raises(TokenTuneError, match="the model's method was 'lora' and is now 'adapter'"):
        train(make_model("adapter"), data, None, cfg(epochs=2), out_dir=str(tmp_path), resume=True, log=None)
    # options that do not change the computation may differ
    r = train(make_model(), data, None, cfg(epochs=2, eval_every=5), out_dir=str(tmp_path), resume=True, log=None)
    assert r.finished


def test_damaged_resume_state_and_another_random_backbone_are_refused(tmp_path):
    data = make_data(16)
    train(make_model(), data, None, cfg(epochs=2), out_dir=str(tmp_path), max_steps=1, log=None)
    with pytest.raises(TokenTuneError, match=r"the model's init_seed was 0 and is now 5; build the model as in "
                                             r"the interrupted run \(create_model\(\.\.\., seed=0\)\)"):
        train(make_model(seed=5), data, None, cfg(epochs=2), out_dir=str(tmp_path), resume=True, log=None)
    resume = tmp_path / "resume.pt"
    resume.write_bytes(resume.read_bytes()[:300])
    with pytest.raises(TokenTuneError, match=r"cannot read .*resume\.pt: it is truncated or damaged .*; it is corrupt: "
                                             r"continue from the weights of the last finished epoch with "
                                             r"--restart-from-weights") as e:
        train(make_model(), data, None, cfg(epochs=2), out_dir=str(tmp_path), resume=True, log=None)
    assert "\n" not in str(e.value)
    tokentune.load_trained(str(tmp_path))           # as the message says, the saved weights still load


class _Poisoned(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data, self.poison = data, False

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return (x * float("nan") if self.poison else x), y


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    data = _Poisoned(make_data(16))

    def poison(event, info):
        if event == "epoch":
            data.poison = True

    with pytest.raises(TokenTuneError) as info:
        train(make_model(), data, None, cfg(epochs=3), out_dir=str(tmp_path), callbacks=[poison], log=None)
    msg = str(info.value)
    assert "\n" not in msg
    assert "loss is nan at epoch 2, step 1/2 (global step 3): the batch's images hold NaN" in msg   # the data's fault
    assert "lower --lr" not in msg and "checkpoint after epoch 1 is kept" in msg
    assert json.loads((tmp_path / "config.json").read_text())["epochs_done"] == 1
    data.poison = False
    r = train(make_model(), data, None, cfg(epochs=3), out_dir=str(tmp_path), resume=True, log=None)
    assert r.finished and r.global_step == 6


def test_a_loss_that_diverges_after_updates_points_at_the_learning_rate():
    def blow_up(event, info):
        if event == "epoch":
            with torch.no_grad():
                next(p for p in info["model"].parameters() if p.requires_grad).fill_(float("inf"))

    with pytest.raises(TokenTuneError, match=r"training diverged: the loss became nan at epoch 2.*lower --lr"):
        train(make_model(), make_data(16), None, cfg(epochs=3), callbacks=[blow_up], log=None)


def test_method_loss_hook_is_used(monkeypatch):
    calls = []

    def loss(model, images, targets, criterion):
        logits = model(images)
        calls.append(images.shape[0])
        return criterion(logits, targets) + 0.0 * logits.sum(), {"aux": 0.25}

    monkeypatch.setitem(R._REGISTRY, "auxloss", R.Method("auxloss", None, lambda m, c, ctx: None, order=40, loss=loss))
    model = make_model("lora+auxloss")
    result = train(model, make_data(16), None, cfg(epochs=2), log=None)
    assert calls == [8, 8, 8, 8]
    assert result.history[0]["aux"] == pytest.approx(0.25)


def test_amp_modes():
    from tokentune.engine.evaluate import amp_dtype
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16 and amp_dtype("fp16", cpu) is torch.float16
    r = train(make_model(lora_dropout=0.0), make_data(16), make_data(8), cfg(epochs=2, amp="bf16"), log=None)
    assert math.isfinite(r.history[-1]["train_loss"]) and r.top1 is not None


# ----------------------------------------------------------------------------- data parallel
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tokentune.engine import distributed as D
    model = make_model(lora_dropout=0.0)
    data = make_data(32)
    result = train(model, data, make_data(13, seed=1), cfg(epochs=2, batch_size=4), out_dir=os.path.join(out_dir, "run"),
                   log=None)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "top1": result.top1, "loss": [h["train_loss"] for h in result.history]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    D.shutdown()


@pytest.mark.slow
def test_two_process_gloo_training_equals_one_process_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_same(r0["params"], r1["params"])                      # both processes hold the same weights
    model = make_model(lora_dropout=0.0)
    single = train(model, make_data(32), make_data(13, seed=1), cfg(epochs=2, batch_size=8), log=None)
    ref = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert_same(r0["params"], ref, atol=1e-5)
    assert r0["top1"] == single.top1 and r0["loss"] == pytest.approx([h["train_loss"] for h in single.history], abs=1e-6)
    assert_same(trained(tmp_path / "run"), ref, atol=1e-5)      # only rank 0 wrote, and wrote the right thing


def test_distributed_gradient_averaging_and_sampler_shards():
    from tokentune.engine.distributed import EpochSampler, ShardSampler
    shards = [EpochSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(4)
    single = EpochSampler(10, seed=3)
    single.set_epoch(4)
    a, b = list(shards[0]), list(shards[1])
    assert sorted(a + b) == sorted(single.indices())
    assert [x for pair in zip(a, b) for x in pair] == single.indices()      # k-th batches union = single k-th batch
    shards[0].set_epoch(4, start=2)
    assert list(shards[0]) == a[2:]
    assert sorted(list(ShardSampler(7, 0, 2)) + list(ShardSampler(7, 1, 2))) == list(range(7))
    s5 = EpochSampler(5, rank=1, world_size=2)
    assert len(s5) == 3 and len(list(s5)) == 3                              # padded to equal shares


def test_sigterm_stops_after_the_step_with_the_state_saved(tmp_path):
    import signal
    data = make_data(16)

    def preempt(event, info):
        if event == "step" and info["global_step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)             # what a cluster scheduler sends before preemption

    before = signal.getsignal(signal.SIGTERM)
    r = train(make_model(), data, None, cfg(epochs=3), out_dir=str(tmp_path), callbacks=[preempt],
              handle_signals=True, log=None)
    assert signal.getsignal(signal.SIGTERM) is before          # handlers restored
    assert not r.finished and r.stop_reason == "signal" and r.global_step == 3
    r = train(make_model(), data, None, cfg(epochs=3), out_dir=str(tmp_path), resume=True, log=None)
    assert r.finished and r.global_step == 6


def test_sigterm_during_the_evaluation_stops_it_at_once_and_resume_evaluates_first(tmp_path):
    import signal
    data, seen = make_data(16), []

    class Test(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            seen.append(i)
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGTERM)         # `timeout` while the first epoch is evaluated
            return data[i]

    r = train(make_model(), data, Test(), cfg(epochs=2), out_dir=str(tmp_path / "a"), handle_signals=True,
              eval_batch_size=2, log=None)
    assert not r.finished and r.stop_reason == "signal" and r.global_step == 2 and r.history == []
    assert len(seen) < 6                                      # the evaluation did not go on
    r = train(make_model(), data, Test(), cfg(epochs=2), out_dir=str(tmp_path / "a"), resume=True, log=None)
    whole = train(make_model(), data, data, cfg(epochs=2), out_dir=str(tmp_path / "b"), log=None)
    assert r.finished and [h["top1"] for h in r.history] == [h["top1"] for h in whole.history]
    assert all(torch.equal(a, b) for a, b in zip(trained(tmp_path / "a").values(), trained(tmp_path / "b").values()))


def test_method_step_hook_drives_dyt_temperature_schedule(monkeypatch):
    """Method.on_step runs before every step: DyT's linear tau schedule goes 5 -> 1 over training."""
    from tokentune.methods import dyt
    model = make_model("dyt", dyt_tau=5.0, dyt_tau_end=1.0, dyt_tau_schedule="linear")
    seen = []
    orig = dyt.TokenDispatcher.forward

    def spy(self, *a, **k):
        seen.append(self.tau)
        return orig(self, *a, **k)
    monkeypatch.setattr(dyt.TokenDispatcher, "forward", spy)
    train(model, make_data(16), None, cfg(epochs=2, batch_size=8, eval_every=100), out_dir=None)
    per_step = sorted(set(seen), reverse=True)
    assert per_step[0] == 5.0                       # first step: progress 0
    assert 1.0 < per_step[-1] < 5.0                 # last step: 3/4 of the way to 1
    assert abs(per_step[-1] - (5.0 + (1.0 - 5.0) * 3 / 4)) < 1e-9
