"""`serve RUN --backend local`: the vLLM OpenAI server on this machine, built by the same argument
builder as the Kubernetes Deployment, run as a child process that Ctrl-C and SIGTERM stop cleanly.

vLLM comes from ``--vllm-python`` (a virtualenv of its own, e.g. scripts/vllm_env.sh) or else this
interpreter. The API key middleware is a standalone file shipped in this package's assets and put on
the child's PYTHONPATH, as the serve image does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from gptoss_cloud.contract import prompt_rule
from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.render.k8s import serve as rs
from gptoss_cloud.render import vllm as vv
from gptoss_cloud.contract.store.objects import is_remote, join

MIDDLEWARE_DIR = Path(__file__).resolve().parents[1] / "assets" / "vllm"  # gptoss_cloud/assets/vllm
STOP_GRACE_S = 30


@dataclass
class LocalServer:
    argv: list[str]
    env: dict[str, str]
    base_url: str
    key_env: str | None


def check_python(python: str) -> None:
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        raise GptossError(f"--vllm-python {python}: no such executable", hint="build one with scripts/vllm_env.sh")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode != 0:
        raise GptossError(f"vLLM is not installed for {python}, so `serve --backend local` cannot start a server",
                          hint="pass --vllm-python /path/to/venv/bin/python (scripts/vllm_env.sh builds a CPU one), "
                               "or try the model with: gptoss-cloud chat RUN")


def model_folder(t: rs.ServeTarget, cache: Path, fetch: Callable[[str, Path], None] | None = None) -> Path:
    """The local folder vLLM loads: the run's own folder for a local store (verified in place), a fetched
    and verified copy for s3://. vLLM is only ever handed files the folder's manifest vouches for."""
    src_key = "adapter" if t.adapter else t.merged_key
    if not t.adapter and t.needs_merge:
        raise GptossError(f"{t.home}/{t.merged_key}/ is not published yet", hint=f"gptoss-cloud merge {t.run_id}")
    local = cache / t.run_id / src_key if is_remote(t.home) else Path(t.home) / src_key
    if fetch is None:
        from gptoss_cloud.contract.outputs import spec_says_signed
        from gptoss_cloud.trainer.programs.serve_fetch import fetch as fetch_folder

        def fetch(src: str, dest: Path) -> None:
            fetch_folder(src, dest, signed=spec_says_signed(t.spec))
    fetch(join(t.home, src_key), local)
    return local


def plan(t: rs.ServeTarget, folder: Path, *, python: str, key_env: str | None, environ: Mapping[str, str],
         host: str = "127.0.0.1") -> LocalServer:
    env = dict(environ)
    if key_env is not None:
        key = environ.get(key_env, "")
        if not key:
            raise GptossError(f"--api-key-env {key_env}: the variable is not set or empty",
                              hint=f"export {key_env}=$(openssl rand -hex 32)")
        env["VLLM_API_KEY"] = key
    else:
        env.pop("VLLM_API_KEY", None)   # a stray key would make vLLM guard /v1 while the rest stayed open
    env.update(prompt_rule.vllm_env(t.spec.data))
    env["PYTHONPATH"] = os.pathsep.join([str(MIDDLEWARE_DIR), *filter(None, [environ.get("PYTHONPATH")])])
    if not t.adapter:
        env["HF_HUB_OFFLINE"] = "1"    # a merged folder is complete: never reach for the hub
    if t.adapter:
        args = rs.vllm_args(t, host=host, adapter=str(folder), api_key=key_env is not None)
    else:
        args = rs.vllm_args(t, host=host, model=str(folder), api_key=key_env is not None)
    return LocalServer(vv.server_command(python, args), env, f"http://{host}:{t.port}/v1", key_env)


def usage_lines(server: LocalServer, model: str) -> list[str]:
    out = [f"endpoint: {server.base_url}"]
    if server.key_env:
        out.append(f"API key:  ${server.key_env} (every route but /health and /metrics needs it)")
    else:
        out.append("API key:  none (pass --api-key-env NAME to require one)")
    auth = f' \\\n  -H "Authorization: Bearer ${server.key_env}"' if server.key_env else ""
    body = '{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}]}' % model
    out.append(f"curl {server.base_url}/chat/completions \\\n  -H 'Content-Type: application/json'{auth} \\\n  -d '{body}'")
    return out


def run(server: LocalServer) -> int:
    """Run the server until it exits; SIGINT/SIGTERM are passed on once, then the group is killed."""
    # Its own session: Ctrl-C reaches only this process, which stops vLLM (and its engine processes) once.
    child = subprocess.Popen(server.argv, env=server.env, start_new_session=True)
    stopping = {"signal": None}

    def stop(signum, _frame):
        if stopping["signal"] is None:
            stopping["signal"] = signum
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping["signal"] is not None:
                    try:
                        rc = child.wait(timeout=STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        os.killpg(child.pid, signal.SIGKILL)
                        rc = child.wait()
                    break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        try:  # engine processes vLLM started must not outlive it
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if stopping["signal"] is not None:
        print(f"stopped the vLLM server ({signal.Signals(stopping['signal']).name})", file=sys.stderr)
        return 0
    return rc
