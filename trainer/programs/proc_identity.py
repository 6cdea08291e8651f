"""Is pid N still the process we started? A pid alone is not an identity: it is reused.

``run.json`` outlives its processes (a reboot, a killed launcher), and the kernel hands the same pid
to the next process that asks. Signalling a recorded pid without checking would stop whatever runs
under it now. We record, next to each pid, its start time in clock ticks since boot (field 22 of
``/proc/<pid>/stat``, which never changes for a process and differs for its successor) and its
command line, and a pid counts as ours only while both still match.
"""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name sits in parentheses and may itself hold spaces or ')': split after the last one.
    head, sep, rest = raw.rpartition(")")
    if not sep:
        return None
    return [head] + rest.split()  # rest[0] is field 3 (state)


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 21:
        return None
    try:
        return int(fields[20])  # field 22 of stat: fields[1] is field 3
    except ValueError:
        return None


def state_of(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[1] if fields and len(fields) > 1 else None


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    try:
        return int(fields[3]) if fields and len(fields) > 3 else None
    except ValueError:
        return None


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def identity(pid: int) -> dict | None:
    """What run.json records beside a pid; None when the process is gone (or /proc is not there)."""
    ticks, cmd = start_ticks(pid), cmdline(pid)
    if ticks is None or cmd is None:
        return None
    return {"pid": pid, "start_ticks": ticks, "cmdline": cmd}


def running(pid: int | None) -> bool:
    """Whether some process (not a zombie) has this pid now, whoever it is."""
    return bool(pid) and state_of(pid) not in (None, "Z", "X")


def is_ours(pid: int | None, recorded: dict | None) -> bool:
    """True only if ``pid`` runs, is not a zombie, and has the start time and command line recorded for it."""
    if not running(pid) or not isinstance(recorded, dict) or recorded.get("pid") != pid:
        return False
    return start_ticks(pid) == recorded.get("start_ticks") and cmdline(pid) == recorded.get("cmdline")
