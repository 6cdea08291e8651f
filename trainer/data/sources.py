"""Read dataset rows: local JSONL/JSON/Parquet, s3:// objects, Hugging Face hub ids, or the built-in sample.

Each source yields raw rows (dicts, validated later by rows.parse_row) plus a content hash for the
tokenized-data cache. A line that cannot be decoded (not JSON, not UTF-8, too deep, too long) becomes
a RowError in place of its row, so that ``on_error: skip`` can count it like any other malformed row.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss_cloud.contract.errors import DataError

from gptoss_cloud.trainer.data.limits import checked, json_rows, jsonl_rows

if TYPE_CHECKING:
    from gptoss_cloud.contract.sections import DatasetSource

SAMPLE = "sample"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class SourceRows:
    name: str  # how errors name this source
    rows: list[Any]  # raw rows; a RowError stands in for a row that could not even be parsed
    content_hash: str


def sample_path() -> Path:
    """The built-in sample conversations shipped with the package."""
    return Path(__file__).resolve().parents[1] / "assets" / "sample.jsonl"


def _format_of(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    for ext, f in EXTENSIONS.items():
        if name.lower().endswith(ext):
            return f
    raise DataError(f"cannot tell the format of {name}", hint="name it .jsonl, .json or .parquet, or set the source's format")


def parse_bytes(data: bytes, fmt: str, name: str) -> list[Any]:
    """Rows of one file's bytes in the given format (jsonl | json | parquet), decoded under limits.py's limits."""
    if fmt == "jsonl":
        return jsonl_rows(data, name)
    if fmt == "json":
        return json_rows(data, name)
    if fmt == "parquet":
        try:
            import pyarrow as pa  # lazy: only Parquet sources need it
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{name}: reading Parquet needs pyarrow", hint="pip install pyarrow") from None
        try:
            return checked(pq.read_table(pa.BufferReader(data)).to_pylist(), name)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{name} is not a readable Parquet file ({e})") from None
    raise DataError(f"{name}: unsupported format {fmt!r}")


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def is_hub_id(path: str) -> bool:
    if path.startswith("hf://"):
        return True
    looks_like_file = any(path.lower().endswith(ext) for ext in EXTENSIONS)
    return HUB_ID.fullmatch(path) is not None and not looks_like_file and not Path(path).exists()


def load_source(src: "DatasetSource") -> SourceRows:
    """All rows of one source, in order."""
    path = src.path
    if path == SAMPLE:
        p = sample_path()
        data = p.read_bytes()
        return SourceRows("sample", parse_bytes(data, "jsonl", "sample"), _digest(data))
    if path.startswith("s3://"):
        from gptoss_cloud.contract.store.objects import open_store

        data = open_store(path).read_bytes("")
        fmt = _format_of(path, src.format)
        return SourceRows(path, parse_bytes(data, fmt, path), _digest(data))
    if src.format == "hub" or (src.format == "auto" and is_hub_id(path)):
        return _load_hub(src)
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"dataset not found: {path}", hint="a .jsonl/.json/.parquet file, s3://bucket/key, a hub id, or 'sample'")
    try:
        data = p.read_bytes()
    except OSError as e:  # unreadable (permissions, I/O error, removed since the check): one line, not a traceback
        raise DataError(f"cannot read dataset {path}: {e.strerror or e}") from e
    return SourceRows(path, parse_bytes(data, _format_of(path, src.format), path), _digest(data))


def _load_hub(src: "DatasetSource") -> SourceRows:
    name = src.path.removeprefix("hf://")
    try:
        import datasets  # lazy and optional: the [hub] extra
    except ImportError:
        raise DataError(f"{src.path}: loading hub datasets needs the `datasets` library",
                        hint="pip install 'gptoss-cloud[hub]'") from None
    try:
        ds = datasets.load_dataset(name, src.subset, split=src.split, revision=src.revision)
    except Exception as e:  # the hub raises many types (network, missing split, auth)
        raise DataError(f"could not load hub dataset {name!r} split {src.split!r}: {type(e).__name__}: {e}",
                        hint="check the id and split, HF_TOKEN for gated data, and network access") from e
    # The fingerprint identifies the prepared dataset (files and revision) without reading every row.
    label = f"hf://{name}" + (f"/{src.subset}" if src.subset else "") + f"[{src.split}]"
    return SourceRows(label, checked(ds.to_list(), label), _digest("hub", label, src.revision or "", ds._fingerprint))

