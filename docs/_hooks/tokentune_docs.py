"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks``).

* ``<!-- tokentune-cli-reference -->`` becomes the ``--help`` of ``tokentune`` and of every
  subcommand (and sub-subcommand: ``viz merge``, ``data prepare-vtab``, ...), rendered from the
  argparse definitions at build time, so the page cannot go stale.
* ``<!-- include FILE -->`` includes a file of the repository root (BENCHMARKS.md, CONTRIBUTING.md),
  its links to root files and to ``docs/`` turned into links to the site's pages;
  ``<!-- include FILE section="## EViT" -->`` only the section under the heading that starts so
  (the method pages take their details from docs/baselines.md: one text, no copy to go stale).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tokentune.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLI_MARKER = "<!-- tokentune-cli-reference -->"
INCLUDE = re.compile(r'<!-- include ([\w./-]+)(?: section="([^"]+)")? -->')
ROOT_PAGES = {"BENCHMARKS.md": "benchmarks.md", "CONTRIBUTING.md": "contributing.md", "README.md": "index.md"}


def _children(parser: argparse.ArgumentParser) -> List[Tuple[str, argparse.ArgumentParser]]:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return [] if sub is None else list(sub.choices.items())


def _walk(parser: argparse.ArgumentParser, name: str = "tokentune") -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for child, sub in _children(parser):
        yield from _walk(sub, f"{name} {child}")


def cli_reference() -> str:
    """Markdown: one section per command, its ``--help`` as argparse prints it (100 columns)."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parts = []
        for name, parser in _walk(build_parser()):
            level = "##" if name.count(" ") <= 1 else "###"
            parts.append(f"{level} `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
        return "\n".join(parts)
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def _root_links(text: str, prefix: str = "") -> str:
    """Links to root files and ``docs/`` pages, written for the repository, as links between site pages."""
    for source, page in ROOT_PAGES.items():
        text = re.sub(rf"\]\({prefix}{re.escape(source)}", f"]({page}", text)
    return re.sub(rf"\]\({prefix}docs/", "](", text)


def include(name: str, section: Optional[str] = None) -> str:
    text = (ROOT / name).read_text(encoding="utf-8")
    if section is not None:
        level = section.split(" ")[0] + " "
        lines = text.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(section)), None)
        if start is None:
            raise ValueError(f"{name} has no section starting with {section!r}")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(level)), len(lines))
        text = "\n".join(lines[start:end]) + "\n"
    return _root_links(text)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = INCLUDE.sub(lambda m: include(m.group(1), m.group(2)), markdown)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if "/" not in page.file.src_uri:                  # pages at the docs root link root files as ../FILE
        markdown = _root_links(markdown, prefix=r"\.\./")
    return markdown
