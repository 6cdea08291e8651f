"""Measurements of checkpoint saves and merges: host memory peaks and the one-line summaries.

Peak host memory is the process's resident-set high-water mark: ``VmHWM`` in ``/proc/self/status``
on Linux, else ``resource.getrusage``'s ``ru_maxrss`` (KiB on Linux, bytes on macOS). ``ru_maxrss``
alone misleads on Linux: a process inherits, at exec, the peak of the process it was forked from (a
merge started by a big Python parent reports the parent's size), and it covers the whole life of the
process, so a merge at the end of a training run would report the training peak. Linux lets a process
reset its own mark (``5`` into ``/proc/self/clear_refs``), after which ``VmHWM`` is the peak since
then: ``PeakRss`` does that when it can, and says which peak it reports.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

GiB = 1024**3


def ru_maxrss_bytes() -> int:
    """getrusage's peak resident set, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def maxrss_bytes() -> int:
    """This process's own peak resident set in bytes (VmHWM; ru_maxrss where there is no /proc)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else ru_maxrss_bytes()


def rss_bytes() -> int | None:
    """The current resident set (Linux), in bytes."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


class PeakRss:
    """Peak host memory over a section of code: ``start()`` then ``peak()``.

    ``scope`` is ``"section"`` when the kernel's high-water mark was reset at ``start()`` (the peak is
    this section's), else ``"process"`` (the lifetime ru_maxrss, an upper bound).
    """

    def __init__(self) -> None:
        self.start_rss: int | None = None
        self.scope = "process"

    def start(self) -> "PeakRss":
        self.start_rss = rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "section" if _status_kib("VmHWM") is not None else "process"
        except OSError:  # not Linux, or /proc is read-only here
            self.scope = "process"
        return self

    def peak(self) -> int:
        return maxrss_bytes()


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def checkpoint_line(ev: dict) -> str:
    """One log line for a checkpoint event (see ``Checkpointer`` for the fields)."""
    return (f"checkpoint step {ev['step']} ({ev['mode']}): blocked {fmt_s(ev['blocking_s'])}, written {fmt_s(ev['write_s'])}, "
            f"hashing {fmt_s(ev.get('hash_s'))}, uploaded {fmt_s(ev.get('upload_s'))}, published {fmt_s(ev.get('total_s'))}, "
            f"pruning {fmt_s(ev.get('prune_s'))}; "
            f"{(ev.get('bytes') or 0) / GiB:.2f} GiB of shards ({(ev.get('manifest_bytes') or 0) / GiB:.2f} GiB, "
            f"{ev.get('files', 0)} files in all, {ev.get('writer_threads', 1)} writer threads) -> {ev.get('uri', '')}")
