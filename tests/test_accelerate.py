"""``tokentune accelerate``: the whole command on a tiny trained run and a tiny image folder (export,
table, picture, record), resume, the speed-up refinement, recovery training, every source kind, and
one-line errors."""
import gc
import io
import json
import os
import re
import weakref
from contextlib import redirect_stdout

import pytest
import torch
from conftest import randomize_lora, tiny
from test_cli import TINY_ARGS, run
from test_data import make_folder

import tokentune
from tokentune import cli
from tokentune.core.flops import count_flops
from tokentune.core.method import get_method
from tokentune.engine.data import ImageDataset, build_transform, image_folder_dataset
from tokentune.errors import TokenTuneError
from tokentune.tools import accelerate as acc

FAST = ["--batch-size", "4", "--rounds", "1", "--min-block-s", "0", "--max-trials", "2", "--eval-batch-size", "8",
        "--no-progress"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run trained for one epoch on a 3-class image folder (12 images per split)."""
    tmp = tmp_path_factory.mktemp("accelerate")
    folder = make_folder(tmp / "shapes", classes=("a", "b", "c"), per_class=4)
    out = tmp / "lora"
    with redirect_stdout(io.StringIO()):
        code = cli.main(["train", "--image-folder", str(folder), "--method", "lora", "--epochs", "1", "--lr", "1e-3",
                         "--out", str(out)] + TINY_ARGS)
    assert code == 0
    return tmp, folder, out


def _calls(monkeypatch):
    """Count the side-by-side timings (the real ones still run)."""
    calls = []
    real = acc.time_side_by_side

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(acc, "time_side_by_side", counted)
    return calls


def test_the_command_exports_the_choice_writes_its_record_and_resumes(lora_run, capsys, monkeypatch):
    tmp, folder, run_dir = lora_run
    out = tmp / "fast"
    argv = ["accelerate", str(run_dir), "--image-folder", str(folder), "--target-share", "0.7", "--out", str(out)] + FAST
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    for name in ("accelerate.json", "accelerate.md", "accelerate.png", "accelerate-state.json", "deployed.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "accelerate.json").read_text())
    choice = record["choice"]
    free = {n for n in tokentune.available_methods()
            if get_method(n).training_free and get_method(n).rate_option}
    assert {"tome", "evit"} <= free and {r["method"] for r in record["candidates"]} == free   # every training-free method
    assert choice["gmacs"] <= 0.7 * record["base"]["gmacs"] and choice["top1"] == max(
        r["top1"] for r in record["candidates"] if r["gmacs"] <= 0.7 * record["base"]["gmacs"])
    assert set(record["time"]) >= {"open", "data", "flops", "timing", "evaluation", "build", "outputs", "counts"}
    # one schedule per method is evaluated (the gentlest within the target); the others show no top-1
    trials = [t for r in record["search"].values() for t in r["trials"]]
    for result in record["search"].values():
        assert [t["rate"] for t in result["trials"] if t["top1"] is not None] == [result["chosen"]["rate"]]
    counts = record["time"]["counts"]
    assert counts["evaluation"] == 1 + len(record["search"]) and counts["timing"] == len(trials)
    assert "| unmodified |" in (out / "accelerate.md").read_text() and "(chosen)" in stdout
    # the export is the chosen model: its spec, its FLOPs and its accuracy are the recorded ones
    model = tokentune.open_model(str(out))
    spec = model.tokentune.spec
    assert spec["method"] == f"lora+{choice['method']}" and spec["configs"][choice["method"]][choice["option"]] == \
        choice["schedule"]
    images = torch.randn(1, 3, 32, 32)
    assert count_flops(model, images) / 2e9 == pytest.approx(choice["gmacs"], rel=1e-6)
    test = image_folder_dataset(str(folder), "test", classes=image_folder_dataset(str(folder), "train").classes)
    test.transform = build_transform(model)
    assert tokentune.evaluate(model, test, batch_size=8, progress=False)["top1"] == pytest.approx(choice["top1"])
    # the same command again continues: nothing is timed again, the same choice is made
    calls = _calls(monkeypatch)
    code, stdout, err = run(argv, capsys)
    assert code == 0 and "continuing the search" in stdout and not calls, err
    assert json.loads((out / "accelerate.json").read_text())["choice"] == choice
    # a search stopped after some trials: only the missing ones are measured
    state = json.loads((out / "accelerate-state.json").read_text())
    dropped = sorted(state["trials"])[-1]
    del state["trials"][dropped]
    (out / "accelerate-state.json").write_text(json.dumps(state))
    code, _, err = run(argv, capsys)
    assert code == 0 and len(calls) == 1, err
    # other settings never mix with the recorded ones
    code, _, err = run(argv[:-len(FAST)] + ["--batch-size", "8"] + FAST[2:], capsys)
    assert code == 2 and "holds a search with other settings (batch_size differ)" in err
    code, _, err = run(argv + ["--evaluate", "within"], capsys)
    assert code == 2 and "holds a search with other settings (evaluate differ)" in err


def _fake_timer(efficiency):
    """A deterministic machine: the speed-up is ``efficiency`` times the FLOPs ratio."""
    def timer(base, candidate, images, cfg, seed, base_warm=False):
        ratio = count_flops(base, images[:1]) / count_flops(candidate, images[:1])
        speedup = efficiency * ratio
        return {"speedup": speedup, "speedup_low": speedup * 0.95, "speedup_high": speedup * 1.05,
                "img_s": 100.0 * speedup, "base_img_s": 100.0}
    return timer


def _trained(seed=0):
    torch.manual_seed(seed)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=3, seed=seed, **tiny())
    randomize_lora(model)
    return model


def _drifting_timer(efficiencies):
    """A shared machine: the i-th timing measures ``efficiencies[i]`` times the FLOPs ratio (the
    last one from then on)."""
    done = []

    def timer(base, candidate, images, cfg, seed, base_warm=False):
        done.append(1)
        return _fake_timer(efficiencies[min(len(done), len(efficiencies)) - 1])(base, candidate, images, cfg, seed)
    return timer


@pytest.mark.parametrize("evaluate", ["gentlest", "within"])
def test_a_speedup_target_is_refined_by_the_measured_time(lora_run, monkeypatch, evaluate):
    _, folder, _ = lora_run
    evaluated, reads, built = [], [], []
    real, real_build, real_read = acc.accuracy, acc.build_candidate, ImageDataset.__getitem__
    monkeypatch.setattr(acc, "accuracy", lambda *a: evaluated.append(a[-1]) or real(*a))
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda self, i: reads.append(i) or real_read(self, i))

    def build(*args, **kwargs):            # memory: the candidate before is gone when the next is built
        gc.collect()
        assert all(ref() is None for ref in built)
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(acc, "build_candidate", build)
    monkeypatch.setattr(acc, "time_side_by_side", _drifting_timer([0.8, 1.2, 1.1]))
    val = image_folder_dataset(str(folder), "test")
    result = tokentune.accelerate(_trained(), val, 1.3, methods=["tome"], batch_size=4, eval_batch_size=8,
                                  max_trials=3, evaluate=evaluate, progress=False, log=None)
    trials = result.record["search"]["tome"]["trials"]
    # the validation images are decoded once (the first twice: its size decides that they are held
    # in memory), however many evaluations follow
    assert len(evaluated) >= 2 and sorted(reads) == [0] + list(range(len(val)))
    # FLOPs first (1.3 gives 0.8 * 1.3 < 1.3 measured), then corrected by the measured efficiency
    assert trials[0]["rate"] == "flops:1.3000" and trials[0]["speedup"] < 1.3
    assert float(trials[1]["rate"].split(":")[1]) > 1.3 and result.choice["speedup"] >= 1.3
    within = [t for t in trials if t["speedup"] >= 1.3]
    assert len(within) == 2 and trials[0]["top1"] is None          # two schedules reach 1.3x
    assert result.record["time"]["counts"]["evaluation"] == len(evaluated)
    if evaluate == "gentlest":
        # only the gentlest within the target (lowest FLOPs ratio) is evaluated, and it is the choice
        gentlest = min(within, key=lambda t: t["flops_ratio"])
        assert [t for t in trials if t["top1"] is not None] == [gentlest] and len(evaluated) == 2   # and the base
        assert result.choice == dict(gentlest, met=True)
        # the last trial is the gentlest: its model is evaluated and exported without a second build
        assert gentlest is trials[-1] and len(built) == result.record["time"]["counts"]["build"] == len(trials)
    else:
        # every schedule within the target is evaluated, and the most accurate one is chosen
        assert all(t["top1"] is not None for t in within) and len(evaluated) == 3
        assert result.choice == dict(max(within, key=lambda t: (t["top1"], t["speedup"])), met=True)


def test_a_target_bracketed_within_the_tolerance_ends_the_search(lora_run, monkeypatch):
    """A schedule that misses 1.3x and a stronger one that meets it, 3% apart in FLOPs ratio
    (tolerance 5%): a third timing between them would measure noise, so the search stops at two."""
    _, folder, _ = lora_run
    monkeypatch.setattr(acc, "time_side_by_side", _drifting_timer([0.97, 1.03, 1.0, 1.0]))
    result = tokentune.accelerate(_trained(), image_folder_dataset(str(folder), "test"), 1.3, methods=["tome"],
                                  batch_size=4, eval_batch_size=8, max_trials=4, progress=False, log=None)
    missed, met = result.record["search"]["tome"]["trials"]
    assert missed["speedup"] < 1.3 <= met["speedup"] and met["speedup"] > 1.3 * 1.05      # not ended by _done
    assert met["flops_ratio"] <= missed["flops_ratio"] * 1.05 and result.choice == dict(met, met=True)


def test_only_evaluated_schedules_are_chosen_and_the_others_show_a_dash():
    def row(rate, speedup, top1):
        return {"method": "tome", "rate": rate, "option": "r", "schedule": [int(10 * speedup)], "gmacs": 10 / speedup,
                "speedup": speedup, "speedup_low": speedup, "speedup_high": speedup, "top1": top1,
                "drop": None if top1 is None else 80.0 - top1}

    faster, kept = row("flops:2", 2.0, None), row("flops:1.5", 1.5, 70.0)
    target = acc.Target("speedup", 1.4)
    assert acc.choose([faster, kept], target, 10.0) is kept and acc.choose([faster], target, 10.0) is None
    lines = acc.table([kept], {"gmacs": 10.0, "top1": 80.0}, kept, [faster]).splitlines()
    assert "tome (chosen)" in lines[-2] and "70.00" in lines[-2]
    assert "tome (tried)" in lines[-1] and lines[-1].replace(" ", "").endswith(f"|{acc.NOT_EVALUATED}|{acc.NOT_EVALUATED}|")


def test_later_methods_start_from_the_efficiency_measured_before(lora_run, monkeypatch):
    """The first method needs a correction; the next starts where the pooled efficiency points
    (target / efficiency) and meets the target with its first timing."""
    _, folder, _ = lora_run
    timer, calls = _fake_timer(0.8), []
    monkeypatch.setattr(acc, "time_side_by_side", lambda *a, **k: calls.append(1) or timer(*a, **k))
    result = tokentune.accelerate(_trained(), image_folder_dataset(str(folder), "test"), 1.3,
                                  methods=["tome", "pitome", "evit"], batch_size=4, eval_batch_size=8, progress=False, log=None)
    earlier, later = list(result.record["search"])[:2]
    assert float(result.record["search"][earlier]["trials"][0]["rate"].split(":")[1]) == 1.3
    first = result.record["search"][later]["trials"][0]
    assert first["rate"] == f"flops:{1.3 / 0.8:.4f}" and first["speedup"] >= 1.3
    # a FLOPs target that gives a schedule already timed is not timed again
    assert len(calls) == sum(len(r["trials"]) for r in result.record["search"].values())
    assert acc.efficiency([{"speedup": 2.0, "flops_ratio": 1.0}, {"speedup": 1.0, "flops_ratio": 2.0},
                           {"error": "x"}]) == pytest.approx(1.0)
    assert acc.efficiency([]) is None
    trials = {"evit|flops:1.4266": {"method": "evit", "schedule": 0.6718, "speedup": 1.6},
              "tome|flops:1.5": {"method": "tome", "schedule": [11, 11, 11, 5], "speedup": 1.7},
              "tome|flops:9": {"method": "tome", "rate": "flops:9", "error": "out of reach"}}
    assert acc._timed_before(trials, "evit", 0.6718) is trials["evit|flops:1.4266"]
    assert acc._timed_before(trials, "tome", (11, 11, 11, 5)) is trials["tome|flops:1.5"]
    assert acc._timed_before(trials, "tome", [11, 11, 11, 4]) is None and acc._timed_before(trials, "pitome", 0.6718) is None


@pytest.mark.slow
def test_recovery_training_runs_when_the_drop_exceeds_max_drop(lora_run, tmp_path, monkeypatch):
    _, folder, run_dir = lora_run
    monkeypatch.setattr(acc, "time_side_by_side", _fake_timer(1.0))
    monkeypatch.setattr(acc, "method_accuracy", lambda ctx, row: ctx.state.data["base"]["top1"] - 50.0)
    train = image_folder_dataset(str(folder), "train")
    result = tokentune.accelerate(str(run_dir), image_folder_dataset(str(folder), "test"), "share:0.7",
                                  str(tmp_path / "out"), train_data=train, methods=["tome"], max_drop=1.0,
                                  finetune_epochs=1, finetune_batch_size=4, batch_size=4, onnx=True, progress=False,
                                  log=None)
    assert result.choice["label"] == "tome + recovery" and result.record["finetune"]["finetuned_epochs"] == 1
    assert (tmp_path / "out" / "finetune" / "results.json").is_file() and "finetune" in result.record["time"]
    assert tokentune.open_model(str(tmp_path / "out")).tokentune.spec["method"] == "lora+tome"
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_every_source_kind_gives_the_same_candidate(lora_run, tmp_path):
    _, _, run_dir = lora_run
    tokentune.export_deployed(str(run_dir), tmp_path / "export")
    model = tokentune.load_trained(str(run_dir))
    tokentune.save_peft(model, tmp_path / "peft")
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    for source in (model, str(run_dir), str(tmp_path / "export"), str(tmp_path / "peft")):
        src = acc.open_source(source, pretrained=False)
        base = acc.deployed_base(src)
        with torch.no_grad():
            outputs.append(acc.build_candidate(src, base, "tome", "flops:1.5")(images))
    # and the candidate is the model create_model builds with the same method and rate
    direct = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=3, tome_r="flops:1.5",
                                    seed=0, **tiny())
    direct.load_state_dict(model.state_dict())
    with torch.no_grad():
        outputs.append(tokentune.deploy(direct)(images))
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs[0], model.eval()(images), atol=1e-3)     # merging changed something


@pytest.mark.parametrize("args, match", [
    (["--target-speedup", "50", "--methods", "tome"], r"no candidate reaches 50x measured speed-up: the closest is tome "
                                                      r"\(flops:"),
    (["--target-gmacs", "1e-9", "--methods", "evit"], r"no candidate reaches at most 1e-09 GMACs per image: the closest "
                                                      r"is evit"),
    (["--target-gmacs", "5"], r"already runs at .* GMACs per image"),
    (["--target-share", "0.7", "--image-folder", "FOUR"], r"has 4 classes but the model's head has 3"),
    (["--target-share", "0.7", "--source", "FILE"], r"tokentune cannot adapt the file"),
    (["--target-share", "0.7", "--source", "runs/none"], r"'runs/none' does not exist"),
    (["--target-share", "0.7", "--source", "resnet18", "--pretrained", "none"], r"ResNet is not a timm VisionTransformer"),
    (["--target-share", "0.7", "--methods", "dyt"], r"'dyt' is not a candidate: it needs training"),
    (["--target-share", "0.7", "--methods", "nope"], r"unknown method 'nope'"),
    (["--target-share", "0.7", "--target-speedup", "2"], r"give one target"),
    (["--target-speedup", "0.9"], r"a speed-up target must be above 1"),
    (["--target-share", "0.7", "--evaluate", "best"], r"unknown evaluate choice 'best': 'gentlest' .* or 'within'"),
    (["--target-share", "0.7", "--finetune-epochs", "1"], r"--finetune-epochs needs --train-data"),
    (["--target-share", "0.7", "--out", "FULL"], r"is not empty and holds no accelerate search"),
])
def test_bad_inputs_fail_in_one_line(lora_run, capsys, args, match):
    tmp, folder, run_dir = lora_run
    four = make_folder(tmp / "four", classes=("a", "b", "c", "d"), per_class=1)
    (tmp / "full").mkdir(exist_ok=True)
    (tmp / "full" / "x.txt").write_text("x")
    (tmp / "weights.bin").write_text("x")
    names = {"FOUR": str(four), "FILE": str(tmp / "weights.bin"), "FULL": str(tmp / "full")}
    args = [names.get(a, a) for a in args]
    source = args[args.index("--source") + 1] if "--source" in args else str(run_dir)
    if "--source" in args:
        del args[args.index("--source"):args.index("--source") + 2]
    if "--image-folder" not in args:
        args += ["--image-folder", str(folder)]
    if "--out" not in args:
        args += ["--out", str(tmp / f"bad{abs(hash(match)) % 10**6}")]
    code, _, err = run(["accelerate", source] + args + FAST, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


def test_targets_and_candidates():
    assert acc.parse_target(1.5) == acc.Target("speedup", 1.5) == acc.parse_target("1.5x")
    assert acc.parse_target("gmacs:8.7") == acc.Target("gmacs", 8.7)
    with pytest.raises(TokenTuneError, match="a FLOPs share target must be in"):
        acc.parse_target("share:1.2")
    spec = {"method": "lora"}
    assert acc.candidate_methods(spec) == [n for n in tokentune.available_methods()
                                           if tokentune.core.method.get_method(n).training_free
                                           and tokentune.core.method.get_method(n).rate_option]
    # a model that reduces tokens keeps its reducer: only its schedule is searched
    assert acc.candidate_methods({"method": "lora+tome"}) == ["tome"]
    with pytest.raises(TokenTuneError, match="has no schedule to search"):
        acc.candidate_methods({"method": "dyt"})
    with pytest.raises(TokenTuneError, match="keeps its own token reduction"):
        acc.candidate_methods({"method": "lora+tome"}, ["evit"])
    assert os.path.basename(acc.STATE_NAME) == "accelerate-state.json"
