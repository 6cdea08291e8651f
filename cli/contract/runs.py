"""Run ids and run homes.

Every run has an id and a home ``<store>/<run-id>/`` holding::

    spec.yaml        the resolved RunSpec the run was started with
    metrics.jsonl    one JSON object per logged step (keys in docs/run-store.md)
    logs/            rank-0 logs per attempt
    checkpoints/     step-N/ folders, each published by its manifest.json (written last)
    adapter/         the LoRA adapter on its own (LoRA runs)
    merged/          the servable Hugging Face folder

A run id is DNS-1123: ``<name>-<yyyymmdd-hhmmss>-<4 hex>`` (at most 50 characters, so every
Kubernetes name derived from it stays within 63).
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from gptoss_cloud.contract.errors import GptossError, StoreError
from gptoss_cloud.contract.safe_yaml import quote
from gptoss_cloud.contract.store.objects import is_remote, join, open_store

RUN_ID_MAX = 50
_RUN_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# What new_run_id makes. Commands that destroy or signal accept only this shape, so a path like ./
# or ../project (a folder that happens to hold a spec.yaml) can never be taken for a run home.
_GENERATED_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-\d{8}-\d{6}-[0-9a-f]{4}$")


def new_run_id(name: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    suffix = secrets.token_hex(2)
    base = name[: RUN_ID_MAX - len(stamp) - len(suffix) - 2].rstrip("-")
    rid = f"{base}-{stamp}-{suffix}"
    assert _RUN_ID_RE.match(rid) and len(rid) <= RUN_ID_MAX, rid
    return rid


def is_run_id(name: str) -> bool:
    return len(name) <= RUN_ID_MAX and bool(_RUN_ID_RE.match(name))


def check_run_id(run_id: str, *, generated: bool = False, where: str | None = None) -> str:
    """Refuse anything that is not a run id; ``generated``: only the ``<name>-<date>-<time>-<hex>`` form."""
    of = f" (from {quote(where)})" if where is not None and where != run_id else ""
    if not is_run_id(run_id):
        raise GptossError(
            f"invalid run id {quote(run_id)}{of}: at most {RUN_ID_MAX} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    if generated and not _GENERATED_RE.match(run_id):
        raise GptossError(
            f"{quote(run_id)}{of} is not a run id: run ids look like <name>-<yyyymmdd>-<hhmmss>-<4 hex>",
            hint="list runs with `gptoss-cloud runs`; pass a run id or the path of a run home",
        )
    return run_id


def run_home(store_uri: str, run_id: str) -> str:
    return join(store_uri, check_run_id(run_id))


def resolve_run(ref: str, store_uri: str, *, strict: bool = False) -> tuple[str, str]:
    """Accept a run id (looked up in the store) or a full URI/path of a run home; return (run_id, home).

    The home's last part must be a valid run id (``strict``: of the generated form), whatever was
    given: ``.``, ``..`` and ``./`` resolve to the folder's real name first."""
    if "://" in ref or "/" in ref or ref in (".", ".."):
        home = ref.rstrip("/") or ref
        if not is_remote(home):
            home = str(Path(home.removeprefix("file://")).expanduser().resolve())
        run_id = check_run_id(home.rsplit("/", 1)[-1], generated=strict, where=ref)
    else:
        run_id, home = check_run_id(ref, generated=strict), run_home(store_uri, ref)
    if not open_store(home).exists(SPEC_FILE):
        raise GptossError(
            f"run {quote(ref)} not found: no {SPEC_FILE} under {home}",
            hint="list runs with `gptoss-cloud runs`, or pass --store / a full run URI",
        )
    return run_id, home


# ------------------------------------------------------------------------------ merged model folders
MERGE_FORMATS = ("bf16", "mxfp4")


def merged_key(fmt: str = "bf16", step: int | None = None) -> str:
    """The folder under a run home that holds a merged model: ``merged`` (bf16) or ``merged-mxfp4`` for the
    final merge, ``merged-step-<N>[-mxfp4]`` for a merge of checkpoint ``N``. The one place these names are made."""
    if fmt not in MERGE_FORMATS:
        raise ValueError(f"merge format must be one of {', '.join(MERGE_FORMATS)}, not {fmt!r}")
    base = "merged" if step is None else f"merged-step-{int(step)}"
    return base if fmt == "bf16" else f"{base}-{fmt}"


def merge_formats(merge_format: str, *, experts_trained: bool, qat: str, base_mxfp4: bool) -> tuple[str, ...]:
    """The formats a merge writes for ``output.merge_format``. ``auto`` is MXFP4 when nothing learned is lost to it:
    the experts were trained quantisation-aware, or were not trained and the base holds them in MXFP4 already
    (their bytes are copied); bf16 otherwise."""
    if merge_format == "both":
        return MERGE_FORMATS
    if merge_format == "auto":
        lossless = qat == "mxfp4" or (not experts_trained and base_mxfp4)
        return ("mxfp4",) if lossless else ("bf16",)
    return (merge_format,)


# ---------------------------------------------------------------------------- the run's own spec
SPEC_FILE = "spec.yaml"


def write_run_spec(home: str, spec) -> None:
    """Record the resolved spec a run was started with: the one writer of ``<home>/spec.yaml``."""
    open_store(home).write_bytes(SPEC_FILE, spec.to_yaml().encode())


def read_run_spec_bytes(home: str) -> bytes:
    """``<home>/spec.yaml`` read under the spec size limit: a store is untrusted, so one byte past the limit is
    read, never the whole of a huge object (``safe_yaml`` refuses the oversized text with its size)."""
    from gptoss_cloud.contract.safe_yaml import MAX_BYTES

    try:
        return open_store(home).read_range(SPEC_FILE, 0, MAX_BYTES + 1)
    except StoreError as e:
        raise GptossError(f"run home {home} has no readable {SPEC_FILE}: {e.message}",
                          hint="pass the run id with --store, or the full run URI") from None


def read_run_spec(home: str):
    """The RunSpec a run was started with: the one reader of ``<home>/spec.yaml`` (bounded, validated)."""
    from gptoss_cloud.contract.spec import spec_from_yaml_text

    return spec_from_yaml_text(read_run_spec_bytes(home), source=join(home, SPEC_FILE))


def state_dir(run_id: str, home: str) -> Path:
    """Where this machine keeps its record of a local run: ``<home>/local/`` for a local store, else a cache folder."""
    if not is_remote(home):
        return Path(home) / "local"
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "gptoss-cloud" / "local-runs" / run_id
