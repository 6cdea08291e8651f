"""Async saves that copy the state to host memory in the background (``overlap_staging``): the save
returns at once, the loop's next forward and backward run beside the copy, and ``before_update`` holds
the optimizer step until the copy is done, so the checkpoint holds the state as it was at the save."""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ckpt_worker import DataPosition, build_model  # noqa: E402
from gptoss_cloud.contract.spec import RunSpec  # noqa: E402
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer  # noqa: E402


def _state():
    model = build_model("full")
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2), "data": DataPosition(1, 0)}


def _forward_backward(state):
    ids = state["data"].next_batch(8, 256)
    state["model"](input_ids=ids, labels=ids).loss.backward()


def _step(state):
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def test_async_save_stages_beside_the_next_step_and_keeps_the_saved_state(tmp_path):
    spec = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"async_save": True}})
    home = str(tmp_path / "run")
    st = _state()
    _forward_backward(st)
    _step(st)
    ck = Checkpointer(spec.checkpoint, home, spec=spec, overlap_staging=True)
    ck.save(1, st)
    want = {k: v.detach().clone() for k, v in st["model"].state_dict().items()}
    want_avg = {i: s["exp_avg"].clone() for i, s in st["optimizer"].state_dict()["state"].items()}
    _forward_backward(st)  # the next step's compute runs while the state is copied
    ck.before_update()  # then the copy is complete: the optimizer may change the state
    _step(st)
    with torch.no_grad():
        for p in st["model"].parameters():
            p.add_(1.0)  # and anything else may too
    ck.close()
    (ev,) = ck.events
    assert ev["mode"] == "async" and 0 < ev["staged_s"] <= ev["write_s"] <= ev["total_s"]

    st2 = _state()
    assert Checkpointer(spec.checkpoint, home, spec=spec).restore(st2) == 1
    for k, v in st2["model"].state_dict().items():
        assert torch.equal(v, want[k]), k  # the state at the save, not after the later step and edits
    got = st2["optimizer"].state_dict()["state"]
    assert all(torch.equal(got[i]["exp_avg"], want_avg[i]) for i in want_avg)


def test_before_update_without_a_save_in_flight_is_a_no_op(tmp_path):
    spec = RunSpec.model_validate({"method": {"kind": "full"}, "checkpoint": {"async_save": True}})
    ck = Checkpointer(spec.checkpoint, str(tmp_path / "run"), spec=spec, overlap_staging=True)
    ck.before_update()
    ck.close()
    assert ck.events == []
