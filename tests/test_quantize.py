"""int8 deployment: deploy(quantize="int8-dynamic") for every method, close to the fp32 deployed model."""
import pytest
import torch
from test_export import CASE_IDS, _trained
from torch import nn

import tokentune
from tokentune.errors import TokenTuneError


def _linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("spec", CASE_IDS)
def test_int8_dynamic_deploy_is_close_to_fp32(spec):
    model = _trained(spec)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fp32 = tokentune.deploy(model)
    int8 = tokentune.deploy(model, quantize="int8-dynamic")
    assert _linears(fp32) and not _linears(int8)            # every Linear layer runs in int8
    with torch.no_grad():
        want, got = fp32(x), int8(x)
    rel = float((got - want).norm() / want.norm())
    # int8 weights (per channel) and inputs (per batch) move the logits of these width-48 random models by
    # 2-8%, up to 17% where a merge decision flips on a quantized metric (DTEM's learned embedding); a
    # wrong scale or zero point moves them by ~100%, a layer left in fp32 is caught above
    assert 0.0 < rel < 0.25, rel


def test_int8_refuses_what_it_cannot_run():
    model = _trained("lora+tome")
    with pytest.raises(TokenTuneError, match="int8-dynamic"):
        tokentune.deploy(model, quantize="int4")
    with pytest.raises(TokenTuneError, match="CPU fp32"):
        tokentune.deploy(model.to(torch.bfloat16), quantize="int8-dynamic")
