"""Which pages docs/README.md, the index of the evidence, links to. Every page under docs/ must be reachable from
it (the docs test checks), so a study that commits a new page there checks the index before its first run."""
from __future__ import annotations

import re
from pathlib import Path

from sac_model import SACError

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


def prose(text: str) -> str:
    """The Markdown without its fenced code blocks and inline code spans, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def linked_pages(index: Path) -> set[Path]:
    """The files the index links to, resolved."""
    return {(index.parent / target.partition("#")[0]).resolve() for target in LINK.findall(prose(index.read_text()))}


def unindexed_pages(index: Path) -> list[str]:
    """The Markdown pages under the index's folder (subfolders too) that the index does not link to."""
    linked = linked_pages(index)
    pages = sorted(page for page in index.parent.rglob("*.md") if page != index)
    return [str(page.relative_to(index.parent)) for page in pages if page.resolve() not in linked]


def require_indexed(page: Path) -> None:
    """Raise SACError when `page` lies under a docs/ folder whose README.md does not link to it: committed so, it
    would fail the docs test on main. Pages outside such a folder are not checked."""
    page = page.resolve()
    index = next((folder / "README.md" for folder in page.parents
                  if folder.name == "docs" and (folder / "README.md").is_file()), None)
    if index is not None and page not in linked_pages(index):
        raise SACError(f"{index} does not link {page.relative_to(index.parent)}: add the study's row to that index "
                       "before running with --commit (the docs test fails on a page the index does not list)")
