"""The checkpoint's non-tensor state is JSON, and survives a round trip exactly."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")


def test_rng_and_scheduler_state_round_trip():
    from gptoss_cloud.trainer.checkpoint.state import RNGState, dumps, loads

    rng = RNGState()
    random.seed(3)
    torch.manual_seed(3)
    saved = loads(dumps({"rng": rng.state_dict()}))["rng"]
    a = (random.random(), torch.rand(3))
    rng.load_state_dict(saved)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    sched.step()
    st = loads(dumps({"s": sched.state_dict(), "b": b"\x00\x01", "t": (1, (2, 3)), "bf": torch.ones(2, dtype=torch.bfloat16)}))
    assert st["s"] == sched.state_dict() and st["b"] == b"\x00\x01" and st["t"] == (1, (2, 3))
    assert st["bf"].dtype == torch.bfloat16


def test_unknown_types_are_refused_not_pickled():
    from gptoss_cloud.trainer.checkpoint.state import dumps

    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        dumps({"x": object()})
