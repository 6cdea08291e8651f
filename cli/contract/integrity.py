"""Hashes and HMAC signatures for everything gptoss-cloud publishes to a store.

One signer for checkpoints (``trainer/checkpoint/manifest.py``) and the output folders (``outputs.py``):
a manifest's body is signed as canonical JSON (sorted keys, no whitespace, the ``signature`` field
left out) with HMAC-SHA256 under ``GPTOSS_CHECKPOINT_KEY`` (usually a mounted Secret). No torch here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from gptoss_cloud.contract.errors import GptossError

KEY_ENV = "GPTOSS_CHECKPOINT_KEY"


def sha256_file(path: str | Path, bufsize: int = 8 * 1024 * 1024) -> str:
    # One reused buffer (no 8 MiB allocation per read); hashlib drops the GIL while hashing it, so
    # several files hash at once from a thread pool.
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def signing_key(environ=None) -> bytes | None:
    environ = os.environ if environ is None else environ
    key = environ.get(KEY_ENV, "").strip()
    return key.encode() if key else None


def _canonical(body: dict) -> bytes:
    return json.dumps({k: v for k, v in body.items() if k != "signature"}, sort_keys=True, separators=(",", ":")).encode()


def sign(body: dict, key: bytes) -> dict:
    out = dict(body)
    out["signature"] = {"alg": "HMAC-SHA256", "value": hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()}
    return out


def check_signature(body: dict, key: bytes | None, where: str, error: type[GptossError] = GptossError) -> bool:
    """Whether ``body`` carries a signature; with ``key``, raise ``error`` unless it is signed and verifies."""
    sig = body.get("signature")
    if key is not None:
        if not isinstance(sig, dict) or sig.get("alg") != "HMAC-SHA256":
            raise error(f"{where}: manifest is not signed but {KEY_ENV} is set; refusing it")
        want = hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, str(sig.get("value", ""))):
            raise error(f"{where}: manifest signature does not verify (tampered, or another key); refusing it")
    return sig is not None


_SHA256 = frozenset("0123456789abcdef")


def manifest_body(data: bytes, fmt: str, where: str, error: type[GptossError] = GptossError) -> dict:
    """A manifest's JSON object, of format ``fmt``, its ``files`` checked (``check_file_entries``)."""
    try:
        body = json.loads(data)
    except ValueError as e:
        raise error(f"{where}: unreadable manifest (not JSON: {e})") from None
    if not isinstance(body, dict) or body.get("format") != fmt:
        raise error(f"{where}: unreadable manifest (unknown format {body.get('format') if isinstance(body, dict) else None!r})")
    check_file_entries(body.get("files"), where, error)
    return body


def check_file_entries(files, where: str, error: type[GptossError] = GptossError) -> dict[str, dict]:
    """A manifest's ``files`` ({relative key: {"size", "sha256"}}), checked before anything trusts it.

    A bucket writer chooses these bytes: each size must be a whole number of bytes and each sha256 64 hex
    digits, else ``error`` names the manifest, the entry and what is wrong (never an assert: ``python -O``
    would skip it and let a string size reach a comparison, or a bad digest pass as "mismatch")."""
    if not isinstance(files, dict):
        raise error(f"{where}: manifest key 'files' must be a mapping of file -> {{size, sha256}}, "
                    f"not {type(files).__name__}")
    for rel, entry in files.items():
        if not isinstance(entry, dict):
            raise error(f"{where}: manifest entry {rel!r} must be a mapping with size and sha256, not {type(entry).__name__}")
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise error(f"{where}: manifest entry {rel!r}: size must be a whole number of bytes, not {size!r}")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256:
            raise error(f"{where}: manifest entry {rel!r}: sha256 must be 64 lowercase hex digits, not {digest!r}")
    return files
