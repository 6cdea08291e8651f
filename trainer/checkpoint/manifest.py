"""Checkpoint manifests: what makes a checkpoint exist.

A checkpoint folder ``<home>/checkpoints/step-N/`` counts only once its ``manifest.json`` is written,
and the manifest is written last, after every rank's files are in the store. It lists every file
with its size and sha256, the step, the world size and the hash of the run spec. Readers ignore
folders without a manifest and check every file they use against it themselves: S3-compatible
servers do not reliably reject wrong checksums, so the store is not trusted to.

Checksums alone protect nothing against someone who can write the bucket (they would rewrite the
manifest too), so when a signing key is set (``GPTOSS_CHECKPOINT_KEY``, usually a mounted Secret)
the manifest carries an HMAC-SHA256 over its canonical JSON and readers refuse any checkpoint whose
signature is missing or wrong. No torch here: the CLI lists and checks checkpoints with this module.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.integrity import KEY_ENV, check_signature, manifest_body, sha256_file, sign, signing_key  # noqa: F401 (re-exported)
from gptoss_cloud.contract.store.keys import check_key
from gptoss_cloud.contract.store.objects import PUBLISH_MARKER, Store, StoreNotFound

FORMAT = "gptoss-cloud-checkpoint/1"
MANIFEST = PUBLISH_MARKER  # one name: the store deletes it first
PARTS_DIR = "_parts"  # per-rank lists of uploaded files; rank 0 folds them into the manifest
_STEP_RE = re.compile(r"^step-(\d+)$")
T = TypeVar("T")


class CheckpointError(GptossError):
    """A checkpoint is missing, incomplete, corrupted or not trusted."""


def step_dir(step: int) -> str:
    return f"step-{step}"


def parse_step(name: str) -> int | None:
    m = _STEP_RE.match(name.strip("/"))
    return int(m.group(1)) if m else None


def file_entry(path: str | Path) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def parallel_map(fn: Callable[[str], T], items: Iterable[str], threads: int,
                 size: Callable[[str], int] | None = None) -> dict[str, T]:
    """``{item: fn(item)}``, up to ``threads`` at a time; the largest items (by ``size``) start first so
    one big file does not start last. The first exception raised by ``fn`` is raised here."""
    items = list(dict.fromkeys(items))
    if size is not None:
        items.sort(key=size, reverse=True)
    if threads <= 1 or len(items) <= 1:
        return {it: fn(it) for it in items}
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="ckpt-hash") as pool:
        return dict(zip(items, pool.map(fn, items)))


def file_entries(folder: str | Path, rels: Iterable[str], threads: int = 1) -> dict[str, dict]:
    """Size and sha256 of each file ``folder/rel``, hashing up to ``threads`` files at once."""
    folder = Path(folder)
    return parallel_map(lambda rel: file_entry(folder / rel), rels, threads,
                        size=lambda rel: os.path.getsize(folder / rel))


@dataclass
class Manifest:
    step: int
    world_size: int
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"size", "sha256"}
    spec_hash: str | None = None
    method: str | None = None
    extra: dict = field(default_factory=dict)
    signed: bool = False

    def to_json(self, key: bytes | None) -> bytes:
        body = {
            "format": FORMAT, "step": self.step, "world_size": self.world_size, "spec_hash": self.spec_hash,
            "method": self.method, "files": dict(sorted(self.files.items())), "extra": self.extra,
        }
        if key:
            body = sign(body, key)
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, key: bytes | None) -> "Manifest":
        body = manifest_body(data, FORMAT, where, CheckpointError)
        files = body["files"]
        for name, least in (("step", 0), ("world_size", 1)):
            v = body.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise CheckpointError(f"{where}: manifest key {name!r} must be a whole number >= {least}, not {v!r}")
        for name in ("spec_hash", "method"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise CheckpointError(f"{where}: manifest key {name!r} must be text, not {type(body[name]).__name__}")
        if body.get("extra") is not None and not isinstance(body["extra"], dict):
            raise CheckpointError(f"{where}: manifest key 'extra' must be a mapping, not {type(body['extra']).__name__}")
        signed = check_signature(body, key, where, CheckpointError)
        check_entries(files, f"{where}/{MANIFEST}")
        return cls(step=body["step"], world_size=body["world_size"], files=files,
                   spec_hash=body.get("spec_hash"), method=body.get("method"), extra=body.get("extra") or {},
                   signed=signed)

    def check_file(self, rel: str, path: str | Path, where: str) -> None:
        """Raise CheckpointError unless the local file matches the manifest's size and sha256."""
        want = self.files.get(rel)
        if want is None:
            raise CheckpointError(f"{where}/{rel}: not listed in the manifest")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointError(f"{where}/{rel}: size {size} != {want['size']} in the manifest (corrupted or truncated)")
        got = sha256_file(path)
        if got != want["sha256"]:
            raise CheckpointError(f"{where}/{rel}: sha256 mismatch (corrupted); manifest {want['sha256'][:12]}…, file {got[:12]}…")


def check_entries(files: dict, where: str) -> None:
    """Every file a manifest (or a rank's part) names must be a plain relative key: the readers join
    them to local folders, and a bucket writer chooses them."""
    for rel in files:
        try:
            check_key(rel, where=where)
        except GptossError as e:
            raise CheckpointError(e.message, hint=e.hint) from None


def list_published(ckpts: Store) -> list[int]:
    """Steps whose folder has a manifest, newest first. Folders without one are in progress or abandoned."""
    steps = []
    for key in ckpts.list(""):
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and (s := parse_step(parts[0])) is not None:
            steps.append(s)
    return sorted(set(steps), reverse=True)


def list_folders(ckpts: Store) -> set[int]:
    return {s for key in ckpts.list("") if (s := parse_step(key.split("/")[0])) is not None}


def read_manifest(ckpts: Store, step: int, key: bytes | None) -> Manifest:
    where = f"{ckpts.uri.rstrip('/')}/{step_dir(step)}"
    try:
        data = ckpts.read_bytes(f"{step_dir(step)}/{MANIFEST}")
    except StoreNotFound:
        raise CheckpointError(f"{where}: no {MANIFEST} (not published)") from None
    m = Manifest.from_json(data, where, key)
    if m.step != step:
        raise CheckpointError(f"{where}: manifest says step {m.step}; refusing a moved checkpoint")
    return m


def write_part(ckpts: Store, step: int, rank: int, files: dict[str, dict], *, attempt: str) -> None:
    """Rank ``rank`` uploaded ``files`` for ``step`` in ``attempt`` (an id every rank of one run attempt shares)."""
    body = {"attempt": attempt, "files": files}
    ckpts.write_bytes(f"{step_dir(step)}/{PARTS_DIR}/rank-{rank}.json", json.dumps(body, sort_keys=True).encode())


def parts_status(ckpts: Store, step: int, world_size: int, *, attempt: str) -> tuple[dict[str, dict], list[int]]:
    """(the files of every part ``attempt`` wrote, merged; the ranks whose part is missing or stale).

    A part left by another attempt (one killed mid-save, whose steps were then re-run with different
    bytes) counts as missing: it vouches for files this attempt may have overwritten since."""
    files: dict[str, dict] = {}
    missing = []
    for r in range(world_size):
        key = f"{step_dir(step)}/{PARTS_DIR}/rank-{r}.json"
        try:
            body = json.loads(ckpts.read_bytes(key))
        except StoreNotFound:
            missing.append(r)
            continue
        except ValueError:
            raise CheckpointError(f"{ckpts.uri.rstrip('/')}/{key}: unreadable part (not JSON)") from None
        if not isinstance(body, dict) or body.get("attempt") != attempt or not isinstance(body.get("files"), dict):
            missing.append(r)
            continue
        check_entries(body["files"], f"{ckpts.uri.rstrip('/')}/{key}")
        files.update(body["files"])
    return files, missing


def read_parts(ckpts: Store, step: int, world_size: int, *, attempt: str) -> dict[str, dict] | None:
    """All ranks' file lists of ``attempt`` merged, or None while some rank has not finished uploading."""
    files, missing = parts_status(ckpts, step, world_size, attempt=attempt)
    return None if missing else files


def publish(ckpts: Store, manifest: Manifest, key: bytes | None) -> None:
    """Write the manifest: the single atomic act that makes the checkpoint exist."""
    ckpts.write_bytes(f"{step_dir(manifest.step)}/{MANIFEST}", manifest.to_json(key))


def unpublish(ckpts: Store, step: int) -> None:
    """Delete a checkpoint: the manifest first, so no reader can pick a half-deleted folder."""
    ckpts.delete(f"{step_dir(step)}/{MANIFEST}")
    ckpts.delete(step_dir(step))


def prune(ckpts: Store, keep_last: int, newest: int) -> list[int]:
    """Keep the newest ``keep_last`` published checkpoints; drop older ones and abandoned folders below ``newest``."""
    published = list_published(ckpts)
    dropped = []
    for s in published[keep_last:]:
        unpublish(ckpts, s)
        dropped.append(s)
    for s in sorted(list_folders(ckpts) - set(published)):
        if s < newest:  # an attempt that died before publishing; never a folder still being written
            ckpts.delete(step_dir(s))
            dropped.append(s)
    return dropped
