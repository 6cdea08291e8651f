import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for root, pkg in (("cli", "gptoss_cloud"), ("trainer", "gptoss_cloud.trainer")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == listed, f"pyproject packages out of date: missing {found - listed}, stale {listed - found}"


def test_cli_starts_without_torch_and_fast():
    code = (
        "import sys, time; t=time.perf_counter();"
        "from gptoss_cloud.main import app;"
        "import typer.testing as tt; r=tt.CliRunner().invoke(app, ['--help']);"
        "assert r.exit_code == 0, r.output;"
        "assert 'torch' not in sys.modules, 'CLI imported torch';"
        "assert 'transformers' not in sys.modules;"
        "print(time.perf_counter()-t)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert wall < 3.0, f"`gptoss-cloud --help` took {wall:.2f}s"
