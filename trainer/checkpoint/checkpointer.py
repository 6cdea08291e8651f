"""Sharded checkpoints: save with torch.distributed.checkpoint, publish to the run store, resume.

``Checkpointer`` is the one object the loop holds; its work is in ``save`` (DCP shards to local disk),
``publish`` (hash, upload, manifest, prune, measurements), ``resume`` (verified restore with fallback)
and ``train_state`` (what of the loop's state is saved, and how).

Layout in the run home::

    checkpoints/step-N/
        .metadata  __R_0.distcp ...   DCP: model (or LoRA adapter) + optimizer, each rank its shards
        extra/rank-R.json             scheduler, data position, RNG ... per rank, as tagged JSON
        spec.yaml                     the run spec        adapter_config.json   (LoRA runs)
        _parts/rank-R.json            what each rank uploaded (rank 0 folds these into the manifest)
        manifest.json                 written LAST: files + sha256, step, world size, spec hash [+ HMAC]

Every save goes into a new ``step-N`` folder (DCP deletes old metadata first, so overwriting in place
would leave nothing usable after a crash mid-save). Each rank writes its shards as several files at once
(``checkpoint.writer_threads``: ``__R_0.distcp`` … ``__R_{n-1}.distcp``) to a local folder, hashes them
in parallel, uploads them (multipart, parallel), then rank 0 writes the manifest once every rank has
reported its files. Then older checkpoints are removed: local copies older than the newest, and in the
store all but the last ``keep_last``. That clean-up runs in a background thread even for a sync save
(deleting a 50 GB checkpoint takes seconds the loop need not wait for); the next ``save``, ``wait`` or
``close`` joins it and raises its error, as for an async save.

Each save is measured: rank 0 appends one ``{"event": "checkpoint", ...}`` line to the run's
``metrics.jsonl`` and logs it in one line, once the checkpoint is published and older ones removed (from
the background thread; ``wait``/``close`` return after it). Seconds count from the moment the loop called
``save``, except for the durations marked so:

    step, mode            the step saved; "sync" or "async" (checkpoint.async_save)
    wait_prev_s           spent waiting for the previous save's background work (an async save's write and
                          publish, any save's clean-up) to finish (part of blocking_s)
    blocking_s            until ``save`` returned to the loop (async: once async_save has staged the state, or
                          with ``overlap_staging`` once the copy has started)
    staged_s              (async with ``overlap_staging``) until the state was copied to host memory, in the
                          background while the next step computes; the loop waits for it before the
                          optimizer step changes the state (``before_update``)
    write_s               until this rank's shards were written to local disk (DCP finished)
    upload_s              until they were uploaded to the store (None when the store is that local folder)
    total_s               until rank 0 published the manifest (every rank's files uploaded)
    hash_s                time (a duration, not since ``save``) this rank spent checksumming its files,
                          after write_s and before upload_s / total_s
    prune_s               time (a duration) spent removing older checkpoints after publishing: this rank's
                          old local copies and, on rank 0, the store's beyond keep_last (a sync save does
                          it in the background, after blocking_s)
    writer_threads        files each rank's shards were written into at once (checkpoint.writer_threads)
    bytes                 the DCP shard files (``*.distcp``) of all ranks, from the manifest
    manifest_bytes, files every file the manifest lists (shards, metadata, per-rank state, spec)
    rank_bytes            this rank's own files

The training loop calls::

    ckpt = Checkpointer(spec.checkpoint, home, spec=spec)
    step = ckpt.restore(state)          # 0 when starting fresh
    ...  ckpt.maybe_save(step, state)   # every step; saves every checkpoint.every_steps
    ckpt.maybe_save(step, state, last=True); ckpt.close()

where ``state`` maps names to the model (``"model"``), the optimizer (``"optimizer"``) and any other
objects with ``state_dict()`` / ``load_state_dict()`` (scheduler, data position, ``RNGState``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from gptoss_cloud.contract.store.objects import LocalStore, open_store

from gptoss_cloud.trainer.checkpoint import faults as ckpt_faults
from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError, signing_key
from gptoss_cloud.trainer.checkpoint.publish import Publishing
from gptoss_cloud.trainer.checkpoint.resume import Resuming
from gptoss_cloud.trainer.checkpoint.room import check_local_room
from gptoss_cloud.trainer.checkpoint.save import Saving
from gptoss_cloud.trainer.checkpoint.train_state import as_state

_reason = ckpt_faults.reason

MAX_AUTO_WRITER_THREADS = 8  # past this a rank's writes are bound by the disk, not by threads


def writer_threads(setting: int | str = "auto", environ=None) -> int:
    """Files each rank writes (and hashes) at once: ``checkpoint.writer_threads``, or for ``auto`` this
    rank's share of the cores it may run on (affinity / LOCAL_WORLD_SIZE, the ranks on this node), 1-8."""
    if setting != "auto":
        return int(setting)
    from gptoss_cloud.contract.hostinfo import usable_cpus

    environ = os.environ if environ is None else environ
    cores = usable_cpus()  # affinity, capped by a container's CPU limit
    try:
        local = max(1, int(environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        local = 1
    return max(1, min(MAX_AUTO_WRITER_THREADS, cores // local))


def spec_hash(spec_yaml: str) -> str:
    return hashlib.sha256(spec_yaml.encode()).hexdigest()[:16]


class Checkpointer(Saving, Publishing, Resuming):
    def __init__(self, cfg, home: str, *, spec=None, local_dir: str | None = None, process_group=None,
                 record_metrics: bool = True, overlap_staging: bool = False):
        """``cfg`` is the spec's ``checkpoint`` section; ``home`` the run home URI (s3://… or a folder).

        ``record_metrics``: rank 0 appends each save's measurements to ``<home>/metrics.jsonl``.
        ``overlap_staging``: an async save copies the state to host memory in the background instead of
        before ``save`` returns; the caller promises to call :meth:`before_update` before it next changes
        the state (the loop does, before each optimizer step)."""
        self.cfg = cfg
        self.home = str(home).rstrip("/")
        self.store = open_store(self.home, retry_s=cfg.store_retry_s)
        self.ckpts = self.store.child("checkpoints")
        self.spec_yaml = spec.to_yaml() if spec is not None else None
        self.spec_hash = spec_hash(self.spec_yaml) if self.spec_yaml else None
        self.method = spec.method.kind if spec is not None else None
        # A tiny LoRA run (random weights) must keep its base: nothing else could rebuild it for a merge.
        # (The trainer saves it itself; this covers callers without it. Larger random bases are not kept.)
        self.pg = process_group
        self.key = signing_key()
        self._local_dir = local_dir or cfg.local_dir
        self._spec = spec
        self._ready = False
        self.dist, self.rank, self.world = False, 0, 1
        self.attempt = ""  # shared by every rank of this process group; stamped on each part it uploads
        self.local_root, self.in_place = Path("."), False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.threads = writer_threads(getattr(cfg, "writer_threads", "auto"))
        self.overlap_staging = overlap_staging
        self._stager = None  # one DefaultStager per run: its pinned host buffers are reused by every save
        self._staging = None  # the in-flight async save's staging future, until before_update()
        self.last_saved: int | None = None
        self.record_metrics = record_metrics
        self.events: list[dict] = []  # this rank's measurements, one per finished save (see the module doc)

    def _setup(self) -> None:
        """Bind to the process group (the loop builds the Checkpointer before torch.distributed starts)."""
        if self._ready:
            return
        self._ready = True
        self.dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.dist else 0
        self.world = dist.get_world_size() if self.dist else 1
        if self.dist and self.pg is None:
            # Our own CPU group: an async save's background thread runs DCP collectives on it while the
            # training thread keeps using the default group; sharing one group would interleave them.
            # Its timeout bounds every wait of a save on a peer (checkpoint.peer_timeout_s), not gloo's 30 min.
            self.pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.peer_timeout_s))
        # A fresh id per attempt: a part a killed attempt left behind never completes this one's checkpoint.
        self.attempt = self._bcast(uuid.uuid4().hex[:16] if self.rank == 0 else None)
        local = self._local_dir
        if isinstance(self.ckpts, LocalStore) and not local:
            # A local store is already local disk: write in place, no second copy.
            self.local_root, self.in_place = Path(self.ckpts.root), True
        else:
            run_id = self.home.rsplit("/", 1)[-1]
            self.local_root = Path(local or Path(tempfile.gettempdir()) / "gptoss-cloud" / run_id / "checkpoints")
            self.in_place = False
        if self._spec is not None:  # fail before training, with numbers, not after hours at the first save
            self.store.check_access(write=self.rank == 0)
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                check_local_room(self._spec, self.local_root)

    def maybe_save(self, step: int, state, *, last: bool = False, final: bool = False) -> bool:
        """Save when ``step`` is a multiple of checkpoint.every_steps, or at the end (``last``/``final``)."""
        every = self.cfg.every_steps
        if last or final or (every and step % every == 0):
            if self.last_saved == step:
                return False
            self.save(step, state)
            if last or final:  # the run ends here (and may merge next): the checkpoint must be published
                self.wait()
            return True
        return False

    def before_update(self) -> None:
        """Called before the saved state changes (each optimizer step): an async save still copying the
        state to host memory in the background finishes that copy first. A no-op otherwise."""
        staging, self._staging = self._staging, None
        if staging is not None:
            try:
                staging.result()
            except BaseException as e:
                raise CheckpointError(f"staging a checkpoint for its async save failed: {e}") from e

    def wait(self) -> None:
        """Block until this rank's part of the checkpoint in flight is uploaded (rank 0: published)."""
        self.before_update()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"saving a checkpoint failed: {_reason(err)}") from err

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    def restore(self, state) -> int:
        """Load the newest usable published checkpoint into ``state``; return its step (0: fresh start)."""
        state = as_state(state)
        self._setup()
        step = self._restore(state)
        return step

    def _bcast(self, obj):
        if not self.dist:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def _agree(self, failure: tuple[str, str] | None) -> tuple[str, str] | None:
        """Every rank learns whether any rank failed, so all fall back (or retry) together. Any rank's integrity
        failure makes the checkpoint unusable for all; otherwise any rank's transient failure is retried by all."""
        if not self.dist:
            return failure
        fails: list = [None] * self.world
        dist.all_gather_object(fails, failure, group=self.pg)
        bad = [(r, f) for r, f in enumerate(fails) if f]
        if not bad:
            return None
        kinds = {f[0] for _, f in bad}
        kind = ckpt_faults.INTEGRITY if ckpt_faults.INTEGRITY in kinds else ckpt_faults.TRANSIENT
        return kind, "; ".join(dict.fromkeys(f"rank {r}: {f[1]}" if self.world > 1 else f[1] for r, f in bad if f[0] == kind))
