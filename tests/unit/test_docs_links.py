"""Every relative link in README.md and docs/*.md leads somewhere: the file (or folder) exists, and an
anchor names a heading of the page it points at. Sections move between pages; a link left behind
must fail here, not on a reader."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from support import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks: a `# comment` in a bash block is not a heading, and a
    placeholder link in a template block is not a link."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower-cased, punctuation and symbols
    removed (letters, digits, `_` and `-` stay), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = text.replace("`", "").replace("*", "")
    kept = (c for c in text.lower()
            if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(_prose(page.read_text())):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def relative_links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", _prose(page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:, ...


def test_the_slug_rule_matches_githubs_on_headings_of_these_pages():
    assert slug("## `metrics.jsonl`".lstrip("# ")) == "metricsjsonl"
    assert slug("Checkpoints, resume and merge") == "checkpoints-resume-and-merge"
    assert slug("MXFP4 frozen mode (`model.base_format: mxfp4`)") == "mxfp4-frozen-mode-modelbase_format-mxfp4"
    assert slug("Baseten Truss (`--backend truss`)") == "baseten-truss---backend-truss"
    assert slug("The planner's model and its assumptions") == "the-planners-model-and-its-assumptions"


def test_pages_are_found_and_have_links():
    assert len(PAGES) > 10
    assert len(relative_links(REPO / "README.md")) >= 15


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: {dest.name} has no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
