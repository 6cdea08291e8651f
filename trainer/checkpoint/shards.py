"""Streaming safetensors shards: write one tensor at a time, never a whole shard in memory.

safetensors' own writers take every tensor of a file at once (a 5 GB shard would sit in host memory);
the format is simple enough to stream: the header (names, dtypes, shapes, offsets) is known up front
from the shapes, then each tensor's bytes follow in order. Files are read back with safetensors itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
           torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64", torch.int8: "I8"}


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, tuple, torch.dtype]], max_bytes: int) -> list[list[tuple[str, tuple, torch.dtype]]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        b = nbytes(e[1], e[2])
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    return [s for s in shards if s]


def write_shard(path: str | Path, entries: list[tuple[str, tuple, torch.dtype]], get: Callable[[str], torch.Tensor]) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, dtype in entries:
        n = nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dtype in entries:
            t = get(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            f.write(memoryview(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()))
            del t
    return off


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(path: str | Path, shards: list[list], names: list[str]) -> None:
    total = sum(nbytes(s, d) for shard in shards for _, s, d in shard)
    weight_map = {name: fname for shard, fname in zip(shards, names) for name, _, _ in shard}
    Path(path).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

