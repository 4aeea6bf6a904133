"""Deployment fast path: every deployed method under bf16/fp16 autocast and in bf16 weights, static
shapes (meta-device forward, no graph breaks), and deploy(compile='auto') choosing what wins."""
import copy
import logging

import pytest
import torch
from conftest import randomize_dyt, randomize_lora, tiny
from torch._dynamo.utils import counters

import tokentune
from tokentune.core import deploy as deploy_mod
from tokentune.methods import dyt
from tokentune.timing import TimingStats

# every method and combination, deployed with static shapes (DyT: its capacity execution)
SPECS = {
    "lora": ("lora", {}),
    "adapter": ("adapter", {}),
    "lora+tome": ("lora+tome", dict(tome_r=[3, 2, 2, 1])),
    "adapter+tome": ("adapter+tome", dict(tome_r=2)),
    "full+tome": ("full+tome", dict(tome_r=2)),
    "pyra": ("pyra", dict(tome_r=[3, 2, 2, 1])),
    "dyt": ("dyt", {}),
    "dyt-attn_mlp": ("dyt", dict(dyt_variant="attn_mlp")),
    "dyt-layer": ("dyt", dict(dyt_variant="layer")),
    "dyt+tome": ("dyt+tome", dict(tome_r=2)),
    "lora+dyt": ("lora+dyt", {}),
    # token reducers and prompts: their token counts are fixed by the configuration
    "evit": ("evit", {}),
    "evit+pyra": ("evit+pyra", {}),
    "dynamicvit": ("dynamicvit", {}),                      # deployed: the kept tokens are gathered
    "diffrate": ("diffrate", dict(diffrate_prune_kept=[17, 15, 11, 8], diffrate_merge_kept=[17, 13, 9, 5])),
    "vpt": ("vpt", {}),
    "vpt-deep": ("vpt", dict(vpt_deep=True)),
    "vpt+pyra": ("vpt+pyra", dict(tome_r=[3, 2, 2, 1])),
}
# the token-reduction baselines and prompt tuning (docs/baselines.md, "Export and compile")
BASELINES = {
    "lora+evit": ("lora+evit", {}),
    "lora+dynamicvit": ("lora+dynamicvit", {}),
    "lora+diffrate": ("lora+diffrate", dict(diffrate_prune_kept=[17, 15, 11, 8], diffrate_merge_kept=[17, 13, 9, 5])),
    "vpt-deep": ("vpt", dict(vpt_deep=True)),
    "vpt+pyra": ("vpt+pyra", dict(tome_r=2)),
    "evit+pyra": ("evit+pyra", {}),
    "lora+mctf": ("lora+mctf", dict(mctf_r=2)),
    "lora+pitome": ("lora+pitome", dict(pitome_r=[3, 2, 2, 1])),
    "lora+tofu": ("lora+tofu", dict(tofu_r=[3, 2, 2, 1])),
}
SPECS.update(BASELINES)
# methods that keep or drop tokens by a hard top-k of scores: in bf16 (8 significant bits) two
# close scores may swap, which changes which tokens go on, so bf16 only gets a bound that catches
# broken arithmetic (wrong dtype, lost sizes, NaN), not a swapped choice; fp16 checks them tightly
SELECTS = {"evit", "evit+pyra", "dynamicvit", "diffrate", "lora+evit", "lora+dynamicvit", "lora+diffrate", "lora+mctf"}


def _deployed(case, x):
    spec, options = SPECS[case]
    model = tokentune.create_model("vit_tiny_patch16_224", method=spec, num_classes=5, **options, **tiny()).eval()
    randomize_lora(model)
    with torch.no_grad():                       # adapters and PYRA modulators do real work
        for name, p in model.named_parameters():
            if p.requires_grad and ("adapter" in name or "modulator" in name) and "norm" not in name:
                p.normal_(0, 0.1)
    if case in SELECTS:                         # well-separated scores, so fp16 makes fp32's choices
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("attn.qkv.weight"):
                    p.mul_(4)                   # peaked CLS attention (EViT, DiffRate)
                elif ".predictor." in name and p.dim() > 1:
                    p.normal_(0, 1.0)           # spread keep scores (DynamicViT)
    if "dyt" in spec:
        randomize_dyt(model)
        dyt.calibrate_activation(model, x, 0.5)
        return tokentune.deploy(model, dyt_execution="capacity", dyt_capacity=1.0)
    return tokentune.deploy(model)


@pytest.mark.parametrize("case", list(SPECS))
def test_low_precision_and_static_shapes(case):
    """bf16 and fp16 autocast and bf16 weights run every deployed method (a GPU run uses the same code)
    and stay close to fp32; a forward on meta tensors never reads a value on the host (no sync, no
    data-dependent shape: what CUDA graphs and compiled graphs need)."""
    x = torch.randn(3, 3, 32, 32)
    deployed = _deployed(case, x)
    with torch.no_grad():
        want = deployed(x)
        scale = want.abs().max()
        bf16_tol = 0.5 if case in SELECTS else 0.06
        for dtype, tol in ((torch.bfloat16, bf16_tol), (torch.float16, 0.01)):
            with torch.autocast("cpu", dtype=dtype):
                got = deployed(x)
            assert got.dtype == dtype and torch.isfinite(got).all()
            assert (got.float() - want).abs().max() <= tol * scale, (case, dtype)
        # bf16 weights round keys too: a ToMe pair or a DyT decision may flip, so only a loose bound
        bf16 = copy.deepcopy(deployed).to(torch.bfloat16)
        got = bf16(x.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= max(bf16_tol, 0.15) * scale
        meta = copy.deepcopy(deployed).to("meta")
        assert meta(x.to("meta")).shape == want.shape


@pytest.mark.parametrize("case", ["pyra", "dyt+tome", "evit+pyra", "dynamicvit", "diffrate", "vpt+pyra", "lora+mctf",
                                  "lora+pitome", "lora+tofu"])
def test_no_graph_breaks(case):
    x = torch.randn(2, 3, 32, 32)
    deployed = _deployed(case, x)
    with torch.no_grad():
        explained = torch._dynamo.explain(deployed)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BASELINES))
def test_baselines_compile_to_one_graph_that_new_images_reuse(case):
    """Token counts fixed by keep rates / rates: Dynamo traces the deployed model into one graph
    (fullgraph, no break) that equals eager and serves new images of the same batch without a recompile."""
    deployed = _deployed(case, torch.randn(2, 3, 32, 32))
    torch._dynamo.reset()
    compiled = torch.compile(deployed, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(2, 3, 32, 32, generator=g)
            assert torch.allclose(compiled(x), deployed(x), atol=1e-5, rtol=0)
            if i == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs


# ----------------------------------------------------------------------------- deploy(compile="auto")
def _fake_timing(eager, compiled):
    def measure(models, images, **kw):
        assert set(models) == {"eager", "compiled"} and images.shape == (4, 3, 32, 32)
        return {"eager": TimingStats(eager, eager, eager, 1, 4, 4 / eager),
                "compiled": TimingStats(compiled, compiled, compiled, 1, 4, 4 / compiled)}
    return measure


def test_compile_auto_keeps_the_faster(monkeypatch, caplog):
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", tome_r=2, **tiny())
    example = torch.randn(4, 3, 32, 32)
    caplog.set_level(logging.INFO, logger="tokentune")
    monkeypatch.setattr(deploy_mod, "measure_throughput", _fake_timing(100.0, 150.0))
    fast = tokentune.deploy(model, compile="auto", example=example)
    assert hasattr(fast, "_orig_mod") and "using the compiled model" in caplog.text
    monkeypatch.setattr(deploy_mod, "measure_throughput", _fake_timing(100.0, 90.0))
    slow = tokentune.deploy(model, compile="auto", example=example)
    assert not hasattr(slow, "_orig_mod") and "using the eager model" in caplog.text

    def broken(*args, **kwargs):
        raise RuntimeError("Compiler: cc not found")
    monkeypatch.setattr(deploy_mod, "measure_throughput", broken)
    fallback = tokentune.deploy(model, compile="auto", example=example)
    assert not hasattr(fallback, "_orig_mod") and "compiling failed (Compiler: cc not found)" in caplog.text
    with torch.no_grad():
        assert torch.allclose(fallback(example), tokentune.deploy(model)(example), atol=1e-6)
    with pytest.raises(tokentune.TokenTuneError, match="choose False, True or 'auto'"):
        tokentune.deploy(model, compile="fast")


@pytest.mark.slow
def test_compile_auto_really_compiles():
    torch._dynamo.reset()
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", tome_r=2, **tiny())
    x = torch.randn(2, 3, 32, 32)
    chosen = tokentune.deploy(model, compile="auto", example=x)
    with torch.no_grad():
        assert torch.allclose(chosen(x), tokentune.deploy(model)(x), atol=1e-5)
