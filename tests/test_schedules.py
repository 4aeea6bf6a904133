"""Merge schedules from targets: token counts, analytic FLOPs, measured speed-ups."""
import pytest
import torch
from conftest import tiny
from torch.utils.flop_counter import FlopCounterMode

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.pyra import modulator_flops as pyra_modulator_flops
from tokentune.methods.tome import (
    NAMED_SCHEDULES,
    PROFILES,
    ViTDims,
    fit_schedule,
    flops_ratio,
    min_final_tokens,
    parse_target,
    schedule_for_flops,
    schedule_for_speedup,
    schedule_for_tokens,
    schedule_of,
    token_counts,
    vit_flops,
)

MODEL = "vit_tiny_patch16_224"


# ----------------------------------------------------------------------------- token targets
def test_constant_profile_reproduces_reference_low_schedules():
    assert schedule_for_tokens(197, 12, 11) == NAMED_SCHEDULES["vit_base_patch16_224"]["low"]
    assert schedule_for_tokens(197, 24, 7) == NAMED_SCHEDULES["vit_large_patch16_224"]["low"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("num_tokens,depth,num_prefix", [(197, 12, 1), (198, 12, 2), (577, 24, 1), (65, 6, 5)])
def test_every_target_is_met_exactly_and_fits(profile, num_tokens, depth, num_prefix):
    lowest = min_final_tokens(num_tokens, depth, num_prefix)
    for final in sorted({lowest, lowest + 1, (lowest + num_tokens) // 3, num_tokens - 1, num_tokens}):
        s = schedule_for_tokens(num_tokens, depth, final, num_prefix, profile)
        assert len(s) == depth and min(s) >= 0
        assert token_counts(s, num_tokens)[-1] == final
        assert fit_schedule(s, num_tokens, num_prefix, strict=True) == s     # never a capped entry


def test_profiles_have_their_shapes():
    dec = schedule_for_tokens(197, 12, 30, profile="decreasing")
    assert dec == sorted(dec, reverse=True) and dec[-1] == 0
    geo = schedule_for_tokens(197, 12, 5, profile="geometric")
    counts = token_counts(geo, 197)
    fractions = [r / (n - 1) for r, n in zip(geo[:8], counts)]
    assert max(fractions) - min(fractions) < 0.05          # the same share of mergeable tokens per block


def test_unreachable_token_targets_are_clear():
    assert min_final_tokens(197, 12, 1) == 2 and min_final_tokens(198, 12, 2) == 3
    with pytest.raises(TokenTuneError, match="fewest reachable is 2"):
        schedule_for_tokens(197, 12, 1)
    with pytest.raises(TokenTuneError, match="only 197 enter"):
        schedule_for_tokens(197, 12, 198)
    with pytest.raises(TokenTuneError, match="unknown schedule profile"):
        schedule_for_tokens(197, 12, 50, profile="linear")


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("method,schedule", [("lora", []), ("lora+tome", [5, 3, 2, 1]), ("pyra", [6, 0, 3, 1])])
def test_analytic_flops_equal_torch_flop_counter(method, schedule):
    extra = dict(tome_r=schedule) if "tome" in method or method == "pyra" else {}
    model = tokentune.create_model(MODEL, method=method, num_classes=10, **extra,
                                   **tiny(reg_tokens=2, no_embed_class=True))
    deployed = tokentune.deploy(model)
    for block in deployed.blocks:
        block.attn.fused_attn = False       # explicit matmuls: what the flop counter sees on every torch
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        deployed(torch.randn(2, 3, 32, 32))
    dims = ViTDims.from_model(deployed)
    mod = pyra_modulator_flops(dims.dim) if method == "pyra" else None
    assert counter.get_total_flops() == 2 * vit_flops(dims, schedule, mod)


def test_vit_b_flops_and_reference_schedule_ratios():
    dims = ViTDims.from_name("vit_base_patch16_224")
    assert (dims.num_tokens, dims.num_prefix, dims.depth, dims.dim) == (197, 1, 12, 768)
    assert vit_flops(dims) == pytest.approx(35.13e9, rel=1e-3)          # 17.56 GMACs
    assert flops_ratio(dims, NAMED_SCHEDULES["vit_base_patch16_224"]["low"]) == pytest.approx(2.0016, abs=1e-3)
    assert flops_ratio(dims, NAMED_SCHEDULES["vit_base_patch16_224"]["high"]) == pytest.approx(3.4619, abs=1e-3)
    mod = pyra_modulator_flops(768)
    high = NAMED_SCHEDULES["vit_base_patch16_224"]["high"]
    assert vit_flops(dims, high, mod) - vit_flops(dims, high) == 4 * 768 * sum(high)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("ratio", [1.3, 2.0, 3.2])
def test_flops_target_is_reached_as_gently_as_possible(profile, ratio):
    dims = ViTDims.from_name("vit_base_patch16_224")
    s = schedule_for_flops(dims, ratio, profile)
    assert fit_schedule(s, 197, 1, strict=True) == s
    got = flops_ratio(dims, s)
    assert got >= ratio
    last = max(i for i, r in enumerate(s) if r > 0)
    gentler = s[:last] + [s[last] - 1] + s[last + 1:]
    assert flops_ratio(dims, gentler) < ratio           # one merge fewer misses the target
    assert got < ratio * 1.01


def test_unreachable_flops_target_is_clear():
    dims = ViTDims.from_name("vit_base_patch16_224")
    with pytest.raises(TokenTuneError, match="out of reach.*most aggressive constant schedule gives"):
        schedule_for_flops(dims, 50.0)
    with pytest.raises(TokenTuneError, match=">= 1"):
        schedule_for_flops(dims, 0.5)


# ----------------------------------------------------------------------------- tome_r strings
def test_target_strings_as_tome_r():
    model = tokentune.create_model(MODEL, method="pyra", tome_r="tokens:6", **tiny())
    assert token_counts(schedule_of(model), 17)[-1] == 6
    assert schedule_of(model) == schedule_for_tokens(17, 4, 6)
    geo = tokentune.create_model(MODEL, method="lora+tome", tome_r="flops:1.5:geometric", **tiny())
    assert flops_ratio(ViTDims.from_model(geo), schedule_of(geo)) >= 1.5
    assert parse_target("flops:2.5") == ("flops", 2.5, "constant") and parse_target("low") is None
    with pytest.raises(TokenTuneError, match="fewest reachable"):
        tokentune.create_model(MODEL, method="pyra", tome_r="tokens:1", **tiny())
    with pytest.raises(TokenTuneError, match="unknown schedule profile"):
        tokentune.create_model(MODEL, method="pyra", tome_r="tokens:6:steep", **tiny())
    with pytest.raises(TokenTuneError, match="whole number"):
        tokentune.create_model(MODEL, method="pyra", tome_r="tokens:6.5", **tiny())


# ----------------------------------------------------------------------------- measured speed-up
def _flops_timer(overhead=0.2):
    """A deterministic stand-in for the clock: time = fixed overhead + analytic FLOPs."""
    def timer(model, images):
        dims = ViTDims.from_model(model)
        schedule = [b.merge.r if b.merge is not None else 0 for b in model.blocks]
        return overhead * vit_flops(dims) + vit_flops(dims, schedule)
    return timer


def test_speedup_search_corrects_for_measured_efficiency():
    model = tokentune.create_model(MODEL, method="lora", **tiny(img_size=64))       # 65 tokens
    result = schedule_for_speedup(model, 1.5, timer=_flops_timer(), pyra=False)
    assert result.reached and result.speedup >= 1.5
    assert result.trials[0].speedup < 1.5 <= result.trials[0].flops_ratio   # overhead: FLOPs over-promise
    dims = ViTDims.from_model(model)
    assert flops_ratio(dims, result.schedule) > 1.5 * 1.05                # so more merging was chosen
    assert result.schedule in [t.schedule for t in result.trials]
    assert "measured speed-up" in result.table()


def test_speedup_search_reports_unreachable_target():
    model = tokentune.create_model(MODEL, method="lora", **tiny(img_size=64))
    result = schedule_for_speedup(model, 20.0, timer=_flops_timer(), pyra=False)
    assert not result.reached and result.speedup < 20.0
    assert result.speedup == max(t.speedup for t in result.trials)


def test_speedup_search_times_for_real():
    model = tokentune.create_model(MODEL, method="lora", **tiny(img_size=64))
    result = schedule_for_speedup(model, 1.2, batch_size=2, runs=1, warmup=0, max_trials=2)
    assert 1 <= len(result.trials) <= 2 and result.speedup > 0
    assert result.device == "cpu" and result.batch_size == 2
    # the user's model is untouched
    assert all(b.merge is None for b in model.blocks)
    assert any(isinstance(m, tokentune.LoRALinear) for m in model.modules())
