"""benchmarks/field_speed.py: the matched-FLOPs points and the form each method's rate option gets."""
import importlib.util
import os
import sys

import pytest

from tokentune.core.method import available_methods, get_method
from tokentune.methods.tome import ViTDims, named_schedule, vit_flops
from tokentune.methods.tome.schedules import PROFILES, schedule_for_flops

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def field_speed():
    spec = importlib.util.spec_from_file_location("field_speed", os.path.join(ROOT, "benchmarks", "field_speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["field_speed"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("field_speed", None)


def test_default_points_are_tome_low_and_high(field_speed):
    low, high = field_speed.default_targets("vit_base_patch16_224")
    dims = ViTDims.from_name("vit_base_patch16_224")
    assert schedule_for_flops(dims, float(low.split(":")[1])) == named_schedule("vit_base_patch16_224", "low", 12)
    ratio = vit_flops(dims) / vit_flops(dims, named_schedule("vit_base_patch16_224", "high", 12))
    assert high.endswith(":geometric") and abs(float(high.split(":")[1]) - ratio) < 1e-3


def test_each_method_gets_a_target_form_its_rate_takes(field_speed):
    assert get_method("tome").rate_profiles == PROFILES
    for name in ("pitome", "tofu", "dtem"):
        assert get_method(name).rate_profiles == PROFILES
    assert field_speed.method_target("evit", "flops:3.462:geometric") == "flops:3.462"     # one keep rate: no profile
    assert field_speed.method_target("mctf", "flops:3.462:geometric") == "flops:3.462:geometric"   # one fraction
    assert field_speed.method_target("mctf", "tokens:11:decreasing") == "tokens:11"
    for name in available_methods():
        assert field_speed.method_target(name, "flops:2.001") == "flops:2.001"
        assert set(get_method(name).rate_profiles) <= set(PROFILES)
        assert not get_method(name).rate_profiles or get_method(name).rate_option


def test_methods_option_keeps_tome_and_the_named_ones(field_speed):
    rows = field_speed.candidates(["flops:2.001"], [], "tofu")
    assert [c.label for c, _ in rows] == ["dense", "tome @ flops:2.001", "tofu @ flops:2.001"]
    assert len(field_speed.candidates(["flops:2.001"], [])) > 3          # default: every rate method
    with pytest.raises(SystemExit, match="lora"):
        field_speed.rate_methods("lora")
