"""The flat layout's module paths still import for one release, with a DeprecationWarning."""
import importlib
import re
import sys

import pytest

import tokentune
from tokentune._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    for target in MOVED[old]:
        new = importlib.import_module(target)
        public = [n for n in getattr(new, "__all__", vars(new)) if not n.startswith("_")]
        assert all(getattr(module, n) is getattr(new, n) for n in public), target


def test_a_moved_module_is_the_new_module_itself():
    """Patching the old path patches the real module (one module object, its own spec)."""
    sys.modules.pop("tokentune.tome", None)
    with pytest.warns(DeprecationWarning):
        import tokentune.tome as old
    import tokentune.methods.tome as new
    assert old is new and new.__spec__.name == "tokentune.methods.tome"


def test_the_public_api_keeps_its_names():
    for name in tokentune.__all__:
        assert getattr(tokentune, name) is not None
    assert callable(tokentune.train) and callable(tokentune.deploy)     # functions, as before
    from tokentune import methods as M  # the registry names are still there
    assert M.create_model is tokentune.create_model and "lora" in M.available_methods()


def test_train_and_deploy_are_functions_and_their_modules_are_named():
    import tokentune.engine.training as module
    assert module.train is tokentune.train
    with pytest.raises(ModuleNotFoundError, match="tokentune.train is a function .*its module is tokentune.engine.training"):
        importlib.import_module("tokentune.train")


def test_methods_of_other_packages_register_through_entry_points(monkeypatch, tmp_path):
    """A plug-in package declares ``[project.entry-points."tokentune.methods"]``; its module registers
    its method on import, which happens the first time the registry is asked."""
    from importlib.metadata import EntryPoint

    from tokentune.core import method as registry

    (tmp_path / "my_plugin.py").write_text(
        "from tokentune.core.method import Method, register_method\n"
        "register_method(Method('plugged', None, lambda model, cfg, ctx: None, order=25, summary='from a plug-in'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name="plugged", value="my_plugin", group=registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)      # imported afresh, forgotten after
    try:
        assert "plugged" in registry.available_methods()
        model = tokentune.create_model("vit_tiny_patch16_224", method="lora+plugged", img_size=32, patch_size=8,
                                       embed_dim=48, depth=1, num_heads=3)
        assert model.tokentune.spec["method"] == "lora+plugged"
    finally:
        registry._REGISTRY.pop("plugged", None)


def test_a_broken_plugin_is_one_line(monkeypatch):
    from importlib.metadata import EntryPoint

    from tokentune.core import method as registry
    from tokentune.errors import TokenTuneError

    eps = [EntryPoint(name="broken", value="no_such_module_anywhere", group=registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: eps)
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    with pytest.raises(TokenTuneError, match="the method plug-in 'broken' .* failed to import: ModuleNotFoundError"):
        registry.get_method("broken")


@pytest.mark.parametrize("old, new", [("tome_schedule", "model.tokentune.state['tome']"),
                                      ("dyt_config", "model.tokentune.state['dyt']"),
                                      ("tokentune_prop_attn", "model.tokentune.prop_attn"),
                                      ("tokentune_trace_source", "model.tokentune.trace_source"),
                                      ("tokentune_export", "model.tokentune.export")])
def test_the_model_attributes_of_0_1_name_their_new_place(old, new):
    from conftest import tiny

    from tokentune.errors import TokenTuneError
    model = tokentune.create_model("vit_tiny_patch16_224", "lora+tome", tome_r=2, num_classes=3, **tiny())
    with pytest.raises(TokenTuneError, match=rf"model\.{old} \(tokentune 0\.1\) is now {re.escape(new)}"):
        getattr(model, old)
    with pytest.raises(TokenTuneError, match="is now"):
        setattr(model, old, 1)
