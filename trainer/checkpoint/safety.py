"""Reading DCP checkpoints without trusting the bucket.

torch.distributed.checkpoint reads its ``.metadata`` with plain ``pickle.load`` and non-tensor
entries with ``torch.load(weights_only=False)``: whoever can write the bucket could run code on every
training node. Here ``.metadata`` is unpickled with an allow-list of DCP's own classes (anything else
is refused with a clear error) and non-tensor entries go through ``torch.load(weights_only=True)``.
The reader also fetches, before reading, exactly the files this rank's load plan needs (its own
shards with the same world size; whatever DCP asks for when resharding) and checks each against the
manifest.
"""

from __future__ import annotations

import io
import pickle
from typing import Callable, Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from gptoss_cloud.contract.store.keys import contained

from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to load something that is not plain checkpoint data."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to unpickle {module}.{name} (not one of torch.distributed.checkpoint's metadata "
            "classes); the checkpoint may have been tampered with"
        )


def safe_load_metadata(data: bytes, where: str = ".metadata"):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = _MetadataUnpickler(io.BytesIO(data), where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbage bytes
        raise CheckpointError(f"{where}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"{where}: not DCP metadata (a {type(md).__name__})")
    return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values are loaded with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refusing non-tensor entry {read_item.dest_index.fqn!r}: {e}") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class FetchingReader(FileSystemReader):
    """A FileSystemReader over a local folder that first fetches (and verifies) what a plan needs.

    ``fetch(paths)`` makes whole files present and verified under ``path``; it raises CheckpointError on
    a checksum mismatch, which DCP turns into an error on every rank. Files for which ``ranged(path)``
    is true are not downloaded whole: only the byte ranges the plan reads are fetched with
    ``read_range(path, offset, length)`` into a sparse copy under ``path/_ranges`` (used for another
    rank's shard holding a few replicated entries, when that rank verifies the whole file itself).
    """

    def __init__(self, path: str, fetch: Callable[[Iterable[str]], None], where: str,
                 ranged: Callable[[str], bool] | None = None, read_range: Callable[[str, int, int], bytes] | None = None):
        super().__init__(path)
        self._fetch = fetch
        self._where = where
        self._ranged = ranged or (lambda rel: False)
        self._read_range = read_range

    def read_metadata(self, *args, **kwargs):
        self._fetch([".metadata"])
        with open(self._get_metadata_path(), "rb") as f:
            md = safe_load_metadata(f.read(), f"{self._where}/.metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        import os
        from pathlib import Path

        whole, ranged = [], []
        for item in plan.items:
            (ranged if self._ranged(self.storage_data[item.storage_index].relative_path) else whole).append(item)
        self._fetch(sorted({self.storage_data[i.storage_index].relative_path for i in whole}))
        fut = super().read_data(LoadPlan(whole, plan.storage_data, plan.planner_data), planner)
        if not ranged:
            return fut
        fut.wait()  # a torch.futures.Future
        root = Path(self.path) / "_ranges"
        for item in ranged:
            info = self.storage_data[item.storage_index]
            dest = contained(root, info.relative_path, where=f"{self._where}/.metadata")  # DCP metadata is bucket input
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "r+b" if dest.exists() else "wb") as f:  # sparse: only the read ranges hold data
                f.seek(info.offset)
                f.write(self._read_range(info.relative_path, info.offset, info.length))
        base = self.path
        try:
            self.path = root
            return super().read_data(LoadPlan(ranged, plan.storage_data, plan.planner_data), planner)
        finally:
            self.path = base
            for item in ranged:
                try:
                    os.remove(root / self.storage_data[item.storage_index].relative_path)
                except FileNotFoundError:
                    pass
