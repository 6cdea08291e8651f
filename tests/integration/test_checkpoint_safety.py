"""A bucket someone else can write must not become code execution, nor a silently wrong resume.

One process, no torch.distributed: the Checkpointer saves a tiny GPT-OSS twice, then the second
checkpoint is attacked or damaged and the restore must fall back to the first with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))  # noqa: E402
from ckpt_worker import DataPosition, build_model, params, train_state, train_step
from gptoss_cloud.contract.errors import PlanError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import open_store
from gptoss_cloud.trainer.checkpoint import manifest as cm
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
from gptoss_cloud.trainer.checkpoint.room import check_local_room, checkpoint_bytes
from gptoss_cloud.trainer.checkpoint.safety import UnsafeCheckpointError, safe_load_metadata
from gptoss_cloud.trainer.checkpoint.state import RNGState


def _state(method="full"):
    return train_state(method, rng=RNGState())


@pytest.fixture
def two_checkpoints(tmp_path):
    spec = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"keep_last": 5}})
    home = str(tmp_path / "run-x")
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = _state()
    snaps = {}
    for step in (1, 2):
        train_step(st)
        ck.save(step, st)
        snaps[step] = params(st["model"])
    ck.close()
    return spec, home, snaps


def _restore(spec, home):
    st = _state()
    step = Checkpointer(spec.checkpoint, home, spec=spec).restore(st)
    return step, st


def test_round_trip_and_no_overwrite(two_checkpoints):
    spec, home, snaps = two_checkpoints
    step, st = _restore(spec, home)
    assert step == 2 and st["data"].samples == 2
    for k, v in params(st["model"]).items():
        assert torch.equal(v, snaps[2][k]), k
    m = cm.read_manifest(open_store(home).child("checkpoints"), 2, None)
    assert {".metadata", "__0_0.distcp", "extra/rank-0.json", "spec.yaml"} <= set(m.files)


def _rewrite(home, step, rel, data: bytes):
    """What an attacker with bucket access (and no signing key) does: swap a file, fix its checksum."""
    ck = open_store(home).child("checkpoints")
    ck.write_bytes(f"step-{step}/{rel}", data)
    body = json.loads(ck.read_bytes(f"step-{step}/manifest.json"))
    body["files"][rel] = {"size": len(data), "sha256": __import__("hashlib").sha256(data).hexdigest()}
    ck.write_bytes(f"step-{step}/manifest.json", json.dumps(body).encode())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_metadata_is_refused_and_never_run(two_checkpoints, tmp_path, monkeypatch, caplog):
    spec, home, snaps = two_checkpoints
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    payload = pickle.dumps(_Evil())
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle posix.system"):
        safe_load_metadata(payload, "x/.metadata")
    _rewrite(home, 2, ".metadata", payload)
    with caplog.at_level(logging.WARNING, logger="gptoss_cloud.checkpoint"):
        step, st = _restore(spec, home)
    assert step == 1 and not marker.exists()
    assert "step-2 is unusable" in caplog.text and "refusing to unpickle" in caplog.text
    for k, v in params(st["model"]).items():
        assert torch.equal(v, snaps[1][k]), k


def test_corrupted_shard_falls_back_with_warning(two_checkpoints, caplog):
    spec, home, snaps = two_checkpoints
    shard = open_store(home).child("checkpoints/step-2")
    data = bytearray(shard.read_bytes("__0_0.distcp"))
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes("__0_0.distcp", bytes(data))
    with caplog.at_level(logging.WARNING, logger="gptoss_cloud.checkpoint"):
        step, _ = _restore(spec, home)
    assert step == 1
    assert "sha256 mismatch" in caplog.text and "falling back" in caplog.text


def test_signed_checkpoints_refuse_tampering(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(cm.KEY_ENV, "k3y")
    spec = RunSpec.model_validate({"method": {"kind": "full"}})
    home = str(tmp_path / "run-s")
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = _state()
    for step in (1, 2):
        train_step(st)
        ck.save(step, st)
    assert cm.read_manifest(open_store(home).child("checkpoints"), 2, b"k3y").signed
    _rewrite(home, 2, "extra/rank-0.json", b'{"__dict__": {}}')
    with caplog.at_level(logging.WARNING, logger="gptoss_cloud.checkpoint"):
        step, _ = _restore(spec, home)
    assert step == 1 and "signature does not verify" in caplog.text
    monkeypatch.setenv(cm.KEY_ENV, "another")
    with pytest.raises(cm.CheckpointError, match="no usable checkpoint"):
        _restore(spec, home)


def test_lora_checkpoint_holds_only_the_adapter(tmp_path):
    spec = RunSpec.model_validate({"method": {"kind": "lora"}})
    home = str(tmp_path / "run-l")
    st = _state("lora")
    train_step(st)
    Checkpointer(spec.checkpoint, home, spec=spec).save(1, st)
    want = {k: v.detach().clone() for k, v in st["model"].named_parameters() if v.requires_grad}
    st2 = _state("lora")
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(st2) == 1
    got = dict(st2["model"].named_parameters())
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    md = safe_load_metadata(open_store(home).read_bytes("checkpoints/step-1/.metadata"))
    model_keys = [k for k in md.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)
    assert json.loads(open_store(home).read_bytes("checkpoints/step-1/adapter_config.json"))["r"] == 4


def test_local_room_check_fails_early_with_numbers(tmp_path):
    spec = RunSpec.model_validate({"model": {"name": "120b"}, "method": {"kind": "full"}, "parallelism": {"nodes": 2}})
    one = checkpoint_bytes(spec)
    assert 1.3e12 < one < 1.5e12  # ~1.4 TB for a 120b full fine-tune: fp32 masters + fp32 AdamW moments, 12 B/param
    with pytest.raises(PlanError) as e:
        check_local_room(spec, tmp_path)
    assert "GiB free" in e.value.message and "two checkpoints" in e.value.message and str(tmp_path) in e.value.message
    tiny = RunSpec.model_validate({"model": {"name": "tiny"}})
    assert check_local_room(tiny, tmp_path / "not-yet") > 0


def test_loop_trainstate_is_accepted(tmp_path):
    """The loop hands over a TrainState-like object (module, optimizer, scheduler, data, step, tokens, extra)."""
    from types import SimpleNamespace

    spec = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"every_steps": 1}})
    home = str(tmp_path / "run-t")
    model = build_model("full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    ts = SimpleNamespace(module=model, optimizer=opt, scheduler=sched, data=DataPosition(1, 0), step=0, tokens=0, extra={})
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    ck.restore(ts)
    train_step({"model": model, "optimizer": opt, "data": ts.data})
    sched.step()
    ts.step, ts.tokens, ts.extra["note"] = 1, 8, "x"
    assert ck.maybe_save(1, ts, final=True)
    ts2 = SimpleNamespace(module=build_model("full"), optimizer=None, scheduler=None, data=DataPosition(1, 0), step=0, tokens=0, extra={})
    ts2.optimizer = torch.optim.AdamW(ts2.module.parameters(), lr=1e-2)
    ts2.scheduler = torch.optim.lr_scheduler.LambdaLR(ts2.optimizer, lambda s: 0.5**s)
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(ts2) == 1
    assert (ts2.step, ts2.tokens, ts2.extra, ts2.data.samples) == (1, 8, {"note": "x"}, 1)
    assert ts2.scheduler.state_dict()["last_epoch"] == 1 and ts2.optimizer.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_planted_pickle_on_s3_is_rejected_unpublished_and_re_saved(s3_bucket, s3_env, tmp_path, monkeypatch, caplog):
    """On S3 a rejected checkpoint must really lose its manifest (a single-key delete), so the run's
    next save of that step is made rather than skipped as "already published"."""
    spec = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"keep_last": 5, "local_dir": str(tmp_path / "l1")}})
    home = f"{s3_bucket}/pickled"
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = _state()
    for step in (1, 2):
        train_step(st)
        ck.save(step, st)
    ck.close()
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    _rewrite(home, 2, ".metadata", pickle.dumps(_Evil()))
    ckpts = open_store(home).child("checkpoints")
    spec2 = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"keep_last": 5, "local_dir": str(tmp_path / "l2")}})
    st2 = _state()
    ck2 = Checkpointer(spec2.checkpoint, home, spec=spec2)
    with caplog.at_level(logging.WARNING, logger="gptoss_cloud.checkpoint"):
        assert ck2.restore(st2) == 1
    assert not marker.exists() and "refusing to unpickle" in caplog.text
    assert cm.list_published(ckpts) == [1]  # the manifest is gone from the bucket, kept aside as evidence
    assert ckpts.exists("step-2/manifest.rejected.json") and not ckpts.exists("step-2/manifest.json")
    train_step(st2)
    assert ck2.maybe_save(2, st2, last=True)  # saved again, not skipped
    ck2.close()
    m = cm.read_manifest(ckpts, 2, None)
    assert m.files[".metadata"]["sha256"] == cm.sha256_file(tmp_path / "l2" / "step-2" / ".metadata")
    want = params(st2["model"])
    step, st3 = _restore(spec2, home)
    assert step == 2 and all(torch.equal(v, want[k]) for k, v in params(st3["model"]).items())
