"""``tokentune accelerate``'s search cost: the base's warm-up only in a session's first trial, a
noisy timing that does not steer the next FLOPs target, and the evaluation batch's default."""
import pytest
import torch
from test_accelerate import _trained
from test_data import make_folder

import tokentune
from tokentune import timing
from tokentune.core.flops import count_flops
from tokentune.engine.data import image_folder_dataset
from tokentune.tools import accelerate as acc


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("search") / "shapes", classes=("a", "b", "c"), per_class=4)


def _scripted_timer(script, seen):
    """The i-th timing measures ``script[i] = (efficiency, spread)``: a speed-up of efficiency times
    the FLOPs ratio, its rounds ``spread`` apart (high / low); ``seen`` gets each call's base_warm."""
    def timer(base, candidate, images, cfg, seed, base_warm=False):
        efficiency, spread = script[min(len(seen), len(script) - 1)]
        seen.append(base_warm)
        speedup = efficiency * count_flops(base, images[:1]) / count_flops(candidate, images[:1])
        return {"speedup": speedup, "speedup_low": speedup / spread ** 0.5, "speedup_high": speedup * spread ** 0.5,
                "img_s": 100.0 * speedup, "base_img_s": 100.0}
    return timer


def _search(folder, monkeypatch, script, out=None, methods=("tome", "pitome")):
    seen = []
    monkeypatch.setattr(acc, "time_side_by_side", _scripted_timer(script, seen))
    result = tokentune.accelerate(_trained(), image_folder_dataset(str(folder), "test"), 1.3, out, methods=list(methods),
                                  batch_size=4, max_trials=4, progress=False, log=None)
    return result, seen


def test_warm_models_skip_the_warm_up():
    calls = {"a": 0, "b": 0}

    class Counted(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, images):
            calls[self.name] += 1
            return images

    timing.measure_throughput({"a": Counted("a"), "b": Counted("b")}, batch_size=2, image_size=8, rounds=3, warmup=2,
                              warm=("a",))
    assert calls == {"a": 3, "b": 2 + 3}


def test_only_a_sessions_first_trial_warms_the_base_up(folder, monkeypatch, tmp_path):
    result, seen = _search(folder, monkeypatch, [(1.0, 1.05)], tmp_path / "out", methods=("tome", "pitome", "evit"))
    trials = sum(len(r["trials"]) for r in result.record["search"].values())
    assert trials >= 3 and seen == [False] + [True] * (trials - 1)
    assert result.record["time"]["counts"]["timing"] == trials
    # a resumed session times its first new trial with the base's warm-up again
    state = acc.json.loads((tmp_path / "out" / acc.STATE_NAME).read_text())
    del state["trials"][sorted(state["trials"])[-1]]
    (tmp_path / "out" / acc.STATE_NAME).write_text(acc.json.dumps(state))
    _, seen = _search(folder, monkeypatch, [(1.0, 1.05)], tmp_path / "out", methods=("tome", "pitome", "evit"))
    assert seen == [False]


def test_a_noisy_timing_does_not_steer_the_next_schedule(folder, monkeypatch):
    """The first method meets 1.3x with its first timing (efficiency 1.0). The second's first timing
    measures 0.8 of the FLOPs ratio with rounds 30% apart: steering by it alone would aim at
    1.3 / 0.8 = 1.63, far past the target (and, the next timing measuring 1.0 again, a third and a
    fourth timing to come back); the next target comes from the others' efficiency (the same
    schedule, so the next one up), and the second timing ends it."""
    result, _ = _search(folder, monkeypatch, [(1.0, 1.05), (0.8, 1.3), (1.0, 1.05)])
    first, second = (r["trials"] for r in result.record["search"].values())
    assert len(first) == 1 and len(second) == 2
    noisy, then = second
    assert noisy["speedup"] < 1.3 <= then["speedup"] <= 1.3 * 1.05 and then["flops_ratio"] < 1.3 * 1.1
    assert list(result.record["search"].values())[1]["chosen"]["rate"] == then["rate"]


def test_a_method_slower_round_after_round_is_followed(folder, monkeypatch):
    """The same low efficiency with narrow rounds is the method's own, not noise: the next FLOPs
    target follows it (1.3 / 0.8)."""
    result, _ = _search(folder, monkeypatch, [(1.0, 1.05), (0.8, 1.05), (0.8, 1.05)])
    second = list(result.record["search"].values())[1]["trials"]
    assert second[1]["rate"] == f"flops:{second[0]['flops_ratio'] * 1.3 / second[0]['speedup']:.4f}"
    assert second[1]["speedup"] >= 1.3


def _row(efficiency, spread, ratio=1.5):
    speedup = efficiency * ratio
    return {"flops_ratio": ratio, "speedup": speedup, "speedup_low": speedup / spread ** 0.5,
            "speedup_high": speedup * spread ** 0.5}


def test_noisy_needs_both_an_outlying_efficiency_and_disagreeing_rounds():
    assert acc.noisy(_row(0.8, 1.3), 1.0) and acc.noisy(_row(1.25, 1.3), 1.0)
    assert not acc.noisy(_row(0.8, 1.05), 1.0)                 # narrow rounds: the method's own efficiency
    assert not acc.noisy(_row(0.9, 1.3), 1.0)                  # within 15% of the others
    assert not acc.noisy(_row(0.8, 1.3), None) and not acc.noisy({"error": "x"}, 1.0)
    # estimate: the noisy trial is left out, against the method's other trials and the prior
    rows = [_row(1.0, 1.05), _row(0.7, 1.4), _row(1.1, 1.05)]
    assert acc.estimate(rows) == pytest.approx((1.0 * 1.1) ** 0.5)
    assert acc.estimate(rows[1:2], prior=1.05) == pytest.approx(1.05)      # only a noisy one: the prior
    assert acc.estimate(rows[1:2]) == pytest.approx(0.7)                   # nothing to judge it against
    assert acc.estimate([_row(0.8, 1.05)], prior=1.05) == pytest.approx(0.8)
    assert acc.estimate([]) is None


def test_the_evaluation_batch_defaults_to_32_on_the_cpu(monkeypatch):
    assert acc.AccelerateConfig().eval_batch_size == acc.CPU_EVAL_BATCH == 32
    assert acc.AccelerateConfig(device="cuda").eval_batch_size == acc.EVAL_BATCH == 256
    assert acc.AccelerateConfig(eval_batch_size=8).eval_batch_size == 8
    with pytest.raises(tokentune.TokenTuneError, match="eval_batch_size must be at least 1"):
        acc.AccelerateConfig(eval_batch_size=0)
    seen = []
    monkeypatch.setattr(acc, "evaluate", lambda *a, **k: seen.append(k["batch_size"]) or {"top1": 1.0})
    acc.accuracy(None, acc.Validation([], None, None, "x", 0), acc.AccelerateConfig(), "x")
    assert seen == [32]
