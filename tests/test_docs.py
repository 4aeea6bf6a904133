"""The documentation site (mkdocs.yml, docs/): every public name has an API entry, every page is in
the navigation, the command-line page renders every command, and the included sections exist.
(``mkdocs build --strict`` itself runs in CI, with the ``docs`` extra.)"""
import importlib.util
import re
from pathlib import Path

import pytest

import tokentune

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("tokentune_docs_hooks", DOCS / "_hooks" / "tokentune_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_an_api_entry():
    api = "\n".join(p.read_text(encoding="utf-8") for p in sorted((DOCS / "api").glob("*.md")))
    entries = set(re.findall(r"^::: tokentune\.(\w+)\s*$", api, flags=re.M))
    assert sorted(set(tokentune.__all__) - entries) == []
    assert sorted(entries - set(tokentune.__all__)) == []          # and nothing private under the top level


def test_every_page_is_in_the_navigation_and_exists():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    assert sorted(pages - nav) == [] and sorted(nav - pages) == []


def test_cli_page_renders_every_command_from_argparse():
    from tokentune.cli import COMMANDS

    text = _hooks().cli_reference()
    for name in COMMANDS:
        assert f"## `tokentune {name}`" in text
    for leaf in ("viz merge", "viz tradeoff", "data prepare-vtab", "search diffrate"):
        assert f"### `tokentune {leaf}`" in text
    assert "--lora-rank" in text and "--diffrate-preset" in text       # options generated from the method configs


@pytest.mark.parametrize("page", sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")))
def test_included_files_and_sections_exist(page):
    hooks = _hooks()
    for name, section in hooks.INCLUDE.findall((DOCS / page).read_text(encoding="utf-8")):
        text = hooks.include(name, section or None)
        assert len(text.splitlines()) > 3 and "](docs/" not in text
