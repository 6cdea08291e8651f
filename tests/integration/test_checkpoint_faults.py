"""Faults injected for real into one process's saves and restores: a transient load error, a full disk.

Each test states what was lost (nothing: the last published checkpoint stays and is what the next
restore uses) and what the user saw (one line). The S3 outage is in test_checkpoint_outage.py and
the multi-process faults (a killed rank 0, a dead peer) in test_checkpoint_peers.py.
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import uuid

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import params, train_state, train_step
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import open_store
from gptoss_cloud.trainer.checkpoint import faults as ckpt_faults
from gptoss_cloud.trainer.checkpoint import manifest as cm
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
from gptoss_cloud.trainer.checkpoint.safety import FetchingReader


def _one_line(msg: str) -> str:
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture
def two_saved(tmp_path):
    spec = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"keep_last": 5}})
    home = str(tmp_path / "run")
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = train_state()
    for step in (1, 2):
        train_step(st)
        ck.save(step, st)
    ck.close()
    return spec, home, params(st["model"])


def _inject(monkeypatch, errors: list[BaseException]):
    """The next len(errors) tensor reads raise these, as a node short of memory or a dropped mount would."""
    real = FetchingReader.read_data

    def faulty(self, plan, planner):
        if errors:
            raise errors.pop(0)
        return real(self, plan, planner)

    monkeypatch.setattr(FetchingReader, "read_data", faulty)


def test_one_transient_load_error_is_retried_and_nothing_is_rejected(two_saved, monkeypatch, caplog):
    spec, home, want = two_saved
    monkeypatch.setattr(ckpt_faults, "LOAD_RETRY_DELAYS_S", (0.1, 0.1))
    _inject(monkeypatch, [MemoryError("could not allocate 2147483648 bytes")])
    st = train_state()
    with caplog.at_level(logging.WARNING, logger="gptoss_cloud.checkpoint"):
        assert Checkpointer(spec.checkpoint, home, spec=spec).restore(st) == 2  # the newest, not a fallback
    assert "transient error (MemoryError: could not allocate" in caplog.text and "falling back" not in caplog.text
    assert all(torch.equal(v, want[k]) for k, v in params(st["model"]).items())
    ckpts = open_store(home).child("checkpoints")
    assert cm.list_published(ckpts) == [2, 1] and not ckpts.exists("step-2/manifest.rejected.json")


def test_a_persistent_transient_error_fails_the_run_and_the_checkpoint_stays_published(two_saved, monkeypatch):
    spec, home, want = two_saved
    monkeypatch.setattr(ckpt_faults, "LOAD_RETRY_DELAYS_S", (0.1, 0.1))
    _inject(monkeypatch, [ConnectionResetError(104, "Connection reset by peer") for _ in range(3)])
    with pytest.raises(cm.CheckpointError) as e:
        Checkpointer(spec.checkpoint, home, spec=spec).restore(train_state())
    msg = _one_line(e.value.message)
    assert "step-2: loading failed 3 times with a transient error" in msg and "Connection reset by peer" in msg
    assert "stays published" in msg
    ckpts = open_store(home).child("checkpoints")
    assert cm.list_published(ckpts) == [2, 1] and not ckpts.exists("step-2/manifest.rejected.json")
    st = train_state()  # the next attempt, its node healthy again, resumes from the same checkpoint
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(st) == 2
    assert all(torch.equal(v, want[k]) for k, v in params(st["model"]).items())


def test_a_hash_mismatch_still_falls_back(two_saved):
    spec, home, _ = two_saved
    shard = pathlib.Path(home) / "checkpoints" / "step-2" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(train_state()) == 1
    assert cm.list_published(open_store(home).child("checkpoints")) == [1]  # integrity: rejected


# ------------------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path):
    # Room for the up-front check (two checkpoints of the tiny preset) and no more; filled right before the save.
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: pathlib.Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system holding ``folder``."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / f"filler-{uuid.uuid4().hex[:6]}", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_a_save_is_one_line_and_nothing_is_published(small_disk, tmp_path, async_save):
    spec = RunSpec.model_validate({"model": {"name": "tiny"}, "method": {"kind": "full"},
                                   "checkpoint": {"keep_last": 5, "async_save": async_save,
                                                  "local_dir": str(small_disk / "ck")}})
    home = str(tmp_path / "home")  # the store has room; the local scratch disk fills up
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = train_state()
    train_step(st)
    ck.save(1, st)
    ck.wait()
    saved = params(st["model"])
    _fill(small_disk, leave=64 * 1024)
    train_step(st)
    with pytest.raises(cm.CheckpointError) as e:
        ck.save(2, st)
        ck.wait()
    msg = _one_line(e.value.message)
    assert f"step 2: the disk holding {small_disk / 'ck' / 'step-2'} is full" in msg and "not published" in msg
    ckpts = open_store(home).child("checkpoints")
    assert cm.list_published(ckpts) == [1] and not any(k.startswith("step-2/") for k in ckpts.list(""))
    for filler in small_disk.glob("filler-*"):  # space freed, the next attempt resumes from step 1
        filler.unlink()
    st2 = train_state()
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(st2) == 1
    assert all(torch.equal(v, saved[k]) for k, v in params(st2["model"]).items())
