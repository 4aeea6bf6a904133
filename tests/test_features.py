"""Feature extraction by timm's contract: forward_intermediates and features_only on every method,
training-time and deployed, equal to plain timm where nothing is merged; merged tokens unmerged."""
import pytest
import timm
import torch
from conftest import randomize_lora, tiny

import tokentune
from tokentune.core.features import features_only, unmerge
from tokentune.errors import TokenTuneError

# method, options (identity settings: LoRA B = 0, adapters start at 0, ToMe r = 0, DyT all tokens
# active; PYRA needs merging, its unmerging is tested below)
IDENTITY = {
    "lora": ({}, {}),
    "adapter": ({}, {}),
    "lora+tome": ({"tome_r": 0}, {}),
    "adapter+tome": ({"tome_r": 0}, {}),
    "dyt": ({}, {"dyt_complete": True}),
    "dyt+tome": ({"tome_r": 0}, {"dyt_complete": True}),
}
VARIANTS = {"plain": {}, "registers": dict(reg_tokens=2, no_embed_class=True)}


def _pair(method, variant, **options):
    kw = tiny(**VARIANTS[variant])
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, **kw).eval()
    torch.manual_seed(1)
    ours = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, **options, **kw).eval()
    return ours, ref


def _close(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
        return
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list(IDENTITY))
def test_identity_settings_equal_timm_forward_intermediates(method, variant):
    options, forward = IDENTITY[method]
    ours, ref = _pair(method, variant, **options)
    deployed = tokentune.deploy(ours)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kwargs in (dict(indices=[1, 3], norm=True), dict(indices=2, output_fmt="NLC", return_prefix_tokens=True),
                       dict(indices=None, intermediates_only=True)):
            want = ref.forward_intermediates(x, **kwargs)
            _close(ours.forward_intermediates(x, **kwargs, **forward), want)
            _close(deployed.forward_intermediates(x, **kwargs, **forward), want)
        out = ours.forward_intermediates(x, indices=[0, 3], output_dict=True, return_prefix_tokens=True, **forward)
        want = ref.forward_intermediates(x, indices=[0, 3], output_dict=True, return_prefix_tokens=True)
        assert sorted(out) == sorted(want)
        for key in want:
            _close(out[key], want[key])


@pytest.mark.parametrize("method", ["lora+tome", "pyra", "dyt+tome"])
def test_merged_tokens_are_unmerged_through_the_source_map(method):
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5, tome_r=3, **tiny()).eval()
    randomize_lora(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, levels = model.forward_intermediates(x, indices=[0, 2, 3], output_fmt="NLC", return_prefix_tokens=True)
        # independent path: run the blocks with the source traced, unmerge with a matrix product
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        state = model.initial_state(tokens, trace_source=True)
        want = []
        for i, block in enumerate(model.blocks):
            tokens, state = block(tokens, state)
            if i in (0, 2, 3):
                assert state.source is not None and state.source.shape[1] < state.source.shape[2]
                full = state.source.transpose(1, 2) @ tokens             # each input token: its token's value
                want.append((full[:, 1:], full[:, :1]))
        _close([lv for lv in levels], want)
        assert levels[0][0].shape == (2, 16, 48)
        _close(final, model.forward_features(x))
        grid = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
        assert grid.shape == (2, 48, 4, 4)
        _close(grid.flatten(2).transpose(1, 2), levels[2][0])
        deployed = tokentune.deploy(model)
        _close(deployed.forward_intermediates(x, indices=[3], intermediates_only=True)[0], grid)


def test_unmerge_gives_every_patch_its_token_and_gradients_flow():
    x = torch.arange(6.0).view(1, 3, 2).requires_grad_()
    source = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]])     # token 1 stands for inputs 1 and 3
    out = unmerge(x, source)
    assert out.tolist() == [[[0, 1], [2, 3], [4, 5], [2, 3]]]
    out.sum().backward()
    assert x.grad.tolist() == [[[1, 1], [2, 2], [1, 1]]]
    assert unmerge(x, None) is x


def test_dyt_keeps_every_token_and_skip_equals_mask_path():
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="dyt", num_classes=5, **tiny())
    tokentune.methods.dyt.calibrate_activation(model, torch.randn(4, 3, 32, 32), 0.5)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        skip = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        mask = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True, dyt_execution="mask")
    assert skip[0].shape == (2, 48, 4, 4)
    _close(skip, mask)


def test_features_only_equals_timm_features_only():
    kw = tiny()
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, features_only=True, out_indices=[1, 3], **kw).eval()
    torch.manual_seed(1)
    ours = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=5, features_only=True,
                                  out_indices=[1, 3], **kw).eval()
    torch.manual_seed(1)
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora+tome", num_classes=5, tome_r=0, **kw).eval()
    extractor = features_only(model, out_indices=[1, 3])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        _close(ours(x), want)
        _close(extractor(x), want)
    assert [f["num_chs"] for f in extractor.feature_info.get_dicts()] == [48, 48]
    assert len(model.blocks) == 4                           # not pruned: the model stays usable


def test_bad_output_format_is_one_line():
    model = tokentune.create_model("vit_tiny_patch16_224", method="lora", num_classes=5, **tiny())
    with pytest.raises(TokenTuneError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


def test_prompts_are_prefix_tokens_of_the_features():
    """VPT's prompts sit after CLS; the patch grid and the prefix split must count them."""
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method="vpt", vpt_tokens=3, vpt_deep=True,
                                   num_classes=5, **tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        levels = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", return_prefix_tokens=True,
                                             intermediates_only=True)
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        state = model.initial_state(tokens)
        want = []
        for i, block in enumerate(model.blocks):
            tokens, state = block(tokens, state)
            if i in (1, 3):
                assert tokens.shape[1] == 1 + 3 + 16
                want.append((tokens[:, 4:], tokens[:, :4]))
    _close(levels, want)
    assert model(x).shape == (2, 5)


@pytest.mark.parametrize("method", ["lora+evit", "lora+dynamicvit"])
def test_pruned_patches_have_zero_features_and_kept_ones_their_token(method):
    torch.manual_seed(0)
    model = tokentune.create_model("vit_tiny_patch16_224", method=method, num_classes=5,
                                   **tiny(depth=12, img_size=64)).eval()
    randomize_lora(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid = model.forward_intermediates(x, indices=[11], output_fmt="NLC", intermediates_only=True)[0]
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        state = model.initial_state(tokens, trace_source=True)
        for block in model.blocks:
            tokens, state = block(tokens, state)
    n = grid.shape[1]
    assert n == model.patch_embed.num_patches and tokens.shape[1] < n and grid.shape[-1] == model.embed_dim
    want = (state.source.transpose(1, 2) @ tokens)[:, 1:]     # a fused token (EViT) stands for all its sources
    if method == "lora+dynamicvit":
        assert bool((grid.abs().sum(-1) == 0).any())           # dropped patches: zeros
    _close(grid, want)
