"""How many CPUs this process may really use: its CPU affinity, capped by the cgroup CPU quota.

In a Kubernetes pod with ``resources.limits.cpu: 16`` on a 192-core node, ``os.cpu_count()`` and the
affinity mask both say 192 while the kernel throttles the pod to 16 CPUs' worth of time; sizing thread
pools (the offloaded optimizer step, checkpoint writers) from 192 oversubscribes the quota twelvefold.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_quota(root: str | Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup allows (``2.5`` for 250000/100000), None when unlimited or unknown.
    cgroup v2 (``cpu.max``) first, then v1 (``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``)."""
    root = Path(root)
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus(root: str | Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (affinity), at most the cgroup quota rounded down (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS)
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)
