"""Benchmark suites: the named sets of runs that docs/benchmarks.md reports, and the runner for them.

The suites live in ``suites.toml`` beside this module. Each one says what it measures, how many
GPUs it needs and its steps, each an argument list of our own programs — ``gptoss-cloud ...``,
``python -m pytest ...`` or ``python -m gptoss_cloud.<module> ...`` — never shell or Python source, so
a suite can be checked (``--dry-run``, the unit tests) on a machine without torch or a GPU.

The runner gives each step the GPU machine's environment (NVLink multicast off unless already set,
unbuffered output), runs it with this interpreter, keeps its output in ``<out>/<step>.log`` and its
report beside it, and stops at the first failing step with one line naming the suite and the step.
"""

from __future__ import annotations

import re
import shlex
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping

SUITE_FILE = "suites.toml"
SUITE_KEYS = {"description", "gpus", "s3_server", "step"}
STEP_KEYS = {"name", "run", "env", "timeout_s"}
# A step name becomes a file name under --out: keep it to one path component.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# What every GPU host here needs (kept when the machine sets them itself): NVLink multicast stays off
# on shared hosts, where NCCL's NVLS and torch's symmetric memory would otherwise try to use it.
GPU_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# Always set: progress lines reach the log as they happen, and rich tables are not cut at 80 columns.
GPU_ENV = {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
S3_BUCKET = "bench"  # the bucket a suite with s3_server = true finds on its local S3-compatible server
KILL_GRACE_S = 30.0


class SuiteError(ValueError):
    """A suite file or a suite run that cannot go on; the message names the suite and the step."""


@dataclass(frozen=True)
class Step:
    name: str
    run: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None

    @property
    def program(self) -> str:
        """What runs: 'gptoss-cloud <command>', 'pytest' or the module after python -m."""
        if self.run[0] == "gptoss-cloud":
            return f"gptoss-cloud {self.run[1]}" if len(self.run) > 1 else "gptoss-cloud"
        return self.run[2]


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    gpus: int
    steps: tuple[Step, ...]
    s3_server: bool = False


# ------------------------------------------------------------------------------------------ parsing
def _where(suite: str, step: str | int | None = None) -> str:
    if step is None:
        return f"suite {suite!r}"
    return f"suite {suite!r}, step {step!r}" if isinstance(step, str) else f"suite {suite!r}, step {step + 1}"


def _check_program(run: list[str], where: str) -> None:
    """The first words must be one of our programs: gptoss-cloud, or python -m pytest / gptoss_cloud.*."""
    if run[0] == "gptoss-cloud":
        if len(run) < 2 or run[1].startswith("-"):
            raise SuiteError(f"{where}: 'gptoss-cloud' needs a command (bench, rehearse, ...)")
        return
    if run[0] == "python":
        module = run[2] if len(run) > 2 and run[1] == "-m" else None
        if module == "pytest" or (module or "").startswith("gptoss_cloud."):
            return
        raise SuiteError(f"{where}: python runs only '-m pytest' or '-m gptoss_cloud.<module>', not {shlex.join(run[1:3])!r}")
    raise SuiteError(f"{where}: a step starts with 'gptoss-cloud' or 'python -m', not {run[0]!r} "
                     "(no shell: each step is one argument list)")


def _parse_step(suite: str, i: int, raw: Any) -> Step:
    if not isinstance(raw, dict):
        raise SuiteError(f"{_where(suite, i)}: a step is a table with name and run, not {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SuiteError(f"{_where(suite, i)}: name must be letters, digits, '.', '_' or '-' (it names the "
                         f"step's files), not {name!r}")
    where = _where(suite, name)
    unknown = sorted(set(raw) - STEP_KEYS)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(STEP_KEYS))})")
    run = raw.get("run")
    if not isinstance(run, list) or not run or not all(isinstance(a, str) and a for a in run):
        raise SuiteError(f"{where}: run must be a non-empty list of non-empty strings, not {run!r}")
    _check_program(run, where)
    if "--out" in run and run[:2] in (["gptoss-cloud", "bench"], ["gptoss-cloud", "rehearse"]):
        raise SuiteError(f"{where}: leave --out to the runner (it writes {name}.json under the suite's --out)")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise SuiteError(f"{where}: env must be a table of strings, not {env!r}")
    timeout = raw.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise SuiteError(f"{where}: timeout_s must be a positive number of seconds, not {timeout!r}")
    return Step(name=name, run=tuple(run), env=dict(env), timeout_s=float(timeout) if timeout is not None else None)


def parse_suite(name: str, raw: Any) -> Suite:
    where = _where(name)
    if not _NAME.match(name):
        raise SuiteError(f"{where}: a suite name is letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: a suite is a table, not {type(raw).__name__}")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(SUITE_KEYS))})")
    description = raw.get("description")
    if not isinstance(description, str) or not description.strip():
        raise SuiteError(f"{where}: description is required (what the suite measures, which section reports it)")
    gpus = raw.get("gpus")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise SuiteError(f"{where}: gpus must be the number of GPUs it needs (1 or more), not {gpus!r}")
    s3 = raw.get("s3_server", False)
    if not isinstance(s3, bool):
        raise SuiteError(f"{where}: s3_server must be true or false, not {s3!r}")
    raw_steps = raw.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise SuiteError(f"{where}: no steps (add [[suite.{name}.step]] tables)")
    steps = tuple(_parse_step(name, i, s) for i, s in enumerate(raw_steps))
    seen: set[str] = set()
    for s in steps:
        if s.name in seen:
            raise SuiteError(f"{_where(name, s.name)}: two steps share this name (their files would collide)")
        seen.add(s.name)
    return Suite(name=name, description=description.strip(), gpus=gpus, steps=steps, s3_server=s3)


def parse_suites(text: str, source: str = SUITE_FILE) -> dict[str, Suite]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{source}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"suite"})
    if unknown:
        raise SuiteError(f"{source}: unknown top-level key(s) {', '.join(unknown)} (suites go under [suite.NAME])")
    suites = doc.get("suite")
    if not isinstance(suites, dict) or not suites:
        raise SuiteError(f"{source}: no suites (add a [suite.NAME] table)")
    return {name: parse_suite(name, raw) for name, raw in suites.items()}


def load_suites(path: Path | None = None) -> dict[str, Suite]:
    """The suites of ``path``, or of the file shipped with the package."""
    if path is not None:
        return parse_suites(Path(path).read_text(), str(path))
    text = resources.files("gptoss_cloud.suites").joinpath(SUITE_FILE).read_text()
    return parse_suites(text)


def get_suite(name: str, suites: Mapping[str, Suite] | None = None) -> Suite:
    suites = load_suites() if suites is None else suites
    if name not in suites:
        raise SuiteError(f"no suite {name!r}; the suites are: {', '.join(sorted(suites))} (`gptoss-cloud bench --list`)")
    return suites[name]


# ------------------------------------------------------------------------------ what each step runs
def work_dir(suite: Suite) -> Path:
    """Scratch space for what must not land in --out (checkpoints, run homes): the temp folder."""
    return Path(tempfile.gettempdir()) / "gptoss-bench-work" / suite.name


def _fill(text: str, suite: Suite, out: Path) -> str:
    return text.replace("{out}", str(out)).replace("{work}", str(work_dir(suite)))


def step_argv(suite: Suite, step: Step, out: Path, python: str = sys.executable) -> list[str]:
    """The command line of one step: our programs through this interpreter, its report under ``out``."""
    args = [_fill(a, suite, out) for a in step.run]
    if args[0] == "gptoss-cloud":
        argv = [python, "-m", "gptoss_cloud", *args[1:]]
        if args[1] == "bench":
            argv += ["--out", str(out / f"{step.name}.json")]
        elif args[1] == "rehearse":
            argv += ["--out", str(out / f"{step.name}.json"), "--out-dir", str(out / step.name)]
        return argv
    argv = [python, *args[1:]]
    if args[2] == "pytest":
        argv += ["--junitxml", str(out / f"{step.name}.xml")]
    return argv


def step_env(suite: Suite, step: Step, base: Mapping[str, str], out: Path) -> dict[str, str]:
    env = dict(base)
    for k, v in GPU_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    env.update(GPU_ENV)
    if not env.get("TIKTOKEN_ENCODINGS_BASE"):  # the harmony vocabulary, offline, from a checkout's shared/
        for d in (Path("shared/tokenizers"), Path("../shared/tokenizers")):
            if d.is_dir():
                env["TIKTOKEN_ENCODINGS_BASE"] = str(d.resolve())
                break
    env.update({k: _fill(v, suite, out) for k, v in step.env.items()})
    return env


def check_step(suite: Suite, step: Step) -> None:
    """Parse a step the way its program would, without running it: a typo fails here, not on the GPU."""
    where = _where(suite.name, step.name)
    args = list(step.run)
    if args[0] == "gptoss-cloud":
        check_cli_args(args[1:], where)
        return
    module = args[2]
    if module != "pytest" and find_spec(module) is None:
        raise SuiteError(f"{where}: no module {module} in this installation")


def check_cli_args(args: list[str], where: str) -> dict[str, Any]:
    """Parse ``gptoss-cloud ARGS`` through the real typer app (types, choices, ranges) without invoking it;
    the command's parameters as it would receive them."""
    import typer

    from gptoss_cloud.main import app

    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="gptoss-cloud")
    cmd = group.get_command(root, args[0])  # a step names its command first: no options of the app itself
    if cmd is None:
        raise SuiteError(f"{where}: gptoss-cloud has no command {args[0]!r}")
    try:
        with cmd.make_context(args[0], list(args[1:]), parent=root) as sub:
            return dict(sub.params)
    except typer.Exit:
        return {}  # --help and the like: parsed
    except Exception as e:
        # Usage errors carry format_message (typer's own copy of click's exceptions, or click's: which one
        # depends on the typer release, so no class is named here); anything else is a real failure.
        if not callable(getattr(e, "format_message", None)):
            raise
        raise SuiteError(f"{where}: gptoss-cloud {shlex.join(args[:1])}: {e.format_message()}") from None


# ------------------------------------------------------------------------------------------- running


def dry_run_lines(suite: Suite, out: Path, python: str = sys.executable) -> list[str]:
    """What ``--dry-run`` prints: every step checked and its command line, nothing started."""
    lines = [f"# {suite.name}: {suite.description} ({suite.gpus} GPU)"]
    if suite.s3_server:
        lines.append(f"# a local S3-compatible server with bucket {S3_BUCKET!r} for the steps")
    for step in suite.steps:
        check_step(suite, step)
        env = "".join(f"{k}={shlex.quote(v)} " for k, v in step.env.items())
        limit = f", cut off after {step.timeout_s:g} s" if step.timeout_s else ""
        lines.append(f"{env}{shlex.join(step_argv(suite, step, out, python))}  # log: {out / (step.name + '.log')}{limit}")
    return lines


def list_lines(suites: Mapping[str, Suite]) -> list[str]:
    width = max(len(n) for n in suites)
    return [f"{s.name:<{width}}  {s.gpus} GPU  {len(s.steps)} step(s)  {s.description}" for s in suites.values()]
