"""Manifests come from a bucket: every malformed one is a named error, with or without ``python -O``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptoss_cloud.contract.outputs import FORMAT as OUT_FORMAT, OutputError, OutputManifest
from gptoss_cloud.trainer.checkpoint.manifest import FORMAT as CKPT_FORMAT, CheckpointError, Manifest

GOOD = {"size": 3, "sha256": "a" * 64}
BAD_FILES = [
    ("not a mapping", ["x"], "key 'files' must be a mapping"),
    ("entry not a mapping", {"x": 3}, "entry 'x' must be a mapping"),
    ("size as text", {"x": {"size": "3", "sha256": "a" * 64}}, "entry 'x': size must be a whole number"),
    ("size negative", {"x": {"size": -1, "sha256": "a" * 64}}, "entry 'x': size must be a whole number"),
    ("size a bool", {"x": {"size": True, "sha256": "a" * 64}}, "entry 'x': size must be a whole number"),
    ("no digest", {"x": {"size": 3}}, "entry 'x': sha256 must be 64"),
    ("short digest", {"x": {"size": 3, "sha256": "ab"}}, "entry 'x': sha256 must be 64"),
]


def ckpt(**over) -> bytes:
    return json.dumps({"format": CKPT_FORMAT, "step": 2, "world_size": 1, "files": {"x": GOOD}, **over}).encode()


def out(**over) -> bytes:
    return json.dumps({"format": OUT_FORMAT, "folder": "merged", "files": {"x": GOOD}, **over}).encode()


@pytest.mark.parametrize("what, files, msg", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_entries_are_named(what, files, msg):
    with pytest.raises(CheckpointError, match=f"s3://b/step-2: manifest {msg}"):
        Manifest.from_json(ckpt(files=files), "s3://b/step-2", None)
    with pytest.raises(OutputError, match=f"s3://b/merged: manifest {msg}"):
        OutputManifest.from_json(out(files=files), "s3://b/merged", None, "merged")


@pytest.mark.parametrize("over, msg", [
    ({"step": "2"}, "key 'step' must be a whole number >= 0"),
    ({"step": None}, "key 'step' must be a whole number >= 0"),
    ({"world_size": 0}, "key 'world_size' must be a whole number >= 1"),
    ({"spec_hash": 5}, "key 'spec_hash' must be text"),
    ({"extra": [1]}, "key 'extra' must be a mapping"),
    ({"format": "other/1"}, "unknown format 'other/1'"),
])
def test_bad_checkpoint_manifest_keys_are_named(over, msg):
    with pytest.raises(CheckpointError, match=msg):
        Manifest.from_json(ckpt(**over), "s3://b/step-2", None)


def test_not_json_and_not_a_mapping():
    for data in (b"{", b"[1, 2]"):
        with pytest.raises(CheckpointError, match="unreadable manifest"):
            Manifest.from_json(data, "w", None)
        with pytest.raises(OutputError, match="unreadable manifest"):
            OutputManifest.from_json(data, "w", None, "merged")


def test_good_manifests_still_load():
    assert Manifest.from_json(ckpt(), "w", None).files == {"x": GOOD}
    assert OutputManifest.from_json(out(), "w", None, "merged").files == {"x": GOOD}


def test_checks_hold_under_python_O():
    """Asserts vanish under -O; these checks must not."""
    code = f"""
import json
from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError, Manifest, FORMAT
from gptoss_cloud.contract.outputs import OutputError, OutputManifest, FORMAT as OF
assert False, "asserts are on"  # never raises under -O
for files in {[b[1] for b in BAD_FILES]!r}:
    for parse, err, fmt, extra in ((lambda d: Manifest.from_json(d, "w", None), CheckpointError, FORMAT, {{"step": 1, "world_size": 1}}),
                                   (lambda d: OutputManifest.from_json(d, "w", None, "m"), OutputError, OF, {{"folder": "m"}})):
        try:
            parse(json.dumps({{"format": fmt, "files": files, **extra}}).encode())
        except err:
            continue
        raise SystemExit(f"accepted {{files!r}}")
print("ok")
"""
    res = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
