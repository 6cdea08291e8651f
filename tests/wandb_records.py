"""Read back what W&B wrote for an offline run: the records of its ``run-<id>.wandb`` transaction log,
decoded with W&B's own protobuf messages. W&B ships no Python reader any more (``wandb sync`` replays
the file in its Go core), so the framing (LevelDB's log format: 32 KiB blocks of length-prefixed,
possibly split records, after a 7-byte ``:W&B`` header) is read here."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict[str, Any]]:
    """Each ``run.log`` call as one dict (W&B's own ``_step``/``_timestamp``/``_runtime`` left out)."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({_key(i): json.loads(i.value_json) for i in r.history.item if not _key(i).startswith("_")})
    return rows


def summary(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out


def config(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        out.update({_key(i): json.loads(i.value_json) for i in items})
    return out


def artifacts(path: Path) -> list[Any]:
    return [r.artifact for r in records(path) if r.WhichOneof("record_type") == "artifact"]
