"""docs/checkpoints.md stays true: the settings, defaults, functions and tests it names exist."""

from __future__ import annotations

import re

from gptoss_cloud.contract.sections import CheckpointSection
from support import REPO

DOC = (REPO / "docs" / "checkpoints.md").read_text()


def test_settings_and_defaults_named_exist():
    fields = CheckpointSection.model_fields
    named = set(re.findall(r"`checkpoint\.(\w+)`", DOC))
    assert {"peer_timeout_s", "store_retry_s", "keep_last"} <= named
    assert named <= set(fields), named - set(fields)
    for name, default in re.findall(r"`checkpoint\.(\w+)` \(default (\d+)\)", DOC):
        assert fields[name].default == float(default), name


def test_functions_named_exist():
    from gptoss_cloud.contract.store import objects as store
    from gptoss_cloud.trainer.checkpoint import checkpointer as checkpoint, faults as ckpt_faults, manifest as ckpt_manifest

    where = {"Checkpointer": checkpoint.Checkpointer, "LocalStore": store.LocalStore, "S3Store": store.S3Store,
             "ckpt_faults": ckpt_faults}
    for name in re.findall(r"`((?:Checkpointer|LocalStore|S3Store|ckpt_faults)\.\w+)`", DOC):
        owner, attr = name.split(".")
        assert hasattr(where[owner], attr), name
    for name in ("write_part", "parts_status", "publish", "prune"):
        assert f"`{name}`" in DOC and hasattr(ckpt_manifest, name), name
    assert len(ckpt_faults.LOAD_RETRY_DELAYS_S) + 1 == 3  # "3 tries in all"


def test_tests_named_exist():
    for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC):
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE), f"{path}::{name}"
    for path in re.findall(r"`(tests/[\w/]+\.py)`", DOC):
        assert (REPO / path).is_file(), path
