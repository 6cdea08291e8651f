"""docs/security.md names the test behind every promise: each named test must exist."""

from __future__ import annotations

import ast
import re

from support import REPO

DOC = REPO / "docs" / "security.md"


def _named_tests() -> list[tuple[str, str]]:
    return re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC.read_text())


def test_every_promise_names_a_test_that_exists():
    named = _named_tests()
    assert len(named) >= 20
    for path, name in named:
        tree = ast.parse((REPO / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"docs/security.md names {path}::{name}, which does not exist"
