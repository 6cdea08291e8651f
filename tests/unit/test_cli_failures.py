"""Every failure is one line on stderr; --debug or GPTOSS_DEBUG=1 adds the chained traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("gptoss-cloud"))


def cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "GPTOSS_DEBUG"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env={**e, **(env or {})}, cwd=cwd, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def test_a_spec_that_is_a_folder_is_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "spec").mkdir()
    out = cli("submit", str(tmp_path / "spec"), "--dry-run", cwd=tmp_path)
    assert out.returncode == 1
    assert error_lines(out.stderr) == [f"error: spec file {tmp_path / 'spec'} is a folder, not a YAML file"]
    out = cli("--debug", "submit", str(tmp_path / "spec"), "--dry-run", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("error: spec file")


def test_a_gptoss_value_that_is_not_yaml_is_one_line(tmp_path):
    out = cli("submit", "--dry-run", env={"GPTOSS_OPTIM__LR": "{1e-4"}, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert error_lines(out.stderr)[0].startswith("error: environment variable GPTOSS_OPTIM__LR:1:")


BOOM = """
import sys
import typer
from gptoss_cloud import main as m

@m.app.command("boom")
def boom() -> None:
    try:
        open(sys.argv[-1] + "/missing/file")
    except OSError as e:
        raise RuntimeError("could not load the thing: " + "x" * 5000) from e

sys.argv = ["gptoss-cloud", *sys.argv[1:-1]]
m.main()
"""


@pytest.mark.parametrize("debug", ["", "flag", "env"])
def test_an_unexpected_exception_is_one_line_unless_debug_asks_for_the_chain(tmp_path, debug):
    args = (["--debug"] if debug == "flag" else []) + ["boom", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_DEBUG"}
    if debug == "env":
        env["GPTOSS_DEBUG"] = "1"
    out = subprocess.run([sys.executable, "-c", BOOM, *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    last = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and last[0].startswith("error: unexpected RuntimeError: could not load the thing: xxx")
    assert last[0].endswith("...(cut)") and len(last[0]) < 400
    if debug:
        assert "FileNotFoundError" in out.stderr and "The above exception was the direct cause" in out.stderr
        assert "x" * 5000 in out.stderr  # the traceback is the full record
    else:
        assert error_lines(out.stderr) == [last[0], "  hint: run with --debug (or GPTOSS_DEBUG=1) for the traceback"]


def test_a_run_home_spec_that_is_not_utf8_is_one_line_for_every_run_command(tmp_path):
    rid = "bad-20250101-000000-abcd"
    (tmp_path / rid).mkdir()
    (tmp_path / rid / "spec.yaml").write_bytes(b"name: caf\xe9\n")
    for args in (["status", rid], ["delete", rid, "--yes"], ["logs", rid], ["cancel", rid]):
        out = cli(*args, "--store", str(tmp_path))
        assert out.returncode == 1, args
        assert "Traceback" not in out.stderr, (args, out.stderr)
        assert error_lines(out.stderr)[0].startswith("error: "), (args, out.stderr)
    assert (tmp_path / rid / "spec.yaml").exists()


def test_messages_with_brackets_are_printed_as_written(tmp_path):
    out = cli("status", "[bold]x", "--store", str(tmp_path))
    assert out.returncode == 1 and "invalid run id '[bold]x'" in out.stderr
