"""The one routine that copies a store prefix into a local folder.

Every key listed is untrusted: each is checked and joined under the destination with
``keys.contained`` (a key such as ``merged/../../../tmp/x`` is refused, naming it). Given a manifest
(a checkpoint's or an output folder's), only the files it names are copied, each one is verified
against its size and sha256, and a file it names that the store lacks is an error; objects it does not
name are left in the store. A local copy that already verifies (or, without a manifest, has the
store's size) is kept, so an interrupted fetch resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from gptoss_cloud.contract.errors import GptossError, StoreError
from gptoss_cloud.contract.store.keys import contained, relative_keys
from gptoss_cloud.contract.outputs import MANIFEST, open_output
from gptoss_cloud.contract.store.objects import LocalStore, Store, is_remote, open_store


class _Manifest(Protocol):
    files: dict[str, dict]

    def check_file(self, rel: str, path: str | Path, where: str) -> None: ...


def _size(store: Store, key: str) -> int | None:
    if isinstance(store, LocalStore):
        return store._p(key).stat().st_size
    client = getattr(store, "client", None)
    if client is None:
        return None
    return int(client.head_object(Bucket=store.bucket, Key=store._k(key))["ContentLength"])


def _in_place(store: Store, key: str, out: Path) -> bool:
    return isinstance(store, LocalStore) and store._p(key).resolve() == out.resolve()


def download_prefix(store: Store, prefix: str, dest: str | Path, *, where: str | None = None,
                    manifest: _Manifest | None = None, keep: Callable[[str], bool] | None = None,
                    log: Callable[[str], None] | None = None) -> list[str]:
    """Copy what is under ``prefix`` of ``store`` into ``dest``; return the relative keys fetched.

    ``keep(rel)`` narrows what is copied (of the manifest's files, or of the listing). A local store
    read into its own folder is verified in place, and there an object the manifest does not name is
    refused: the readers load that very folder.
    """
    where = where or f"{store.uri.rstrip('/')}/{prefix.strip('/')}".rstrip("/")
    prefix = prefix.strip("/")
    dest = Path(dest)
    listed = {rel: key for key, rel in relative_keys(store.list(prefix), prefix, where=where)}
    if manifest is not None:
        named = sorted(rel for rel in manifest.files if keep is None or keep(rel))
        missing = sorted(set(named) - set(listed))
        if missing:
            raise StoreError(f"{where}: {missing[0]!r} is in the manifest but not in the store"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                             hint="the folder is incomplete or was partly deleted")
        for rel in sorted(set(listed) - set(manifest.files) - {MANIFEST}):
            if _in_place(store, listed[rel], contained(dest, rel, where=where)):
                raise StoreError(f"{where}/{rel}: not listed in the folder's manifest; refusing to load the folder with it",
                                 hint="delete the file, or merge into an empty folder")
        wanted = named
    else:
        wanted = sorted(rel for rel in listed if keep is None or keep(rel))
    fetched = []
    for rel in wanted:
        key, out = listed[rel], contained(dest, rel, where=where)
        if out.is_file():
            if manifest is not None:
                try:
                    manifest.check_file(rel, out, where)
                    continue
                except GptossError:
                    if _in_place(store, key, out):
                        raise
            elif _in_place(store, key, out) or out.stat().st_size == _size(store, key):
                continue
        store.download_file(key, out)
        if manifest is not None:
            manifest.check_file(rel, out, where)
        fetched.append(rel)
        if log:
            log(f"fetched {rel}")
    return fetched


def local_output(uri: str, cache: str | Path, *, signed: bool) -> Path | None:
    """A run's published folder (merged/, adapter/, base/) as a verified local folder: a local one
    checked in place, a remote one fetched into ``cache``; None when it is absent or empty."""
    store = open_store(uri)
    if is_remote(uri):
        if not store.list():
            return None
        folder = Path(cache)
    else:
        folder = Path(str(uri).removeprefix("file://"))
        if not (folder.is_dir() and any(folder.iterdir())):
            return None
    download_prefix(store, "", folder, where=str(uri).rstrip("/"), manifest=open_output(store, signed_spec=signed))
    return folder


COMPLETE_MARKER = ".complete"


def main(argv: list[str] | None = None) -> int:
    """``python -m gptoss_cloud.contract.store.fetch SRC DEST``: what the rendered weights-mirror init container runs.

    Copies the HF-format weight files of the prefix SRC (``hub_files.wanted``: never ``original/`` or
    ``metal/``; every key contained under DEST) and then writes DEST/.complete, so a node cache volume
    already filled is a no-op."""
    import argparse
    import sys

    from gptoss_cloud.contract.hub_files import wanted

    p = argparse.ArgumentParser(prog="python -m gptoss_cloud.contract.store.fetch", description="copy a store prefix into a folder")
    p.add_argument("src", help="store URI of the prefix (an s3:// weights mirror)")
    p.add_argument("dest", help="local folder")
    a = p.parse_args(argv)
    dest = Path(a.dest)
    if (dest / COMPLETE_MARKER).exists():
        print(f"{dest} already holds {a.src}")
        return 0
    try:
        n = len(download_prefix(open_store(a.src), "", dest, where=a.src.rstrip("/"), keep=wanted))
    except GptossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    (dest / COMPLETE_MARKER).write_text(a.src)
    print(f"ready: {n} file(s) fetched into {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
