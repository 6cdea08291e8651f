"""What the vLLM pod's init container runs: copy served weights from the run store into a volume.

    python -m gptoss_cloud.serve_fetch SRC_URI DEST [--wait-for KEY] [--timeout S] [--vocab-to DIR]

It runs in the trainer image (which has this package, boto3 and the harmony vocabulary), so the
vLLM image needs no S3 client and no internet. ``--wait-for`` polls until the merge Job has
published the folder (its marker written last), so the Deployment can be applied together with the
merge Job. Files already present with the right size are kept, so a restarted pod resumes the copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import GptossError
from .store import open_store

VOCAB_FILE = "o200k_base.tiktoken"


def wait_for(src: str, marker: str, timeout_s: float, poll_s: float = 30.0, log=print) -> None:
    store = open_store(src)
    deadline = time.monotonic() + timeout_s
    while not store.exists(marker):
        if time.monotonic() >= deadline:
            raise GptossError(f"{src}/{marker} did not appear within {timeout_s:.0f}s", hint="check the merge Job's logs")
        log(f"waiting for {src}/{marker} (the merge publishes it last)")
        time.sleep(poll_s)


def fetch(src: str, dest: str | Path, log=print) -> int:
    """Copy every file under ``src`` to ``dest``; return how many were downloaded."""
    store = open_store(src)
    keys = store.list()
    if not keys:
        raise GptossError(f"nothing to serve under {src}")
    dest = Path(dest)
    n = 0
    for key in keys:
        out = dest / key
        if out.is_file() and _same_size(store, key, out):
            continue
        store.download_file(key, out)
        n += 1
        log(f"fetched {key}")
    return n


def _same_size(store, key: str, out: Path) -> bool:
    client = getattr(store, "client", None)
    if client is None:  # local store: compare with the file itself
        return (Path(store.root) / key).stat().st_size == out.stat().st_size
    head = client.head_object(Bucket=store.bucket, Key=store._k(key))
    return int(head["ContentLength"]) == out.stat().st_size


def copy_vocab(dest: str | Path) -> Path:
    """Put the harmony vocabulary where vLLM's TIKTOKEN_ENCODINGS_BASE will point."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    src = Path(base or "") / VOCAB_FILE
    if not base or not src.is_file():
        raise GptossError(f"harmony vocabulary not found at {src}", hint="the trainer image sets TIKTOKEN_ENCODINGS_BASE to its baked-in copy")
    out = Path(dest) / VOCAB_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_cloud.serve_fetch", description=__doc__.splitlines()[0])
    p.add_argument("src", help="store URI of the folder to serve (merged/ or adapter/)")
    p.add_argument("dest", help="local folder (the shared volume)")
    p.add_argument("--wait-for", default=None, help="key under SRC that marks the folder complete")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for --wait-for")
    p.add_argument("--vocab-to", default=None, help="also copy the harmony vocabulary into this folder")
    a = p.parse_args(argv)
    try:
        if a.wait_for:
            wait_for(a.src, a.wait_for, a.timeout)
        n = fetch(a.src, a.dest)
        if a.vocab_to:
            copy_vocab(a.vocab_to)
    except GptossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ready: {n} file(s) fetched into {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
