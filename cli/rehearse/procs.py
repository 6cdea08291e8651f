"""Node groups as processes: start one per pod, kill a whole group as a node loss does, tear the rest
down as deleting pods does (SIGTERM, then SIGKILL after the grace period), one attempt at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from gptoss_cloud.rehearse.pods import GroupPlan
from gptoss_cloud.contract.store.objects import open_store


# ------------------------------------------------------------------------------------- processes
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of ``pid`` and all its descendants. torchrun starts each worker in its own
    session, so a process-group kill would miss them; the tree is what a pod's container holds."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        start = _proc_start(p)
        if start is not None:
            out.append((p, start))
            todo += children.get(p, [])
    return out


def kill_tree(tree: list[tuple[int, str]], sig: int) -> None:
    for pid, start in tree:
        if _proc_start(pid) == start:  # still the process we started, not a reused pid
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _tree_alive(tree: list[tuple[int, str]]) -> bool:
    for pid, start in tree:
        st = _proc_start(pid)
        if st == start:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
            except OSError:
                pass
    return False


@dataclass
class Group:
    plan: GroupPlan
    proc: subprocess.Popen
    log: Any
    tree: list[tuple[int, str]] = field(default_factory=list)

    def snapshot(self) -> list[tuple[int, str]]:
        now = process_tree(self.proc.pid)
        known = {p for p, _ in self.tree}
        self.tree += [t for t in now if t[0] not in known]
        return self.tree


def start_group(plan: GroupPlan, base_env: Mapping[str, str], log_path: Path, header: str) -> Group:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    log.write(f"===== {header} =====\n$ {' '.join(plan.command)}\n".encode())
    log.flush()
    env = {**base_env, **plan.env}
    proc = subprocess.Popen(plan.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return Group(plan, proc, log)


def teardown(groups: list[Group], grace_s: float) -> None:
    """What deleting the pods does: SIGTERM to each container's first process, SIGKILL to all after the grace."""
    live = [g for g in groups if g.proc.poll() is None or _tree_alive(g.snapshot())]
    for g in live:
        g.snapshot()
        try:
            os.kill(g.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_tree_alive(g.tree) for g in live):
        time.sleep(0.1)
    for g in live:
        kill_tree(g.tree, signal.SIGKILL)
    for g in groups:
        try:
            g.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        g.log.close()


# --------------------------------------------------------------------------------------- attempts
@dataclass
class Attempt:
    run_id: str
    number: int
    started: str
    t0: float
    ended: str | None = None
    seconds: float | None = None
    state: str = "Running"   # Succeeded | Failed | Killed | TimedOut
    returncodes: list[int | None] = field(default_factory=list)
    killed_node: int | None = None
    kill_time: str | None = None
    kill_after_s: float | None = None
    published_at_kill: list[int] | None = None
    teardown_s: float | None = None
    master_port: str | None = None
    note: str | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "t0"}
        return {k: v for k, v in d.items() if v is not None}


def drop_folder(folder: Path) -> None:
    """A finished attempt's pod volumes go with its pods (a restart gets fresh ones); checkpoint copies are large."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def published_steps(home: str) -> list[int]:
    from gptoss_cloud.trainer.checkpoint.manifest import list_published  # torch-free

    return list_published(open_store(home).child("checkpoints"))


def run_attempt(plans: list[GroupPlan], base_env: Mapping[str, str], log_dir: Path, attempt: Attempt, *,
                home: str, deadline: float, grace_s: float,
                kill: tuple[int, int] | None = None, echo: Callable[[str], None] = lambda s: None) -> Attempt:
    """Start every group; return when all succeed, one fails (the rest are torn down), the kill fires
    or the deadline passes."""
    attempt.master_port = plans[0].env.get("MASTER_PORT")
    groups = [start_group(p, base_env, log_dir / f"node-{p.index}.log", f"{attempt.run_id} attempt {attempt.number} "
                          f"node {p.index} {now_iso()}") for p in plans]
    try:
        last_poll = last_snap = 0.0
        while True:
            codes = [g.proc.poll() for g in groups]
            if time.monotonic() - last_snap > 1.0:  # know the workers before a dead torchrun orphans them
                last_snap = time.monotonic()
                for g in groups:
                    g.snapshot()
            if kill is not None and time.monotonic() - last_poll > 0.25:
                last_poll = time.monotonic()
                node, step = kill
                steps = published_steps(home)
                if steps and steps[0] >= step:
                    victim = groups[node]
                    kill_tree(victim.snapshot(), signal.SIGKILL)
                    attempt.kill_time, attempt.killed_node = now_iso(), node
                    attempt.kill_after_s = round(time.monotonic() - attempt.t0, 2)
                    attempt.published_at_kill = steps
                    echo(f"step {step}'s checkpoint is published (published: {steps}); SIGKILL node group {node}")
                    t = time.monotonic()
                    teardown(groups, grace_s)
                    attempt.teardown_s = round(time.monotonic() - t, 2)
                    attempt.state = "Killed"
                    break
            if all(c == 0 for c in codes):
                attempt.state = "Succeeded"
                if kill is not None:
                    attempt.state, attempt.note = "Failed", f"the run ended before step {kill[1]}'s checkpoint was seen"
                break
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                attempt.state = "Failed"
                attempt.note = f"node group {failed[0]} exited with code {codes[failed[0]]}" + _first_error(
                    log_dir / f"node-{failed[0]}.log", f"{attempt.run_id} attempt {attempt.number} ")
                teardown(groups, grace_s)
                break
            if time.monotonic() > deadline:
                attempt.state, attempt.note = "TimedOut", "the rehearsal's --timeout passed"
                teardown(groups, grace_s)
                break
            time.sleep(0.1)
    finally:
        if any(g.proc.poll() is None for g in groups):
            teardown(groups, grace_s)
        for g in groups:
            g.log.close()
    attempt.returncodes = [g.proc.returncode for g in groups]
    attempt.ended = now_iso()
    attempt.seconds = round(time.monotonic() - attempt.t0, 2)
    return attempt


def attempt_output(log_path: Path, marker: str) -> str:
    """One attempt's part of a group log (the logs of all attempts go to the same file)."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    parts = text.split(f"===== {marker}")
    return parts[-1] if len(parts) > 1 else ""


def _first_error(log_path: Path, marker: str) -> str:
    for line in attempt_output(log_path, marker).splitlines():
        if line.startswith("error:"):
            return f" ({line.strip()})"
    return ""
