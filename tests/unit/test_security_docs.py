"""docs/security.md names the test behind every promise: each named test must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def control_plane_section() -> str:
    text = (ROOT / "docs" / "security.md").read_text()
    start = text.index("## Control plane")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_every_test_the_control_plane_section_cites_exists():
    section = control_plane_section()
    cited = 0
    current = None
    # `tests/x.py::test_a` sets the file; a following `::test_b` refers to the same file.
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(test_\w+))?(?:\[[^\]]*\])?`", section):
        path, name = m.groups()
        if path:
            current = ROOT / path
            assert current.is_file(), path
        if name:
            assert current is not None, name
            assert re.search(rf"^def {name}\(", current.read_text(), re.M), f"{current.name} has no {name}"
            cited += 1
    assert cited >= 10


DOC = ROOT / "docs" / "security.md"


def _named_tests() -> list[tuple[str, str]]:
    return re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC.read_text())


def test_every_promise_names_a_test_that_exists():
    named = _named_tests()
    assert len(named) >= 20
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"docs/security.md names {path}::{name}, which does not exist"
