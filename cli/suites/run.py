"""Running a benchmark suite: each step in turn with its environment and log, a local S3 server where the suite
asks for one, stopping at the first failure with the suite and step named."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping
from gptoss_cloud.suites.parse import KILL_GRACE_S, S3_BUCKET, Suite, SuiteError, _where, check_step, step_argv, step_env, work_dir


def visible_gpus(environ: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use, without torch: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`."""
    environ = os.environ if environ is None else environ
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU ")) if res.returncode == 0 else 0


@dataclass
class StepResult:
    name: str
    argv: list[str]
    returncode: int
    wall_s: float
    log: str
    timed_out: bool = False


def _run_logged(argv: list[str], env: Mapping[str, str], log: Path, timeout_s: float | None,
                echo: Callable[[str], None]) -> tuple[int, bool]:
    """Run one step in its own process group, its output both echoed and kept in ``log``."""
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        timed_out = threading.Event()

        def stop() -> None:  # the whole group: torchrun's ranks and bench's variant workers too
            timed_out.set()
            for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    proc.wait(wait)
                    return
                except subprocess.TimeoutExpired:
                    continue

        timer = threading.Timer(timeout_s, stop) if timeout_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                echo(line.rstrip("\n"))
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:
                stop()
    return rc, timed_out.is_set()


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto) with bucket S3_BUCKET; yields the environment that reaches it."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise SuiteError(f"this suite needs an S3-compatible server: install moto[server] ({e})") from None
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Objects up to 64 GiB stay in memory (checkpoint shards are tens of GB; the GPU hosts have the RAM).
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(64 * 1024**3))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        server.stop()


def run_suite(suite: Suite, out: Path, *, echo: Callable[[str], None] = print,
              environ: Mapping[str, str] | None = None, python: str = sys.executable,
              gpus: int | None = None) -> list[StepResult]:
    """Run every step in order; raise SuiteError at the first that fails, naming the suite and the step."""
    environ = dict(os.environ if environ is None else environ)
    have = visible_gpus(environ) if gpus is None else gpus
    if have < suite.gpus:
        raise SuiteError(f"{_where(suite.name)} needs {suite.gpus} GPU(s); this machine shows {have}")
    for step in suite.steps:
        check_step(suite, step)
    out.mkdir(parents=True, exist_ok=True)
    work_dir(suite).mkdir(parents=True, exist_ok=True)
    results: list[StepResult] = []
    with ExitStack() as stack:
        if suite.s3_server:
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                environ.pop(k, None)  # the local server's endpoint and credentials, not the user's
            environ.update(stack.enter_context(s3_server()))
        for step in suite.steps:
            argv = step_argv(suite, step, out, python)
            log = out / f"{step.name}.log"
            echo(f"== {suite.name}/{step.name}: {shlex.join(step.run)}")
            t0 = time.monotonic()
            rc, timed_out = _run_logged(argv, step_env(suite, step, environ, out), log, step.timeout_s, echo)
            results.append(StepResult(step.name, argv, rc, round(time.monotonic() - t0, 1), str(log), timed_out))
            _write_record(suite, out, results)
            if rc != 0:
                why = f"timed out after {step.timeout_s:g} s" if timed_out else f"exit {rc}"
                raise SuiteError(f"{_where(suite.name, step.name)} failed ({why}); see {log}")
    return results


def _write_record(suite: Suite, out: Path, results: list[StepResult]) -> None:
    """<out>/suite.json: which suite ran, and each step's command line, exit status and wall time."""
    rec = {"suite": suite.name, "description": suite.description, "gpus": suite.gpus,
           "steps": [r.__dict__ for r in results]}
    (out / "suite.json").write_text(json.dumps(rec, indent=2) + "\n")
