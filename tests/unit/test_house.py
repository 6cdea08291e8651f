"""The house: which folder may import which, small files, no string lookups, and the map in cli/main.py true.

Imports are read with ``ast`` (lazy imports inside functions count too), so a shortcut through the wrong plane
fails here however deep it hides.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def _package_files(root: str) -> list[Path]:
    return sorted(p for p in (REPO / root).rglob("*.py") if "assets" not in p.parts)


def _imports(path: Path) -> list[str]:
    """Every gptoss_cloud module ``path`` imports, ``from gptoss_cloud import x`` counted as ``gptoss_cloud.x``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path.relative_to(REPO)}:{node.lineno}: relative import; the house uses absolute imports")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gptoss_cloud":
            if node.module == "gptoss_cloud":
                out += [f"gptoss_cloud.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "gptoss_cloud"]
    return out


def _offenders(root: str, allowed: tuple[str, ...]) -> list[str]:
    bad = []
    for path in _package_files(root):
        for mod in _imports(path):
            if not mod.startswith(allowed):
                bad.append(f"{path.relative_to(REPO)} imports {mod}")
    return bad


def test_no_python_file_is_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for root in ("cli", "trainer")
            for p in _package_files(root) if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "split along a seam: " + "; ".join(long)


def test_the_data_plane_imports_only_the_contract_and_itself():
    # gptoss_cloud.__version__ (the package root) is the distribution's, not the control plane's.
    allowed = ("gptoss_cloud.contract", "gptoss_cloud.trainer", "gptoss_cloud.__version__")
    assert _offenders("trainer", allowed) == []


def test_the_contract_imports_neither_plane():
    assert _offenders("cli/contract", ("gptoss_cloud.contract", "gptoss_cloud.__version__")) == []


def test_renderers_and_cloud_backends_never_import_the_trainer():
    bad = []
    for path in _package_files("cli/render") + [REPO / "cli/backends/k8s.py", REPO / "cli/backends/truss.py",
                                                  REPO / "cli/kube/client.py", REPO / "cli/kube/objects.py"]:
        bad += [f"{path.relative_to(REPO)} imports {m}" for m in _imports(path) if m.startswith("gptoss_cloud.trainer")]
    assert bad == []


def test_commands_and_backends_are_found_by_plain_imports():
    """No importlib string lookups on the control plane: readers and tools can follow every call."""
    lookups = [f"{p.relative_to(REPO)}:{i}" for p in _package_files("cli")
               for i, line in enumerate(p.read_text().splitlines(), 1) if "import_module(" in line]
    assert lookups == []


def test_commands_do_not_branch_on_the_backend_name():
    """`serve` and `delete` go through the Backend methods; a command naming a backend is a shortcut around them."""
    pattern = re.compile(r"""(?:backend|which)\s*==\s*["'](?:k8s|truss|local)["']""")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in _package_files("cli/commands")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


_MAP_LINE = re.compile(r"^ {4}the (?P<what>.+?)\s{2,}(?P<path>\S+\.py): (?P<names>.+)$")


def test_the_map_in_main_names_code_that_exists():
    """cli/main.py names where each rule lives: one hop from the entry point to the code."""
    doc = ast.get_docstring(ast.parse((REPO / "cli/main.py").read_text()))
    entries = [m for line in doc.splitlines() if (m := _MAP_LINE.match(line))]
    assert {m["what"] for m in entries} >= {"JobSet failure policy", "tool-call label mask", "manifest check on resume",
                                            "vLLM server arguments", "memory formula"}
    for m in entries:
        path = (REPO / "cli" / m["path"]).resolve()
        assert path.is_file(), f"{m['what']}: {m['path']} does not exist"
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        methods = {f"{c.name}.{f.name}" for c in tree.body if isinstance(c, ast.ClassDef)
                   for f in c.body if isinstance(f, ast.FunctionDef)}
        for name in (x.strip() for x in m["names"].split(",")):
            assert name in defined | methods, f"{m['what']}: {m['path']} defines no {name}"
