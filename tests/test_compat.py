"""The flat layout's module paths still import for one release, with a DeprecationWarning."""
import importlib
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
