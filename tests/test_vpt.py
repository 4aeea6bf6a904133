"""VPT: the reference code's math on identical weights (shallow and deep), prompts are prefix tokens
that no token reducer touches, vpt+pyra and adapter+pyra train and deploy, parameter counts, errors."""
import math

import pytest
import torch
from conftest import tiny

import tokentune
from tokentune import TrainConfig
from tokentune.core.dispatch import dispatch_records
from tokentune.engine.training import train
from tokentune.errors import TokenTuneError
from tokentune.methods.pyra import modulators
from tokentune.methods.tome import schedule_of

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
P = 3                                          # prompt length in these tests


def _model(method="vpt", seed=0, **kw):
    torch.manual_seed(seed)
    if "vpt" in method:
        kw.setdefault("vpt_tokens", P)
    return tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, **tiny(), **kw).eval()


def _prompts(model):
    return [b.prompt.embeddings for b in model.blocks if b.prompt is not None]


def ref_vpt(model, images, shallow, deep):
    """Literal reimplementation of the reference PromptedTransformer (incorporate_prompt,
    forward_deep_prompt) and PromptedVisionTransformer.forward on a timm ViT's weights; the
    blocks are timm's own (the reference's encoder layers), prompts [1, p, D] and [L-1, p, D]."""
    x = model._pos_embed(model.patch_embed(images))                   # self.embeddings(x)
    B = x.shape[0]
    x = torch.cat((x[:, :1, :], shallow.expand(B, -1, -1), x[:, 1:, :]), dim=1)
    num_tokens = shallow.shape[1]
    blocks = [_plain(b) for b in model.blocks]
    for i, layer in enumerate(blocks):
        if i > 0 and deep is not None and i <= deep.shape[0]:
            x = torch.cat((x[:, :1, :], deep[i - 1].expand(B, -1, -1), x[:, (1 + num_tokens):, :]), dim=1)
        x = layer(x)
    x = model.norm(x)
    return model.head(x[:, 0])


def _plain(block):
    """The timm block with the same submodules (the prompt plug-in left out)."""
    prompt, block.prompt = block.prompt, None
    try:
        return block.to_timm_block()
    finally:
        block.prompt = prompt


@pytest.mark.parametrize("deep", [False, True])
def test_equals_reference_math(deep):
    model = _model(vpt_deep=deep)
    prompts = _prompts(model)
    assert len(prompts) == (4 if deep else 1)
    shallow = prompts[0][None]
    deep_stack = torch.stack(prompts[1:]) if deep else None
    with torch.no_grad():
        want = ref_vpt(model, X, shallow, deep_stack)
        got = model(X)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():                       # and the prompts matter
        prompts[-1].add_(torch.randn_like(prompts[-1]))   # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(model(X), got, atol=1e-3)


def test_initialisation_parameters_and_paper_count():
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 48))          # tiny ViT: patch 8, width 48
    deep = _model(vpt_deep=True, vpt_tokens=50)
    values = torch.cat([p.detach().flatten() for p in _prompts(deep)])
    assert values.abs().max() <= bound and values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    counts = tokentune.count_parameters(deep)
    assert counts["paper_trainable"] == 4 * 50 * 48 and counts["per_method"] == {"vpt": 4 * 50 * 48}
    shallow = _model(vpt_tokens=10)
    assert tokentune.count_parameters(shallow)["paper_trainable"] == 10 * 48
    assert {n for n, p in shallow.named_parameters() if p.requires_grad} == {
        "blocks.0.prompt.embeddings", "head.weight", "head.bias"}


def test_prompts_are_prefix_tokens_that_tome_never_merges():
    model = _model("vpt+tome", vpt_deep=True, tome_r=[4, 3, 2, 2])
    assert schedule_of(model) == [4, 3, 2, 2]           # fitted on 17 + 3 tokens with 4 protected
    with pytest.raises(TokenTuneError, match="only"):   # 8 of 20 tokens are mergeable in the first block
        _model("vpt+tome", tome_r=[9, 0, 0, 0])
    with torch.no_grad():
        _, state = model(X, return_state=True, trace_source=True)
    assert state.num_prefix == 1 + P
    source = state.source[:, :1 + P]                    # CLS and prompts stand for themselves only
    assert torch.equal(source, torch.eye(17 + P)[:1 + P].expand(3, -1, -1))


def test_prompts_are_never_dispatched_or_pruned():
    dyt = _model("vpt+dyt", dyt_keep_layers=0)
    with torch.no_grad():
        _, state = dyt(X, return_state=True)
    for record in dispatch_records(state):
        assert record.num_prefix == 1 + P and bool(record.mask[:, :1 + P].all())
    evit = _model("vpt+evit", vpt_deep=True, evit_keep_rate=0.5)
    with torch.no_grad():
        _, state, tokens = evit(X, return_state=True, return_tokens=True)
    assert state.num_prefix == 1 + P
    assert tokens.shape[1] == 1 + P + 4       # 16 patches -> 8+1 -> 5+1 -> 3+1: prefix untouched


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 5
    x[:, 0] += y[:, None, None].float()
    return torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("spec, options", [("vpt+pyra", dict(vpt_deep=True)), ("adapter+pyra", {})])
def test_pyra_with_other_peft_methods_trains_and_deploys(spec, options):
    model = _model(spec, tome_r=[4, 3, 2, 1], **options).train()
    mods = modulators(model)
    assert len(mods) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, _data(), None, TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_epochs=0, num_workers=0), log=None)
    moved = {n.split(".")[2] for n, p in model.named_parameters()
             if n.startswith("blocks.") and n in before and not torch.equal(p, before[n])}
    assert {"merge", "prompt" if "vpt" in spec else "adapter"} <= moved     # PYRA and the PEFT method both learn
    model.eval()
    deployed = tokentune.deploy(model)
    with torch.no_grad():
        assert torch.allclose(deployed(X), model(X), atol=1e-5, rtol=0)
    assert len(modulators(deployed)) == 4


@pytest.mark.parametrize("options, match", [
    (dict(vpt_tokens=0), r"vpt_tokens=0.*at least 1"),
    (dict(vpt_dropout=1.0), r"vpt_dropout=1.0"),
    (dict(vpt_init="zeros"), r"unknown vpt_init"),
])
def test_bad_options_fail_in_one_line(options, match):
    with pytest.raises(TokenTuneError, match=match) as e:
        _model(**options)
    assert "\n" not in str(e.value)
