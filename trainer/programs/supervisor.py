"""The local run supervisor: one torchrun attempt of a local run, recorded so any terminal can follow it.

    python -m gptoss_cloud.trainer.programs.supervisor --run-id ID --home HOME --attempt K -- TORCHRUN...

``submit --backend local`` runs :func:`run_attempt` in its own process (foreground) or starts this program
detached (``--detach``). It records itself and torchrun in ``run.json`` in the run's local state folder —
``<home>/local/`` for a local store, ``~/.cache/gptoss-cloud/local-runs/<run-id>/`` for an S3 one — with each
pid's identity (start time, command line), so ``status``, ``logs`` and ``cancel`` find and signal only these
processes. Rank 0's output is teed to the terminal and every line kept in ``<home>/logs/attempt-K.log``
(uploaded when the store is S3). No torch here: it supervises torchrun from outside.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.runs import state_dir
from gptoss_cloud.contract.store.objects import is_remote, open_store
from gptoss_cloud.trainer.programs.proc_identity import identity


_RANK0_PREFIX = re.compile(rb"^\[[^\]]*?0\]:")


_ROOT_CAUSE = re.compile(r"local_rank:\s*(\d+)")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_attempt(run_id: str, home: str, attempt: int, cmd: list[str], *, echo: bool) -> int:
    """Run one torchrun attempt to the end: record it, tee its output, report the failing rank."""
    sd = state_dir(run_id, home)
    sd.mkdir(parents=True, exist_ok=True)
    (sd / "cancel").unlink(missing_ok=True)
    log_path = (sd / "logs" if is_remote(home) else Path(home) / "logs") / f"attempt-{attempt}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Each pid goes with its identity (start time, command line): cancel signals it only while both match.
    rec = {"run_id": run_id, "attempt": attempt, "supervisor_pid": os.getpid(), "supervisor": identity(os.getpid()),
           "started": now(), "command": cmd, "nproc": int(cmd[cmd.index("--nproc-per-node") + 1])}
    write_json(sd / "run.json", rec)

    from gptoss_cloud.contract.spec import pod_environ

    env = pod_environ(os.environ)  # this shell's GPTOSS_* settings are in the resolved spec already
    # Share the cores (within a container's CPU limit) between the ranks instead of torchrun's one thread each.
    from gptoss_cloud.contract.hostinfo import usable_cpus

    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // rec["nproc"])))
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    rec["torchrun_pid"] = proc.pid
    rec["torchrun"] = identity(proc.pid)
    write_json(sd / "run.json", rec)

    def forward(signum, _frame):  # Ctrl-C or `cancel`: stop torchrun, which stops its workers
        (sd / "cancel").write_text(now())
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
    rec.update(state=state, returncode=rc, finished=now())
    write_json(sd / "run.json", rec)
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


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gptoss_cloud.trainer.programs.supervisor")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--attempt", type=int, required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    return run_attempt(a.run_id, a.home, a.attempt, cmd, echo=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
