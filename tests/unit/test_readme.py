"""README.md stays a front door: short, opening with the two commands, the second exactly what CI runs."""

from __future__ import annotations

import re
import tomllib

from support import REPO

README = (REPO / "README.md").read_text()
LIMIT = 12_000  # topics belong in docs/ pages; the README says what it is and where to read next


def _ci_test_command() -> str:
    """The line of .ci/run that installs the package and runs the suite."""
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
             if "python -m pytest" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, f".ci/run should run pytest in exactly one line, found {lines}"
    return lines[0]


def _first_code_block() -> list[str]:
    m = re.search(r"^```bash\n(.*?)^```$", README, re.M | re.S)
    assert m, "README.md has no ```bash block"
    return m.group(1).splitlines()


def test_readme_is_short():
    assert len(README) < LIMIT, f"README.md is {len(README):,} characters; move a topic into docs/ (limit {LIMIT:,})"


def test_the_first_block_is_the_demo_then_the_ci_test_command():
    demo, tests = _first_code_block()
    assert tests == _ci_test_command()
    assert demo == 'pip install -e ".[train]" && gptoss-cloud submit examples/local-tiny.yaml'


def test_the_two_commands_name_what_exists():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    demo, tests = _first_code_block()
    for command in (demo, tests):
        extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', command).group(1).split(",")
        assert set(extras) <= set(project["optional-dependencies"]), command
    assert "gptoss-cloud" in project["scripts"]
    assert (REPO / demo.split()[-1]).is_file(), demo


def test_the_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"README.md's table does not link {sorted(pages - linked)}"
