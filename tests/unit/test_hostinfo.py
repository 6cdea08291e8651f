"""CPUs a process may use: affinity capped by the cgroup quota a Kubernetes CPU limit sets."""

from __future__ import annotations

import os

import pytest

from gptoss_cloud.contract.hostinfo import cgroup_cpu_quota, usable_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "max 100000\n"}, None),                                    # v2, no limit
    ({"cpu.max": "250000 100000\n"}, 2.5),                                  # v2, limits.cpu: 2500m
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),   # v1, no limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    ({"cpu.max": "garbage\n"}, None),                                       # unreadable: no cap
    ({}, None),                                                             # no cgroup files at all
])
def test_cgroup_quota(tmp_path, files, quota):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_usable_cpus_is_the_affinity_capped_by_the_quota(tmp_path):
    assert usable_cpus(tmp_path) == _affinity()  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of time: one thread, not two
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(_affinity() + 8) * 100000} 100000\n")  # a quota above the cores
    assert usable_cpus(tmp_path) == _affinity()


def test_checkpoint_writers_and_offload_threads_respect_the_limit(monkeypatch):
    from gptoss_cloud.contract import hostinfo
    from gptoss_cloud.trainer.checkpoint.checkpointer import writer_threads
    from gptoss_cloud.trainer.parallel import DistInfo, offload_host_threads

    monkeypatch.setattr(hostinfo, "usable_cpus", lambda root=hostinfo.CGROUP_ROOT: 6)
    assert writer_threads("auto", {"LOCAL_WORLD_SIZE": "2"}) == 3
    import torch

    before = torch.get_num_threads()
    try:
        info = DistInfo(rank=0, world_size=4, local_rank=0, local_world_size=4, device=torch.device("cpu"))
        assert offload_host_threads(info) == 1  # 6 usable CPUs over 4 ranks
        assert offload_host_threads(info, 3) == 3 == torch.get_num_threads()  # parallelism.cpu_threads
    finally:
        torch.set_num_threads(before)
