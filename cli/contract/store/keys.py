"""Store keys are untrusted input: the one place where a key becomes a local path.

Keys come from bucket listings, manifests and rendered scripts, and anyone who can write to the
bucket chooses them. ``check_key`` refuses a key that is not a plain relative '/'-separated path;
``contained`` joins a key under a destination folder and refuses anything that would land outside
it (``..``, absolute paths, symlinks already in the folder pointing out). Every fetch, download,
resume, merge and push goes through these two.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from gptoss_cloud.contract.errors import StoreError

MAX_KEY_BYTES = 1024  # S3's own limit on a key's length


class UnsafeKeyError(StoreError):
    """A key that would escape its folder or is not a plain relative path."""


def _short(key: str) -> str:
    return repr(key if len(key) <= 200 else key[:200] + "…")


def check_key(key: str, *, where: str = "store") -> str:
    """``key`` itself if it is a safe relative key, else ``UnsafeKeyError`` naming it and ``where`` it came from."""
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError(f"{where}: empty or non-text key {_short(str(key))}")
    bad = None
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        bad = f"longer than {MAX_KEY_BYTES} bytes"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key):
        bad = "control characters"
    elif "\\" in key:
        bad = "a backslash"
    elif key.startswith("/") or PurePosixPath(key).is_absolute() or (len(key) > 1 and key[1] == ":"):
        bad = "an absolute path"
    else:
        parts = key.split("/")
        if any(p in ("..", ".") for p in parts):
            bad = "a '.' or '..' segment"
        elif any(p == "" for p in parts[:-1]):
            bad = "an empty path segment"
    if bad:
        raise UnsafeKeyError(f"{where}: refusing key {_short(key)}: it contains {bad}",
                             hint="a store key must be a plain relative path; someone wrote an unexpected object")
    return key


def contained(dest: str | Path, key: str, *, where: str = "store") -> Path:
    """``dest/key`` after checking ``key`` and that the resolved path stays under ``dest``."""
    check_key(key, where=where)
    root = Path(os.path.realpath(dest))
    target = Path(os.path.realpath(root / key))
    if target != root and root not in target.parents:
        raise UnsafeKeyError(f"{where}: refusing key {_short(key)}: it resolves outside {root}",
                             hint="a symlink in the destination points elsewhere, or the key escapes it")
    return target


def relative_keys(keys: list[str], prefix: str, *, where: str = "store") -> list[tuple[str, str]]:
    """(full key, key relative to ``prefix``) for every listed key under ``prefix``, each checked."""
    prefix = prefix.strip("/")
    out = []
    for k in keys:
        check_key(k, where=where)
        rel = k[len(prefix) + 1:] if prefix and k.startswith(prefix + "/") else (k if not prefix else None)
        if rel is None:
            raise UnsafeKeyError(f"{where}: listed key {_short(k)} is not under {prefix!r}")
        out.append((k, check_key(rel, where=where)))
    return out
