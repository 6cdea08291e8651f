"""What the vLLM pod's init container runs: copy served weights from the run store into a volume.

    python -m gptoss_cloud.trainer.programs.serve_fetch SRC_URI DEST [--wait-for KEY] [--timeout S] [--vocab-to DIR] [--signed]
    python -m gptoss_cloud.trainer.programs.serve_fetch STORE_URI DEST --promoted NAME [--format F] [--signed]

It runs in the trainer image (which has this package, boto3 and the harmony vocabulary), so the
vLLM image needs no S3 client and no internet. ``--wait-for`` polls until the merge Job has
published the folder (its marker written last), so the Deployment can be applied together with the
merge Job. Only the files the folder's manifest names are copied, each verified (and signed, with
``--signed``; see ``outputs.py``); files already present that verify are kept, so a restarted pod
resumes the copy.

``--promoted NAME`` reads the alias ``STORE_URI/promoted/NAME.json`` when the pod starts and serves
that run's published merged folder (``--format``: the one the Deployment was sized for, or auto =
``merged-mxfp4/`` when published, else ``merged/``; contract/merged.py): a rollout restart picks up a
new promotion with no change to the Deployment.
The record is untrusted like every key: read with a size bound, its run id validated before it
becomes part of a URI, and the folder under it copied through the same contained download.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.store.fetch import download_prefix
from gptoss_cloud.contract.integrity import signing_key
from gptoss_cloud.contract.outputs import MANIFEST, open_output
from gptoss_cloud.contract.store.objects import join, open_store

VOCAB_FILE = "o200k_base.tiktoken"


def wait_for(src: str, marker: str, timeout_s: float, poll_s: float = 30.0, log=print) -> None:
    store = open_store(src)
    deadline = time.monotonic() + timeout_s
    while not store.exists(marker):
        if time.monotonic() >= deadline:
            raise GptossError(f"{src}/{marker} did not appear within {timeout_s:.0f}s", hint="check the merge Job's logs")
        log(f"waiting for {src}/{marker} (the merge publishes it last)")
        time.sleep(poll_s)


def fetch(src: str, dest: str | Path, log=print, *, signed: bool = False, verify: bool = True,
          keep: Callable[[str], bool] | None = None) -> int:
    """Copy the published folder ``src`` into ``dest`` (only what its manifest names, each file
    verified); return how many files were downloaded. ``signed``: the run's spec says its outputs are
    signed, so a folder without a verified signature is refused. ``verify=False`` is for sources that
    are not run outputs (a base-weights mirror): every key is still contained under ``dest``.
    ``keep(rel)`` narrows which files are copied."""
    store = open_store(src)
    manifest = open_output(store, signed_spec=signed) if verify else None
    if manifest is None and not store.list():
        raise GptossError(f"nothing to serve under {src}")
    return len(download_prefix(store, "", dest, where=src.rstrip("/"), manifest=manifest, keep=keep, log=log))


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


def promoted_source(store: str, name: str, log=print, fmt: str = "auto") -> str:
    """The published merged folder (of format ``fmt``) of the run ``STORE/promoted/NAME.json`` names
    (contract/promoted.py checks the record)."""
    from gptoss_cloud.contract.merged import formats_for, published_key
    from gptoss_cloud.contract.promoted import read_record
    from gptoss_cloud.contract.runs import merged_key, run_home

    rec = read_record(store, name)
    if rec is None:
        raise GptossError(f"nothing promoted as {name!r} in {store} (no promoted/{name}.json)",
                          hint=f"gptoss-cloud promote RUN (the run's spec has promote.name: {name})")
    log(f"promoted {name}: run {rec.run_id}, {rec.time} ({rec.reason})")
    home = run_home(store, rec.run_id)
    key = published_key(open_store(home), fmt=fmt)
    if key is None:
        wanted = " or ".join(f"{merged_key(f)}/" for f in formats_for(fmt))
        sized = (f"this server was sized for {fmt}: merge that format (gptoss-cloud merge {rec.run_id} --format {fmt}), "
                 f"or render it again with serve --promoted {name}")
        raise GptossError(f"run {rec.run_id}, promoted as {name}, has no published {wanted} folder",
                          hint=sized if fmt != "auto" else f"gptoss-cloud merge {rec.run_id}")
    return join(home, key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_cloud.trainer.programs.serve_fetch", description=__doc__.splitlines()[0])
    p.add_argument("src", help="store URI of the folder to serve (merged/ or adapter/)")
    p.add_argument("dest", help="local folder (the shared volume)")
    p.add_argument("--wait-for", default=None, help="key under SRC that marks the folder complete")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for --wait-for")
    p.add_argument("--vocab-to", default=None, help="also copy the harmony vocabulary into this folder")
    p.add_argument("--signed", action="store_true", help="the run's outputs are signed: refuse SRC unless its manifest verifies")
    p.add_argument("--no-manifest", action="store_true", help="SRC is not a run output (a base-weights mirror): copy as listed")
    p.add_argument("--promoted", default=None, metavar="NAME", help="SRC is the run store: serve the run promoted/NAME.json names")
    p.add_argument("--format", default="auto", choices=("auto", "bf16", "mxfp4"),
                   help="with --promoted: which merged folder (auto: merged-mxfp4/ when published, else merged/)")
    a = p.parse_args(argv)
    try:
        if a.promoted is not None:
            if a.no_manifest:
                raise GptossError("--promoted serves a run's verified merged/ folder; --no-manifest does not apply")
            a.src = promoted_source(a.src, a.promoted, fmt=a.format)
        if a.wait_for:
            wait_for(a.src, a.wait_for, a.timeout)
            if (a.signed or signing_key() is not None) and not a.no_manifest:  # the manifest is written after the marker
                wait_for(a.src, MANIFEST, a.timeout)
        n = fetch(a.src, a.dest, signed=a.signed, verify=not a.no_manifest)
        if a.vocab_to:
            copy_vocab(a.vocab_to)
    except GptossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ready: {n} file(s) fetched into {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
