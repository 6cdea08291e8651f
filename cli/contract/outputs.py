"""Manifests for the folders a run publishes besides its checkpoints: ``merged/``, ``adapter/``, ``base/``.

Each folder gets ``gptoss-manifest.json``, written last: every file's relative key, size and sha256,
and the folder's own name (a manifest moved to another folder does not verify). With a signing key
(``GPTOSS_CHECKPOINT_KEY``) it is HMAC-signed by the same signer as the checkpoint manifests.

Readers (merge, the serve fetcher, chat, push) open a folder with ``open_output``:

- a key here: the manifest must be present, signed and verify;
- no key, but the run's spec says its outputs are signed (``cluster.checkpoint_key_secret``): refused,
  so a machine without the Secret never falls back to trusting the bucket;
- neither: a manifest present is checked (sizes and hashes); an older folder without one is read
  as listed, every key still contained.

Objects under the folder that the manifest does not name are never copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.integrity import KEY_ENV, check_signature, manifest_body, sha256_file, sign, signing_key
from gptoss_cloud.contract.store.keys import check_key
from gptoss_cloud.contract.store.objects import Store, StoreNotFound

FORMAT = "gptoss-cloud-outputs/1"
MANIFEST = "gptoss-manifest.json"


class OutputError(GptossError):
    """A published folder is incomplete, corrupted or not trusted."""


def folder_name(store: Store) -> str:
    """The folder's own name, as the writer and every reader of it see it (not resolved through symlinks)."""
    return str(getattr(store, "root", None) or store.uri).rstrip("/").rsplit("/", 1)[-1]


def spec_says_signed(spec) -> bool:
    """Whether a run's outputs must carry verified signatures: its spec names the key's Secret."""
    return spec is not None and spec.cluster.checkpoint_key_secret is not None


@dataclass
class OutputManifest:
    folder: str
    files: dict[str, dict] = field(default_factory=dict)  # relative key -> {"size", "sha256"}
    signed: bool = False

    def to_json(self, key: bytes | None) -> bytes:
        body = {"format": FORMAT, "folder": self.folder, "files": dict(sorted(self.files.items()))}
        if key:
            body = sign(body, key)
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, key: bytes | None, folder: str) -> "OutputManifest":
        body = manifest_body(data, FORMAT, where, OutputError)
        files = body["files"]
        signed = check_signature(body, key, where, OutputError)
        if body.get("folder") != folder:
            raise OutputError(f"{where}: manifest is for folder {body.get('folder')!r}, not {folder!r}; refusing a moved folder")
        for rel in files:
            try:
                check_key(rel, where=where)
            except GptossError as e:
                raise OutputError(e.message, hint=e.hint) from None
        return cls(folder=folder, files=files, signed=signed)

    def check_file(self, rel: str, path: str | Path, where: str) -> None:
        """Raise OutputError unless the local file has the manifest's size and sha256."""
        want = self.files.get(rel)
        if want is None:
            raise OutputError(f"{where}/{rel}: not listed in the manifest")
        size = Path(path).stat().st_size
        if size != want["size"]:
            raise OutputError(f"{where}/{rel}: size {size} != {want['size']} in the manifest (corrupted or replaced)")
        got = sha256_file(path)
        if got != want["sha256"]:
            raise OutputError(f"{where}/{rel}: sha256 mismatch (tampered or corrupted); manifest {want['sha256'][:12]}…, "
                              f"file {got[:12]}…")


def entries(folder: str | Path, rels: Iterable[str]) -> dict[str, dict]:
    """{rel: {"size", "sha256"}} for files under a local folder (the writer hashes what it uploads)."""
    folder = Path(folder)
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in rels}


def publish(store: Store, files: dict[str, dict], key: bytes | None = None) -> OutputManifest:
    """Write the folder's manifest, after its files: the folder counts as complete from here on."""
    m = OutputManifest(folder=folder_name(store), files=dict(files), signed=key is not None)
    store.write_bytes(MANIFEST, m.to_json(key))
    return m


def publish_local_folder(store: Store, local: str | Path, key: bytes | None = None) -> OutputManifest:
    """The manifest of every file under ``local`` (already the folder's contents in ``store``)."""
    local = Path(local)
    rels = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != MANIFEST)
    return publish(store, entries(local, rels), key)


def replace_local(folder: str | Path, files: dict[str, dict], key: bytes | None = None) -> OutputManifest:
    """Publish a local folder written again in place: files an earlier manifest of ours named that
    this one does not (an older merge's extra shards, training's README.md) are removed first, so
    the folder holds exactly what it vouches for. Files we never published are left alone."""
    from gptoss_cloud.contract.store.keys import contained
    from gptoss_cloud.contract.store.objects import open_store

    folder = Path(folder)
    store = open_store(folder)
    try:
        old = json.loads(store.read_bytes(MANIFEST)).get("files") or {}
    except (StoreNotFound, ValueError, AttributeError):
        old = {}
    for rel in set(old) - set(files) - {MANIFEST}:
        try:
            contained(folder, rel, where=str(folder / MANIFEST)).unlink(missing_ok=True)
        except GptossError:
            continue  # an entry we would never have written: not ours to delete
    return publish(store, files, key)


def open_output(store: Store, *, signed_spec: bool, key: bytes | None = None, where: str | None = None,
                use_env_key: bool = True) -> OutputManifest | None:
    """The folder's verified manifest, or None for an unsigned older folder (see the module doc)."""
    where = where or store.uri.rstrip("/")
    if key is None and use_env_key:
        key = signing_key()
    try:
        data = store.read_bytes(MANIFEST)
    except StoreNotFound:
        if key is not None or signed_spec:
            raise OutputError(f"{where}: no {MANIFEST}; refusing an unsigned folder "
                              + ("(the run's spec says its outputs are signed)" if signed_spec else f"({KEY_ENV} is set)"),
                              hint="it was not published by a merge with the key, or someone replaced it") from None
        return None
    if key is None and signed_spec:
        raise OutputError(f"{where}: the run's spec says its outputs are signed (cluster.checkpoint_key_secret), "
                          f"but {KEY_ENV} is not set here; refusing to read it unverified",
                          hint=f"export {KEY_ENV}=<the key in that Secret>")
    return OutputManifest.from_json(data, f"{where}/{MANIFEST}", key, folder_name(store))


def home_says_signed(home: str) -> bool:
    """``spec_says_signed`` for the spec stored in a run home (a home without one: False)."""
    from gptoss_cloud.contract.runs import SPEC_FILE, read_run_spec
    from gptoss_cloud.contract.store.objects import open_store

    if not open_store(home).exists(SPEC_FILE):
        return False
    return spec_says_signed(read_run_spec(home))
