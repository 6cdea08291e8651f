"""The loop's checkpoint protocol is complete, and the real checkpointer and the no-op both satisfy it."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("torch")

from gptoss_cloud.contract.sections import CheckpointSection  # noqa: E402
from gptoss_cloud.trainer.checkpoint.checkpointer import Checkpointer  # noqa: E402
from gptoss_cloud.trainer.loop import CheckpointHooks, NoCheckpoints  # noqa: E402

METHODS = ("restore", "maybe_save", "before_update", "close")


@pytest.mark.parametrize("make", [lambda tmp: Checkpointer(CheckpointSection(), str(tmp)), lambda tmp: NoCheckpoints()],
                         ids=["Checkpointer", "NoCheckpoints"])
def test_implementations_satisfy_the_protocol(tmp_path, make):
    ck = make(tmp_path)
    assert isinstance(ck, CheckpointHooks) and ck.events == []
    for name in METHODS:
        want = inspect.signature(getattr(CheckpointHooks, name))
        got = inspect.signature(getattr(type(ck), name))
        # Every parameter the loop passes is accepted under the same name and kind.
        for p in want.parameters.values():
            assert p.name in got.parameters and got.parameters[p.name].kind == p.kind, (type(ck).__name__, name, p)


def test_the_loop_calls_only_what_the_protocol_declares():
    import ast

    from gptoss_cloud.trainer import loop, train

    called = set()
    for mod in (loop, train):
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute | ast.Name):
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id
                if owner == "checkpointer":
                    called.add(node.attr)
    assert called and called <= set(METHODS) | {"events"}, called
