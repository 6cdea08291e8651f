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
