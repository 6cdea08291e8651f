"""Each checkpoint save is measured (blocking, local write, upload, publish, bytes) and recorded in
metrics.jsonl; the real trainer records its step split and the end-of-run merge's measurements."""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, build_model  # noqa: E402
from gptoss_cloud.contract.spec import RunSpec  # noqa: E402
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer  # noqa: E402

FIELDS = {"event", "step", "mode", "wait_prev_s", "blocking_s", "write_s", "hash_s", "upload_s", "total_s", "prune_s",
          "bytes", "manifest_bytes", "files", "rank_bytes", "writer_threads"}


def events(home: pathlib.Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def shard_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.distcp"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_each_save_is_measured_and_recorded(mode, tmp_path, caplog):
    home, local = tmp_path / "run", tmp_path / "node"
    spec = RunSpec.model_validate({"checkpoint": {"every_steps": 1, "keep_last": 3, "async_save": mode == "async",
                                                  "local_dir": str(local)}})
    model = build_model("full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt, "data": DataPosition(1, 0)}
    ck = Checkpointer(spec.checkpoint, str(home), spec=spec)
    caplog.set_level(logging.INFO, logger="gptoss_cloud.checkpoint")
    for step in (1, 2):
        ids = state["data"].next_batch(8, 256)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        ck.maybe_save(step, state)
    ck.close()  # an async save still in flight is recorded by the time close() returns
    rows = events(home, "checkpoint")
    assert [r["step"] for r in rows] == [1, 2] and {r["mode"] for r in rows} == {mode}
    for r in rows:
        assert set(r) == FIELDS, r
        folder = home / "checkpoints" / f"step-{r['step']}"
        assert r["bytes"] == shard_bytes(folder) > 0  # the uploaded shards, from the manifest
        manifest = json.loads((folder / "manifest.json").read_text())
        assert r["manifest_bytes"] == sum(f["size"] for f in manifest["files"].values()) == r["rank_bytes"]
        assert r["files"] == len(manifest["files"])
        # in order: the loop is released, the shards are on local disk, uploaded, then the manifest published
        assert 0 <= r["write_s"] <= r["upload_s"] <= r["total_s"]
        # checksumming sits between the local write and the upload; pruning is timed on its own
        assert 0 <= r["hash_s"] and r["write_s"] + r["hash_s"] <= r["upload_s"] and r["prune_s"] >= 0
        assert 0 < r["blocking_s"] and r["wait_prev_s"] <= r["blocking_s"]
        if mode == "sync":
            assert r["blocking_s"] >= r["total_s"]  # a sync save holds the loop until it is published (not pruned)
        else:
            assert r["blocking_s"] <= r["total_s"]
    assert [{k: v for k, v in e.items() if k != "uri"} for e in ck.events] == rows  # kept in memory too
    assert sum("checkpoint step 2 (%s)" % mode in m for m in caplog.messages) == 1


def test_in_place_store_has_no_upload_time(tmp_path):
    home = tmp_path / "run"
    spec = RunSpec.model_validate({"checkpoint": {"every_steps": 1}})
    model = build_model("full")
    ck = Checkpointer(spec.checkpoint, str(home), spec=spec)
    ck.save(1, {"model": model})
    ck.close()
    (r,) = events(home, "checkpoint")
    assert r["upload_s"] is None and r["write_s"] <= r["total_s"] and r["bytes"] == shard_bytes(home / "checkpoints" / "step-1")


def _sample(length: int, seed: int):
    import random

    r = random.Random(seed)
    ids = [r.randrange(200_000) for _ in range(length)]
    return SimpleNamespace(input_ids=ids, labels=[-100] * 4 + ids[4:], position_ids=list(range(length)), seq_lens=[length])


def test_trainer_records_step_split_checkpoints_and_merge(tmp_path):
    """The real trainer (one CPU process, tiny preset, full fine-tune, async saves, merge at the end)."""
    from gptoss_cloud.trainer.train import run_training

    torch.set_num_threads(2)
    spec = RunSpec.model_validate({
        "model": {"name": "tiny", "init": "random"}, "data": {"max_seq_len": 32}, "method": {"kind": "full"},
        "optim": {"max_steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "step_split": True},
        "checkpoint": {"every_steps": 2, "async_save": True, "local_dir": str(tmp_path / "node")},
        "output": {"merge": True},
    })
    home = tmp_path / "run"
    ds = SimpleNamespace(train=[_sample(32, i) for i in range(4)], validation=[])
    summary = run_training(spec, "timing", str(home), datasets=ds, interactive=False)
    rows = [json.loads(line) for line in (home / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["data_s"] >= 0 and r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0
        assert r["data_s"] + r["fwd_bwd_s"] + r["optimizer_s"] <= r["step_s"] + 1e-3
        assert r["optimizer_share"] == pytest.approx(r["optimizer_s"] / r["step_s"], abs=1e-3)
    ck = events(home, "checkpoint")
    assert [(r["step"], r["mode"]) for r in ck] == [(2, "async"), (3, "async")]  # the last one too, before the merge
    # The trainer stages async saves in the background (staged_s) while the next step computes.
    assert all(set(r) == FIELDS | {"staged_s"} and r["bytes"] == shard_bytes(home / "checkpoints" / f"step-{r['step']}")
               for r in ck)
    assert all(0 < r["staged_s"] <= r["write_s"] for r in ck)
    (m,) = events(home, "merge")
    assert m["step"] == 3 and m["wall_s"] > 0 and m["peak_rss_gib"] > 0
    merged = home / "merged"
    from gptoss_cloud.contract.outputs import MANIFEST

    # Every file of the model; the folder's manifest, written after them, vouches for them and is not counted.
    assert m["bytes_written"] == sum(p.stat().st_size for p in merged.iterdir() if p.is_file() and p.name != MANIFEST)
    assert (merged / MANIFEST).is_file()
    saved = json.loads((home / "summary.json").read_text())
    assert saved["merge"] == {k: v for k, v in m.items() if k not in ("event",)} | {"step": 3}
    assert [c["step"] for c in saved["checkpoints"]] == [2, 3] and summary["merge"]["out"] == str(merged)


def test_step_split_is_off_by_default(monkeypatch):
    from gptoss_cloud.trainer.loop import Loop, StepStats

    monkeypatch.setenv("GPTOSS_STEP_SPLIT", "1")  # the retired variable changes nothing
    assert Loop.__dataclass_fields__["step_split"].default is False and RunSpec().optim.step_split is False
    assert StepStats(1, 0.0, 0.0, 0.0, 0, 0, 1.0).optimizer_s is None
