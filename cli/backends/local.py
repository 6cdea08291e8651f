"""The local backend: the trainer on this machine, under torchrun.

All local GPUs (one process each), or 2 CPU processes with gloo when there is no GPU. Foreground by
default: rank 0's output streams to the terminal and every line is kept in ``<home>/logs/attempt-K.log``
(uploaded when the store is S3). ``--detach`` runs the same supervisor in the background.

The supervisor (this process in the foreground, a detached ``python -m gptoss_cloud.backends.local``
otherwise) records itself in ``run.json`` in the run's local state folder — ``<home>/local/`` for a local
store, ``~/.cache/gptoss-cloud/local-runs/<run-id>/`` for an S3 one — so ``status``, ``logs`` and
``cancel`` work from any terminal. Each attempt is one torchrun with ``--standalone``, which binds a
fresh rendezvous port every time (a restarted torchrun reusing a port fails under gloo).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from gptoss_cloud.contract.errors import BackendError, GptossError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import is_remote, join, open_store
from gptoss_cloud.backends.base import Backend, RunStatus, SubmitOptions, SubmitResult
from gptoss_cloud.backends.proc_identity import identity, is_ours, process_group

CPU_PROCESSES = 2  # what CI and laptops run: two gloo ranks exercise the real distributed path
_RANK0_PREFIX = re.compile(rb"^\[[^\]]*?0\]:")
_ATTEMPT_LOG = re.compile(r"logs/attempt-(\d+)\.log$")
_ROOT_CAUSE = re.compile(r"local_rank:\s*(\d+)")


# ---------------------------------------------------------------------------------- where things live
def state_dir(run_id: str, home: str) -> Path:
    if not is_remote(home):
        return Path(home) / "local"
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "gptoss-cloud" / "local-runs" / run_id


def local_gpu_count() -> int:
    import torch  # lazy: only the local backend needs it, and only when it launches

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_gpu() -> tuple[str, float]:
    """(catalogue name or device name, memory GiB) of GPU 0, so the plan checks this card."""
    import torch

    props = torch.cuda.get_device_properties(0)
    name = props.name
    for known in ("GH200", "H200", "H100", "B200", "A100", "L40S"):
        if known in name.upper():
            name = known
            break
    return name, round(props.total_memory / 2**30, 1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _alive(rec: dict, role: str) -> bool:
    """Whether the ``role`` process (supervisor or torchrun) of this record still runs: the recorded pid
    with the recorded start time and command line. A reused pid is someone else's process."""
    return is_ours(rec.get(f"{role}_pid"), rec.get(role))


def _signal(pid: int, sig: int) -> None:
    # torchrun and a detached supervisor lead their own session, so the group takes the ranks along;
    # a foreground supervisor shares the shell's group, which is not ours to signal.
    try:
        if process_group(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def next_attempt(run_id: str, home: str) -> int:
    """One more than the highest ``logs/attempt-K.log`` in the store or the local state folder."""
    seen = [0]
    for key in open_store(home).list("logs"):
        m = _ATTEMPT_LOG.search(key)
        if m:
            seen.append(int(m.group(1)))
    for p in (state_dir(run_id, home) / "logs").glob("attempt-*.log"):
        m = _ATTEMPT_LOG.search(f"logs/{p.name}")
        if m:
            seen.append(int(m.group(1)))
    return max(seen) + 1


def launch_command(spec_path: str, run_id: str, nproc: int, log_dir: str | Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--max-restarts", "0",  # a failed attempt is resumed with `submit --resume`, on a fresh port
        "--log-dir", str(log_dir), "--tee", "3", "--local-ranks-filter", "0",
        "-m", "gptoss_cloud.trainer", spec_path, "--run-id", run_id,
    ]


# ----------------------------------------------------------------------------------------- backend
class LocalBackend(Backend):
    name = "local"

    def prepare(self, spec: RunSpec) -> RunSpec:
        p = spec.parallelism
        if p.nodes != 1:
            raise BackendError(
                f"the local backend runs on this machine only, but parallelism.nodes is {p.nodes}",
                hint="use --backend k8s or --backend truss for several nodes, or pass --nodes 1",
            )
        gpus = local_gpu_count()
        if gpus == 0:
            nproc = CPU_PROCESSES
        elif "gpus_per_node" in p.model_fields_set:
            nproc = min(p.gpus_per_node, gpus)
            if p.gpus_per_node > gpus:  # a spec written for a bigger box still runs here, on what there is
                print(f"note: parallelism.gpus_per_node is {p.gpus_per_node} but this machine has {gpus} GPU(s); "
                      f"using {gpus}", file=sys.stderr)
        else:
            nproc = gpus
        spec = spec.model_copy(deep=True)
        spec.parallelism.gpus_per_node = nproc
        spec.cluster.backend = "local"
        if gpus:
            spec.cluster.gpu_type, spec.cluster.gpu_memory_gib = local_gpu()
        if not is_remote(spec.output.store):
            # Absolute, so the trainer and later commands find the run from any working directory.
            spec.output.store = str(Path(spec.output.store.removeprefix("file://")).expanduser().resolve())
        return spec

    # -------------------------------------------------------------------------------------- submit
    def _submit(self, spec: RunSpec, run_id: str, home: str, opts: SubmitOptions) -> SubmitResult:
        sd = state_dir(run_id, home)
        nproc = spec.parallelism.gpus_per_node
        spec_path = join(home, "spec.yaml") if not is_remote(home) else str(sd / "spec.yaml")
        if opts.dry_run:
            attempt = 1
            cmd = launch_command(spec_path, run_id, nproc, sd / "torchrun" / f"attempt-{attempt}")
            rendered = _render_dry_run(spec, cmd, opts.output_format)
            written = []
            if opts.out is not None:
                opts.out.mkdir(parents=True, exist_ok=True)
                target = opts.out / ("launch.json" if opts.output_format == "json" else "launch.yaml")
                target.write_text(rendered)
                written.append(target)
            return SubmitResult(run_id, home, self.name, rendered=rendered, written=written,
                                details={"command": cmd, "nproc": nproc})
        rec = _read_json(sd / "run.json")
        if rec and not rec.get("state") and _alive(rec, "supervisor"):
            raise BackendError(f"run {run_id} is still running locally (pid {rec['supervisor_pid']})",
                               hint=f"wait for it, or `gptoss-cloud cancel {run_id}` first")
        if is_remote(home):
            sd.mkdir(parents=True, exist_ok=True)
            (sd / "spec.yaml").write_text(spec.to_yaml())
        attempt = next_attempt(run_id, home)
        cmd = launch_command(spec_path, run_id, nproc, sd / "torchrun" / f"attempt-{attempt}")
        details = {"command": cmd, "nproc": nproc, "attempt": attempt, "log": join(home, f"logs/attempt-{attempt}.log")}
        if opts.detach:
            pid = _spawn_detached(run_id, home, attempt, cmd)
            details["pid"] = pid
            return SubmitResult(run_id, home, self.name, details={**details, "state": "Running"})
        rc = run_attempt(run_id, home, attempt, cmd, echo=True)
        state = _read_json(sd / "run.json") or {}
        details.update(returncode=rc, state=state.get("state", "Failed"))
        if rc != 0:
            what = "was cancelled" if details["state"] == "Cancelled" else f"failed (exit code {rc})"
            raise BackendError(f"run {run_id} {what}; full log: {details['log']}",
                               hint=f"fix the cause, then continue from its last checkpoint: gptoss-cloud submit --resume {run_id}")
        return SubmitResult(run_id, home, self.name, details=details)

    # -------------------------------------------------------------------------------------- status
    def _status(self, run_id: str, home: str) -> RunStatus:
        from gptoss_cloud.contract.progress import read_summary, summary_state

        rec = _read_json(state_dir(run_id, home) / "run.json")
        detail: dict = {}
        if rec is None:
            state = summary_state(read_summary(home))
            if state is None:
                raise BackendError(f"no local record of run {run_id} on this machine (looked in {state_dir(run_id, home)})",
                                   hint="local runs are tracked on the machine that started them")
            return RunStatus(run_id, state, self.name, {"source": "summary.json"})
        detail = {k: rec[k] for k in ("attempt", "supervisor_pid", "started", "finished", "returncode", "nproc") if k in rec}
        if rec.get("state"):
            state = rec["state"]
        elif _alive(rec, "supervisor"):
            state = "Running"
        elif _alive(rec, "torchrun"):
            state = "Running"  # its launcher was killed, but torchrun and the ranks still run: cancel stops them
            detail["reason"] = "the launcher is gone; torchrun still runs"
        else:
            state = "Failed"
            detail["reason"] = "the launcher exited without recording a result (killed?)"
        return RunStatus(run_id, state, self.name, detail)

    # ---------------------------------------------------------------------------------------- logs
    def _logs(self, run_id: str, home: str, *, follow: bool, node: int | None) -> Iterator[str]:
        if node not in (None, 0):
            raise BackendError(f"a local run has one node (0), not node {node}")
        sd = state_dir(run_id, home)
        rec = _read_json(sd / "run.json") or {}
        attempt = rec.get("attempt") or (next_attempt(run_id, home) - 1)
        if attempt < 1:
            raise BackendError(f"run {run_id} has no logs yet")
        local = sd / "logs" / f"attempt-{attempt}.log" if is_remote(home) else Path(home) / "logs" / f"attempt-{attempt}.log"
        if local.is_file():
            yield from _tail(local, follow=follow, alive=lambda: self._status(run_id, home).state == "Running")
            return
        st = open_store(home)
        key = f"logs/attempt-{attempt}.log"
        if not st.exists(key):
            raise BackendError(f"run {run_id} has no log for attempt {attempt} at {join(home, key)}")
        yield from st.read_bytes(key).decode(errors="replace").splitlines(keepends=True)

    # -------------------------------------------------------------------------------------- cancel
    def _cancel(self, run_id: str, home: str) -> None:
        sd = state_dir(run_id, home)
        st = self._status(run_id, home)
        if st.state != "Running":
            raise BackendError(f"run {run_id} is not running (state {st.state})")
        rec = _read_json(sd / "run.json") or {}
        (sd / "cancel").write_text(_now())
        # Only a pid whose start time and command line match the record is signalled (status checked the same).
        target = rec["torchrun_pid"] if _alive(rec, "torchrun") else rec["supervisor_pid"]
        # torchrun forwards SIGTERM to its workers (they run in their own sessions) and exits.
        _signal(target, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not _alive(rec, "torchrun"):
                if (_read_json(sd / "run.json") or {}).get("state"):
                    return
                if not _alive(rec, "supervisor"):  # nobody left to record it
                    _write_json(sd / "run.json", {**rec, "state": "Cancelled", "finished": _now()})
                    return
            time.sleep(0.2)
        raise BackendError(f"run {run_id} did not stop within 60 s of SIGTERM (pid {target})",
                           hint=f"kill it by hand: kill -KILL -{target}")


# ---------------------------------------------------------------------------------------- helpers
def _render_dry_run(spec: RunSpec, cmd: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"spec": spec.model_dump(mode="json"), "command": cmd}, indent=2) + "\n"
    return f"# launch: {shlex.join(cmd)}\n" + spec.to_yaml()


def _tail(path: Path, *, follow: bool, alive) -> Iterator[str]:
    with path.open("rb") as f:
        while True:
            line = f.readline()
            if line:
                yield line.decode(errors="replace")
                continue
            if not follow or not alive():
                rest = f.read()
                if rest:
                    yield rest.decode(errors="replace")
                return
            time.sleep(0.5)


def _spawn_detached(run_id: str, home: str, attempt: int, cmd: list[str]) -> int:
    sd = state_dir(run_id, home)
    sd.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "gptoss_cloud.backends.local", "--run-id", run_id, "--home", home,
            "--attempt", str(attempt), "--", *cmd]
    with open(sd / "supervisor.log", "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # Wait until the supervisor has recorded itself, so an immediate `status` finds it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rec = _read_json(sd / "run.json") or {}
        if rec.get("supervisor_pid") == proc.pid and rec.get("attempt") == attempt:
            return proc.pid
        if proc.poll() is not None:
            raise BackendError(f"the local launcher exited at once (code {proc.returncode}); see {sd / 'supervisor.log'}")
        time.sleep(0.05)
    return proc.pid


def run_attempt(run_id: str, home: str, attempt: int, cmd: list[str], *, echo: bool) -> int:
    """Run one torchrun attempt to the end: record it, tee its output, report the failing rank."""
    sd = state_dir(run_id, home)
    sd.mkdir(parents=True, exist_ok=True)
    (sd / "cancel").unlink(missing_ok=True)
    log_path = (sd / "logs" if is_remote(home) else Path(home) / "logs") / f"attempt-{attempt}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Each pid goes with its identity (start time, command line): cancel signals it only while both match.
    rec = {"run_id": run_id, "attempt": attempt, "supervisor_pid": os.getpid(), "supervisor": identity(os.getpid()),
           "started": _now(), "command": cmd, "nproc": int(cmd[cmd.index("--nproc-per-node") + 1])}
    _write_json(sd / "run.json", rec)

    from gptoss_cloud.contract.hostinfo import usable_cpus
    from gptoss_cloud.contract.spec import pod_environ

    env = pod_environ(os.environ)  # this shell's GPTOSS_* settings are in the resolved spec already
    # Share the cores (within a container's CPU limit) between the ranks instead of torchrun's one thread each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // rec["nproc"])))
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    rec["torchrun_pid"] = proc.pid
    rec["torchrun"] = identity(proc.pid)
    _write_json(sd / "run.json", rec)

    def forward(signum, _frame):  # Ctrl-C or `cancel`: stop torchrun, which stops its workers
        (sd / "cancel").write_text(_now())
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    out = sys.stdout.buffer if echo else None
    tail: list[bytes] = []
    try:
        with log_path.open("ab") as log:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                tail = (tail + [line])[-200:]
                rank0 = _RANK0_PREFIX.match(line)
                if rank0:  # rank 0's own words, without torchrun's "[default0]:" tag
                    line = line[rank0.end():]
                log.write(line)
                log.flush()
                if out is not None and rank0:
                    out.write(line)
                    out.flush()
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)

    cancelled = (sd / "cancel").exists()
    state = "Succeeded" if rc == 0 else ("Cancelled" if cancelled else "Failed")
    if rc != 0 and echo and not cancelled:
        _print_failure(sd / "torchrun" / f"attempt-{attempt}", b"".join(tail).decode(errors="replace"))
    if is_remote(home):
        try:
            open_store(home).upload_file(log_path, f"logs/attempt-{attempt}.log")
        except GptossError as e:
            print(f"warning: could not upload the log: {e.message}", file=sys.stderr)
    rec.update(state=state, returncode=rc, finished=_now())
    _write_json(sd / "run.json", rec)
    return rc


def _print_failure(log_dir: Path, torchrun_output: str) -> None:
    """Show the root-cause rank's stderr tail: the terminal shows only rank 0's stream."""
    m = _ROOT_CAUSE.search(torchrun_output)
    rank = m.group(1) if m else "0"
    files = sorted(log_dir.glob(f"*/attempt_*/{rank}/stderr.log"))
    if not files:
        return
    lines = files[-1].read_text(errors="replace").splitlines()[-25:]
    if rank != "0" and lines:
        print(f"--- rank {rank} (last {len(lines)} lines of {files[-1]}) ---", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)


def _supervise(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gptoss_cloud.backends.local")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--attempt", type=int, required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    return run_attempt(a.run_id, a.home, a.attempt, cmd, echo=False)


if __name__ == "__main__":
    sys.exit(_supervise(sys.argv[1:]))
