"""The parts of a save that are not DCP's own write: each rank's shards as several files written and
hashed in parallel, and the removal of older checkpoints off the path that blocks the training loop.

One process (no torch.distributed) and a tiny GPT-OSS; the 2-process multi-file resume is in
test_checkpoint_resume.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import threading

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, train_state, train_step  # noqa: E402
from gptoss_cloud.contract.errors import SpecError, StoreError  # noqa: E402
from gptoss_cloud.contract.spec import RunSpec, spec_from_yaml_text  # noqa: E402
from gptoss_cloud.contract.store.objects import open_store  # noqa: E402
from gptoss_cloud.trainer.checkpoint import publish as publish_mod, save as save_mod  # noqa: E402
from gptoss_cloud.trainer.checkpoint import manifest as cm  # noqa: E402
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer, writer_threads  # noqa: E402


def _spec(**ckpt):
    return RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": ckpt})


def _metrics(home) -> list[dict]:
    rows = [json.loads(line) for line in (pathlib.Path(home) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "checkpoint"]


# ------------------------------------------------------------------------------------ writer threads
def test_writer_threads_auto_is_this_ranks_share_of_its_cores():
    cores = len(os.sched_getaffinity(0))
    assert writer_threads("auto", {}) == max(1, min(8, cores))
    assert writer_threads("auto", {"LOCAL_WORLD_SIZE": "4"}) == max(1, min(8, cores // 4))
    assert writer_threads("auto", {"LOCAL_WORLD_SIZE": str(cores * 2)}) == 1  # more ranks than cores: still one
    assert writer_threads("auto", {"LOCAL_WORLD_SIZE": "nonsense"}) == max(1, min(8, cores))
    assert writer_threads(5, {"LOCAL_WORLD_SIZE": "8"}) == 5  # an explicit setting is taken as is


def test_writer_threads_spec_field():
    assert RunSpec().checkpoint.writer_threads == "auto"
    assert _spec(writer_threads=4).checkpoint.writer_threads == 4
    for bad in (0, 65, True, "many"):
        with pytest.raises(SpecError, match="writer_threads"):
            spec_from_yaml_text(json.dumps({"checkpoint": {"writer_threads": bad}}), "spec.yaml")


# ----------------------------------------------------------------------------------- parallel hashing
def test_parallel_hashing_matches_serial(tmp_path):
    sizes = {"a.bin": 3 * 1024 * 1024 + 7, "b.bin": 10, "c.bin": 0, "sub/d.bin": 1024 * 1024}
    for rel, n in sizes.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(os.urandom(n))
    got = cm.file_entries(tmp_path, list(sizes), threads=4)
    want = {rel: {"size": n, "sha256": hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()} for rel, n in sizes.items()}
    assert got == want and cm.file_entries(tmp_path, list(sizes), threads=1) == want
    assert cm.sha256_file(tmp_path / "a.bin", bufsize=4096) == want["a.bin"]["sha256"]  # a partial last read
    with pytest.raises(FileNotFoundError):
        cm.file_entries(tmp_path, ["a.bin", "missing.bin"], threads=4)


def test_several_files_per_rank_all_in_the_manifest_and_restored_exactly(tmp_path, caplog):
    home = str(tmp_path / "run")
    spec = _spec(writer_threads=3)
    st = train_state()
    train_step(st)
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    ck.save(1, st)
    ck.close()
    want = {k: v.detach().clone() for k, v in st["model"].state_dict().items()}
    want_opt = st["optimizer"].state_dict()["state"]
    folder = tmp_path / "run" / "checkpoints" / "step-1"
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__0_1.distcp", "__0_2.distcp"]
    manifest = cm.read_manifest(open_store(home).child("checkpoints"), 1, None)
    assert {r for r in manifest.files if r.endswith(".distcp")} == set(shards)
    for rel in shards:  # every shard file is listed with its own checksum
        assert manifest.files[rel] == cm.file_entry(folder / rel)
    (ev,) = _metrics(home)
    assert ev["writer_threads"] == 3 and ev["hash_s"] >= 0 and ev["write_s"] + ev["hash_s"] <= ev["total_s"]

    st2 = train_state()
    st2["data"] = DataPosition(1, 0)
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(st2) == 1
    for k, v in st2["model"].state_dict().items():
        assert torch.equal(v, want[k]), k
    got_opt = st2["optimizer"].state_dict()["state"]
    assert all(torch.equal(got_opt[i]["exp_avg"], want_opt[i]["exp_avg"]) for i in want_opt)
    assert st2["data"].samples == 1

    # A damaged second shard file is caught by the (parallel) verification: no usable checkpoint.
    data = bytearray((folder / "__0_1.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "__0_1.distcp").write_bytes(bytes(data))
    with pytest.raises(cm.CheckpointError, match=r"__0_1.distcp: sha256 mismatch"):
        Checkpointer(spec.checkpoint, home, spec=spec).restore(train_state())


# ------------------------------------------------------------------------------- pruning off the loop
def test_sync_save_returns_before_older_checkpoints_are_pruned(tmp_path, monkeypatch):
    """The real prune, held at a gate: save() returns while it waits, wait() joins it."""
    home = str(tmp_path / "run")
    spec = _spec(keep_last=1, writer_threads=2)
    gate, entered = threading.Event(), threading.Event()
    real_prune = publish_mod.prune

    def gated_prune(*a, **kw):
        entered.set()
        gate.wait(10)
        return real_prune(*a, **kw)

    monkeypatch.setattr(publish_mod, "prune", gated_prune)
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    ckpts = open_store(home).child("checkpoints")
    st = train_state()
    ck.save(1, st)
    gate.set()
    ck.wait()
    gate.clear()
    entered.clear()
    train_step(st)
    ck.save(2, st)  # returns with step 2 published and the prune of step 1 still waiting at the gate
    assert entered.wait(10) and not gate.is_set()
    assert cm.list_published(ckpts) == [2, 1] and (tmp_path / "run" / "checkpoints" / "step-1").exists()
    assert [e["step"] for e in _metrics(home)] == [1]  # step 2's event is recorded once its prune is done
    gate.set()
    ck.close()
    assert cm.list_published(ckpts) == [2] and not (tmp_path / "run" / "checkpoints" / "step-1").exists()
    ev = _metrics(home)[-1]
    assert ev["step"] == 2 and ev["mode"] == "sync" and ev["prune_s"] > 0 and ev["blocking_s"] >= ev["total_s"]


def test_a_failed_prune_surfaces_at_the_next_wait(tmp_path, monkeypatch):
    home = str(tmp_path / "run")
    spec = _spec(keep_last=1)
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = train_state()
    ck.save(1, st)
    ck.wait()

    def refused(prefix):  # what an S3 bucket without delete permission answers
        raise StoreError(f"{ck.ckpts.uri}/{prefix}: AccessDenied (delete)")

    monkeypatch.setattr(ck.ckpts, "delete", refused)
    train_step(st)
    ck.save(2, st)  # published; the failure comes from the background clean-up
    with pytest.raises(cm.CheckpointError, match=r"step 2 is published, but removing older checkpoints .* AccessDenied"):
        ck.wait()
    ck.wait()  # reported once
    assert cm.list_published(open_store(home).child("checkpoints")) == [2, 1]
    assert [e["step"] for e in _metrics(home)] == [1, 2]  # the save itself is still recorded
    monkeypatch.undo()
    train_step(st)
    ck.save(3, st)
    ck.close()
    assert cm.list_published(open_store(home).child("checkpoints")) == [3]


def test_next_save_joins_the_pending_prune(tmp_path, monkeypatch):
    """A save starts only after the previous save's clean-up: never two deletions of the store at once."""
    home = str(tmp_path / "run")
    spec = _spec(keep_last=1)
    order = []
    real_prune = publish_mod.prune

    def slow_prune(ckpts, keep_last, newest):
        order.append(("prune-start", newest))
        threading.Event().wait(0.3)
        out = real_prune(ckpts, keep_last, newest)
        order.append(("prune-end", newest))
        return out

    monkeypatch.setattr(publish_mod, "prune", slow_prune)
    real_save = save_mod.dcp.save

    def recorded_save(*a, **kw):
        order.append(("write", None))
        return real_save(*a, **kw)

    monkeypatch.setattr(save_mod.dcp, "save", recorded_save)
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = train_state()
    for step in (1, 2, 3):
        ck.save(step, st)
    ck.close()
    assert order == [("write", None), ("prune-start", 1), ("prune-end", 1), ("write", None), ("prune-start", 2),
                     ("prune-end", 2), ("write", None), ("prune-start", 3), ("prune-end", 3)]
    assert cm.list_published(open_store(home).child("checkpoints")) == [3]
    assert [e["wait_prev_s"] > 0.1 for e in _metrics(home)] == [False, True, True]
