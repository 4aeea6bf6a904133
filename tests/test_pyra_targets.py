"""PYRA's opt-in modulation of the merge targets M_t: exact PYRA at init, the formula, the merge of a
target shared by several sources, counts and FLOPs, errors. (PYRA on EViT's fused token: test_evit.py.)"""
import pytest
import torch
from conftest import randomize_lora, tiny

import tokentune
from tokentune.errors import TokenTuneError
from tokentune.methods.pyra import PYRAConfig, PYRAModulator, modulators, parameter_report
from tokentune.methods.tome.matching import bipartite_soft_matching, merge_weighted

SCHEDULE = [5, 3, 2, 1]


def _pyra(**kw):
    torch.manual_seed(0)
    return tokentune.create_model("vit_tiny_patch16_224", method="pyra", num_classes=5, tome_r=SCHEDULE, **tiny(), **kw)


def test_init_is_exactly_pyra():
    plain, targets = _pyra().eval(), _pyra(pyra_modulate_targets=True).eval()
    randomize_lora(plain)
    with torch.no_grad():
        for mod in modulators(plain).values():
            mod.W_D.normal_(0, 0.5)                      # PYRA itself active, its targets' part still zero
    missing, unexpected = targets.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted({k.rsplit(".", 1)[1] for k in missing}) == ["W_D_t", "W_r_t"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), targets(x))


def test_modulator_formula():
    torch.manual_seed(1)
    mod = PYRAModulator(3, 4, PYRAConfig(modulate_targets=True))
    with torch.no_grad():
        for p in (mod.W_D, mod.W_D_t, mod.W_r_t):
            p.normal_(0, 1.0)
    src, dst = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    info = torch.nn.functional.layer_norm(src + dst, (4,), mod.norm.weight, mod.norm.bias, 1e-5)
    want = src.clone()
    for b in range(2):
        for i in range(3):
            for c in range(4):
                d_D = sum(mod.W_r[j, 0] * info[b, j, c] for j in range(3))
                d_r = sum(info[b, i, k] * mod.W_D[0, k] for k in range(4))
                t_D = sum(mod.W_r_t[j, 0] * info[b, j, c] for j in range(3))
                t_r = sum(info[b, i, k] * mod.W_D_t[0, k] for k in range(4))
                want[b, i, c] += (2 * torch.sigmoid(d_r) - 1) * 2 * torch.sigmoid(d_D) * src[b, i, c]
                want[b, i, c] += (2 * torch.sigmoid(t_r) - 1) * 2 * torch.sigmoid(t_D) * dst[b, i, c]
    with torch.no_grad():
        assert torch.allclose(mod(src, dst), want, atol=1e-6)


def test_a_target_shared_by_two_sources_gets_both_modulations():
    torch.manual_seed(2)
    mod = PYRAModulator(2, 3, PYRAConfig(modulate_targets=True))
    with torch.no_grad():
        for p in (mod.W_D, mod.W_D_t):
            p.normal_(0, 1.0)
    # tokens 0 (CLS), 1..5: sources 2 and 4 (set A) both match token 3 (set B)
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 1], [0, 0.2, 1], [1, 1, 0]]])
    x, size = torch.randn(1, 6, 3), torch.tensor([[[1.0], [2], [3], [1], [2], [1]]])
    m = bipartite_soft_matching(metric, 2, num_prefix=1)
    assert sorted(m.src.tolist()) == [2, 4] and m.dst.tolist() == [3, 3]
    with torch.no_grad():
        got, got_size = merge_weighted(x, size, m, mod)
        src, dst = x[0, m.src] * size[0, m.src], (x[0, 3] * size[0, 3]).expand(2, 3)   # rows in ToMe's order
        contributions = mod(src[None], dst[None])[0]                 # each: modulated source + its target term
    s_new = size[0, 3] + size[0, 2] + size[0, 4]
    want = (x[0, 3] * size[0, 3] + contributions.sum(0)) / s_new
    row = int(m.dst_out[0])
    assert torch.allclose(got[0, row], want, atol=1e-6) and got_size[0, row, 0] == s_new


def test_counts_flops_and_errors():
    model = _pyra(pyra_modulate_targets=True)
    report = parameter_report(model)
    assert report["generator"] == 2 * sum(r + 48 for r in SCHEDULE)
    assert report["flops"] == 8 * sum(SCHEDULE) * 48
    with pytest.raises(TokenTuneError, match="'pyra' variant only") as e:
        _pyra(pyra_modulate_targets=True, pyra_variant="wd")
    assert "\n" not in str(e.value)
