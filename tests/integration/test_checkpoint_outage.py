"""The S3 endpoint goes away in the middle of a checkpoint upload, for real.

The trainer talks to the moto server through a TCP relay (tcp_proxy.py); SIGKILLing the relay resets
every connection and refuses new ones, as a restarted endpoint or a cut network does, while the
objects already stored survive behind it. Back within checkpoint.store_retry_s: the save goes on and
publishes a manifest that matches the objects. Back too late: the save fails with one line, the
previous checkpoint stays published and is what the next attempt restores.
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, build_model
from gptoss_cloud.contract.errors import StoreError
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import open_store
from gptoss_cloud.trainer.checkpoint import publish as publish_mod
from gptoss_cloud.trainer.checkpoint import manifest as cm
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer
from support import free_port

PROXY = pathlib.Path(__file__).with_name("tcp_proxy.py")


class Relay:
    def __init__(self, target: str):
        u = urllib.parse.urlparse(target)
        self.host, self.port, self.listen = u.hostname, u.port, free_port()
        self.url = f"http://127.0.0.1:{self.listen}"
        self.proc = None
        self.timers: list[threading.Timer] = []
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(PROXY), str(self.listen), self.host, str(self.port)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def start_later(self, delay: float) -> None:
        t = threading.Timer(delay, self.start)
        self.timers.append(t)
        t.start()

    def close(self) -> None:
        for t in self.timers:  # a failed test must not leave a relay started after it
            t.cancel()
            t.join()
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def relay(s3_env, s3_bucket, monkeypatch):
    r = Relay(s3_env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", r.url)  # the trainer only ever sees the relay
    yield r
    r.close()


def _state():
    model = build_model("full")
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2), "data": DataPosition(1, 0)}


def _train_step(st):
    ids = st["data"].next_batch(8, 256)
    st["model"](input_ids=ids, labels=ids).loss.backward()
    st["optimizer"].step()
    st["optimizer"].zero_grad()


def _cut_during_upload(monkeypatch, relay: Relay, step: int, back_after: float | None):
    """After the first file of ``step`` is uploaded, kill the relay; restart it ``back_after`` s later."""
    real = publish_mod.upload_files

    def cut(store, items, **kw):
        if not any(f"step-{step}/" in key for _, key in items):
            return real(store, items, **kw)
        real(store, items[:1], **kw)
        relay.kill()
        if back_after is not None:
            relay.start_later(back_after)
        return real(store, items[1:], **kw)

    monkeypatch.setattr(publish_mod, "upload_files", cut)


def _matches_objects(ckpts, step: int) -> None:
    m = cm.read_manifest(ckpts, step, None)
    for rel, want in m.files.items():
        data = ckpts.read_bytes(f"step-{step}/{rel}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (want["size"], want["sha256"]), rel


def _spec(tmp_path, retry_s: float):
    return RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {
        "keep_last": 5, "store_retry_s": retry_s, "local_dir": str(tmp_path / "local"), "writer_threads": 2}})


def test_endpoint_back_within_the_retry_window_the_save_goes_on(relay, s3_bucket, tmp_path, monkeypatch):
    spec, home = _spec(tmp_path, 30), f"{s3_bucket}/outage-short"
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = _state()
    ck.save(1, st)
    _train_step(st)
    _cut_during_upload(monkeypatch, relay, 2, back_after=2.0)
    t = time.monotonic()
    ck.save(2, st)
    ck.close()
    assert time.monotonic() - t >= 2.0  # it really waited for the endpoint
    ckpts = open_store(home).child("checkpoints")
    assert cm.list_published(ckpts) == [2, 1]
    _matches_objects(ckpts, 2)
    want = {k: v.detach().clone() for k, v in st["model"].state_dict().items()}
    st2 = _state()
    assert Checkpointer(_spec(tmp_path / "b", 30).checkpoint, home, spec=spec).restore(st2) == 2
    assert all(torch.equal(v, want[k]) for k, v in st2["model"].state_dict().items())


def test_endpoint_gone_past_the_retry_window_fails_with_one_line(relay, s3_bucket, tmp_path, monkeypatch):
    spec, home = _spec(tmp_path, 2), f"{s3_bucket}/outage-long"
    ck = Checkpointer(spec.checkpoint, home, spec=spec)
    st = _state()
    ck.save(1, st)
    ck.wait()
    saved = {k: v.detach().clone() for k, v in st["model"].state_dict().items()}
    _train_step(st)
    _cut_during_upload(monkeypatch, relay, 2, back_after=None)
    t = time.monotonic()
    with pytest.raises(StoreError) as e:
        ck.save(2, st)
    took = time.monotonic() - t
    msg = e.value.message
    assert "\n" not in msg and f"{home}/checkpoints/step-2/" in msg
    assert "cannot reach the S3 endpoint" in msg and "still failing after 2s of retries" in msg
    assert 2.0 <= took < 20, took  # bounded by checkpoint.store_retry_s (plus botocore's quick attempts)
    relay.start()  # the endpoint returns: nothing was lost, step 2 was never published
    ckpts = open_store(home).child("checkpoints")
    assert cm.list_published(ckpts) == [1]
    st2 = _state()
    assert Checkpointer(_spec(tmp_path / "b", 30).checkpoint, home, spec=spec).restore(st2) == 1
    assert all(torch.equal(v, saved[k]) for k, v in st2["model"].state_dict().items())
