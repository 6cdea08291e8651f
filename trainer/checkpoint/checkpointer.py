"""Sharded checkpoints: save with torch.distributed.checkpoint, publish to the run store, resume.

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
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gptoss_cloud.contract.store.keys import contained
from gptoss_cloud.contract.store.objects import LocalStore, StoreNotFound, open_store, upload_files

from gptoss_cloud.trainer.checkpoint import faults as ckpt_faults, state as ckpt_state
from gptoss_cloud.trainer.checkpoint.manifest import MANIFEST, CheckpointError, Manifest, file_entries, list_published, parallel_map, parse_step, parts_status, prune, publish, read_manifest, signing_key, step_dir, write_part
from gptoss_cloud.trainer.checkpoint.room import check_local_room, checkpoint_bytes, preflight  # noqa: F401 (re-exported for the planner)
from gptoss_cloud.trainer.checkpoint.safety import FetchingReader, SafeLoadPlanner, safe_load_metadata
from gptoss_cloud.trainer.checkpoint.stats import checkpoint_line

log = logging.getLogger("gptoss_cloud.checkpoint")
MODEL_KEYS = ("model", "optimizer")


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


def _unwrap_optimizer(opt):
    # accelerate wraps the optimizer; DCP's state_dict helpers want the torch one.
    return getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt


_reason = ckpt_faults.reason


class _Progress:
    """Step, token count and extras of the loop's TrainState, as one Stateful."""

    def __init__(self, ts):
        self.ts = ts

    def state_dict(self) -> dict:
        return {"step": self.ts.step, "tokens": self.ts.tokens, "extra": dict(self.ts.extra)}

    def load_state_dict(self, st: dict) -> None:
        self.ts.step, self.ts.tokens = int(st["step"]), int(st["tokens"])
        self.ts.extra.clear()
        self.ts.extra.update(st.get("extra") or {})


def as_state(state) -> Mapping[str, Any]:
    """Accept either a mapping of Stateful objects or the loop's TrainState (module, optimizer, scheduler, data, …)."""
    if isinstance(state, Mapping):
        return state
    from gptoss_cloud.trainer.checkpoint.state import RNGState

    return {"model": state.module, "optimizer": state.optimizer, "scheduler": state.scheduler, "data": state.data,
            "progress": _Progress(state), "rng": RNGState()}


def language_model(model):
    """The (possibly peft-wrapped) GptOssForCausalLM inside the trained module (the loop's wrapper holds it as ``lm``)."""
    return getattr(model, "lm", model) if model is not None else None


def model_config(model):
    """The transformers config of the (possibly peft-wrapped) model, saved with each checkpoint for merging."""
    inner = language_model(model)
    if inner is None:
        return None
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return getattr(inner, "config", None)


def _has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def make_fetcher(ckpts, step: int, folder: Path, manifest: Manifest, where: str, threads: int = 1):
    """fetch(paths): make each checkpoint file present under ``folder`` and verified against the manifest.

    Up to ``threads`` files are verified (and downloaded) at once. ``fetch.downloaded`` lists what came
    from the store (the rest was a verified local copy).
    """
    verified: set[str] = set()
    downloaded: list[str] = []
    in_place = isinstance(ckpts, LocalStore)

    def one(rel: str) -> None:
        # Only what the manifest names (its keys are checked when it is read), never outside ``folder``:
        # DCP's metadata names the files too, and a bucket writer chooses both.
        if rel not in manifest.files:
            raise CheckpointError(f"{where}/{rel}: not listed in the manifest")
        local = contained(folder, rel, where=where)
        if local.exists():  # a local copy (this node wrote it, or an earlier attempt fetched it)
            try:
                manifest.check_file(rel, local, where)
                verified.add(rel)
                return
            except CheckpointError:
                pass  # stale or damaged: fetch it again (a no-op when the store is this folder)
        if not (in_place and local.resolve() == (Path(ckpts.root) / step_dir(step) / rel).resolve()):
            downloaded.append(rel)
        ckpts.download_file(f"{step_dir(step)}/{rel}", local)
        manifest.check_file(rel, local, where)
        verified.add(rel)

    def fetch(paths: Iterable[str]) -> None:
        todo = [rel for rel in paths if rel not in verified]
        parallel_map(one, todo, threads, size=lambda rel: int((manifest.files.get(rel) or {}).get("size", 0)))

    fetch.downloaded = downloaded
    return fetch


class Checkpointer:
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

    # ------------------------------------------------------------------------------------------ save
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

    def save(self, step: int, state) -> None:
        t0 = time.perf_counter()
        state = as_state(state)
        self._setup()
        self.wait()  # one checkpoint in flight at a time
        waited = time.perf_counter() - t0
        published = self._bcast(step in list_published(self.ckpts) if self.rank == 0 else None)
        if published:  # never overwrite a published checkpoint (e.g. the last step of a resumed run)
            log.info("checkpoint step %d is already published; not saving it again", step)
            self.last_saved = step
            return
        folder = self.local_root / step_dir(step)
        try:
            self._write_small_files(folder, state)
        except OSError as e:
            raise self._write_failed(step, folder, e) from e
        sd = self._model_state(state)
        # Several files per rank, written by as many threads: one file per rank writes (and later hashes)
        # at one core's speed, which for a 26 GB shard is most of a sync save.
        writer = dcp.FileSystemWriter(str(folder), thread_count=self.threads)
        ev: dict[str, Any] = {"event": "checkpoint", "step": step, "mode": "async" if self.cfg.async_save else "sync",
                              "wait_prev_s": round(waited, 4), "blocking_s": None, "write_s": None, "hash_s": None,
                              "upload_s": None, "total_s": None, "prune_s": None, "bytes": None,
                              "writer_threads": self.threads}
        if self.cfg.async_save:
            stager = self._async_stager() if self.overlap_staging else None
            kw = {"async_stager": stager} if stager is not None else {}
            resp = dcp.async_save(sd, storage_writer=writer, process_group=self.pg, **kw)
            ev["blocking_s"] = time.perf_counter() - t0  # set before the thread starts: it records the event
            staging = getattr(resp, "staging_completion", None)
            if self.overlap_staging and staging is not None:
                # Staged (copied to host memory) while the next step computes; its upload follows.
                ev["staged_s"] = None
                staging.add_done_callback(lambda _f, ev=ev, t0=t0: ev.__setitem__("staged_s", time.perf_counter() - t0))
                self._staging = staging
            fut = getattr(resp, "upload_completion", resp)
            self._thread = threading.Thread(target=self._background, args=(step, folder, fut, ev, t0), daemon=True,
                                            name=f"ckpt-publish-{step}")
            self._thread.start()
        else:
            try:
                dcp.save(sd, storage_writer=writer, process_group=self.pg)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's error is a BaseException
                raise self._write_failed(step, folder, e) from e
            ev["write_s"] = time.perf_counter() - t0
            self._publish(step, folder, ev, t0)
            ev["blocking_s"] = time.perf_counter() - t0
            # Published: the loop goes on while older checkpoints are deleted; wait() joins this.
            self._thread = threading.Thread(target=self._clean_up_and_record, args=(step, ev), daemon=True,
                                            name=f"ckpt-prune-{step}")
            self._thread.start()
        self.last_saved = step

    def _write_small_files(self, folder: Path, state: Mapping[str, Any]) -> None:
        (folder / "extra").mkdir(parents=True, exist_ok=True)
        extras = {k: v.state_dict() for k, v in state.items() if k not in MODEL_KEYS}
        (folder / "extra" / f"rank-{self.rank}.json").write_bytes(ckpt_state.dumps(extras))
        if self.rank == 0:
            if self.spec_yaml:
                (folder / "spec.yaml").write_text(self.spec_yaml)
            self._write_adapter_config(state.get("model"), folder)
            if (cfg := model_config(state.get("model"))) is not None:
                (folder / "config.json").write_text(cfg.to_json_string())

    def _write_failed(self, step: int, folder: Path, e: BaseException) -> CheckpointError:
        """One line for a save whose local write failed: nothing of it was published."""
        if ckpt_faults.is_disk_full(e):
            usage = shutil.disk_usage(folder if folder.exists() else self.local_root)
            return CheckpointError(
                f"step {step}: the disk holding {folder} is full ({usage.free / 2**20:.1f} MiB free of "
                f"{usage.total / 2**20:.0f} MiB) while writing the checkpoint; not published (the previous one stays)",
                hint="free space there or point checkpoint.local_dir at a larger volume")
        return CheckpointError(f"step {step}: writing the checkpoint to {folder} failed: {_reason(e)}; not published")

    def _background(self, step, folder, fut, ev, t0) -> None:
        try:
            try:
                fut.result()
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                raise self._write_failed(step, folder, e) from e
            ev["write_s"] = time.perf_counter() - t0
            self._publish(step, folder, ev, t0)
        except BaseException as e:  # surfaced by wait()
            self._error = e
            return
        self._clean_up_and_record(step, ev)

    def _clean_up_and_record(self, step: int, ev: dict) -> None:
        """Remove older checkpoints, then record the save (its checkpoint is published either way)."""
        try:
            self._clean_up(step, ev)
        except BaseException as e:  # surfaced by wait()
            self._error = e
        self._record(ev)

    def _record(self, ev: dict) -> None:
        """Keep this save's measurements; rank 0 logs them and appends them to metrics.jsonl."""
        for k in ("blocking_s", "staged_s", "write_s", "hash_s", "upload_s", "total_s", "prune_s"):
            if ev.get(k) is not None:
                ev[k] = round(ev[k], 4)
        self.events.append(ev)
        if self.rank != 0:
            log.debug("rank %d: %s", self.rank, checkpoint_line(ev))
            return
        log.info("%s", checkpoint_line(ev))
        if self.record_metrics:
            try:
                from gptoss_cloud.trainer.metrics import writer_for

                writer_for(self.home).write({k: v for k, v in ev.items() if k != "uri"})
            except Exception as e:  # noqa: BLE001 - a metrics hiccup must not fail a published checkpoint
                log.warning("could not record checkpoint metrics for step %d: %s", ev["step"], e)

    def before_update(self) -> None:
        """Called before the saved state changes (each optimizer step): an async save still copying the
        state to host memory in the background finishes that copy first. A no-op otherwise."""
        staging, self._staging = self._staging, None
        if staging is not None:
            try:
                staging.result()
            except BaseException as e:
                raise CheckpointError(f"staging a checkpoint for its async save failed: {e}") from e

    def _async_stager(self):
        """DCP's DefaultStager, copying in the background (None where this torch has no such stager:
        async_save then stages before it returns, as without overlap_staging)."""
        if self._stager is None:
            try:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            except ImportError:
                return None
            cuda = torch.cuda.is_available()  # pinned buffers and non-blocking copies only with a GPU
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
        return self._stager

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

    def _own_files(self, folder: Path) -> list[str]:
        own = [f"extra/rank-{self.rank}.json"]
        own += sorted(p.name for p in folder.glob(f"__{self.rank}_*.distcp"))
        if self.rank == 0:
            own += [n for n in (".metadata", "spec.yaml", "adapter_config.json", "config.json") if (folder / n).exists()]
        return own

    def _publish(self, step: int, folder: Path, ev: dict | None = None, t0: float | None = None) -> None:
        ev = {} if ev is None else ev
        t0 = time.perf_counter() if t0 is None else t0
        t_hash = time.perf_counter()
        files = file_entries(folder, self._own_files(folder), self.threads)
        ev["hash_s"] = time.perf_counter() - t_hash
        ev["rank_bytes"] = sum(f["size"] for f in files.values())
        ev["uri"] = f"{self.ckpts.uri}/{step_dir(step)}"
        if not self.in_place:
            upload_files(self.ckpts, [(folder / rel, f"{step_dir(step)}/{rel}") for rel in files])
            ev["upload_s"] = time.perf_counter() - t0
        write_part(self.ckpts, step, self.rank, files, attempt=self.attempt)
        if self.rank != 0:
            return
        timeout = self.cfg.peer_timeout_s
        deadline = time.monotonic() + timeout
        while (status := parts_status(self.ckpts, step, self.world, attempt=self.attempt))[1]:
            if time.monotonic() > deadline:
                ranks = ", ".join(map(str, status[1]))
                raise CheckpointError(f"step {step}: rank {ranks} did not report its uploaded shards within {timeout:g}s "
                                      "(checkpoint.peer_timeout_s; a dead or stuck peer); not published, the previous "
                                      "checkpoint stays")
            time.sleep(0.2)
        all_files = status[0]
        manifest = Manifest(step=step, world_size=self.world, files=all_files, spec_hash=self.spec_hash,
                            method=self.method, extra={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                       "attempt": self.attempt})
        publish(self.ckpts, manifest, self.key)
        ev["total_s"] = time.perf_counter() - t0
        ev["bytes"] = sum(f["size"] for rel, f in all_files.items() if rel.endswith(".distcp"))
        ev["manifest_bytes"] = sum(f["size"] for f in all_files.values())
        ev["files"] = len(all_files)

    def _clean_up(self, step: int, ev: dict) -> None:
        """After ``step`` is published: drop this node's older local copies and (rank 0) the store's beyond keep_last."""
        if self.in_place and self.rank != 0:
            return  # nothing of this rank's to remove (prune_s stays None)
        t = time.perf_counter()
        if not self.in_place:  # the newest local copy stays for a fast resume; older ones go
            for old in self.local_root.glob("step-*"):
                s = parse_step(old.name)
                if s is not None and s < step:
                    shutil.rmtree(old, ignore_errors=True)
        if self.rank == 0:
            try:
                dropped = prune(self.ckpts, self.cfg.keep_last, newest=step)
            except Exception as e:  # noqa: BLE001 - reported with what was and was not done
                raise CheckpointError(f"step {step} is published, but removing older checkpoints from {self.ckpts.uri} "
                                      f"failed: {getattr(e, 'message', None) or f'{type(e).__name__}: {e}'}") from e
            if dropped:
                log.info("published checkpoint %s/%s; removed step %s", self.ckpts.uri, step_dir(step), dropped)
        ev["prune_s"] = time.perf_counter() - t

    # --------------------------------------------------------------------------------------- restore
    def restore(self, state) -> int:
        """Load the newest usable published checkpoint into ``state``; return its step (0: fresh start)."""
        state = as_state(state)
        self._setup()
        step = self._restore(state)
        return step

    def _restore(self, state: Mapping[str, Any]) -> int:
        mode = self.cfg.resume
        if mode == "never":
            return 0
        ckpts = self.ckpts
        if mode != "auto":  # an explicit checkpoint URI: .../checkpoints/step-N
            base, _, name = mode.rstrip("/").rpartition("/")
            if parse_step(name) is None:
                raise CheckpointError(f"checkpoint.resume {mode!r}: expected auto, never, or a URI ending in /step-N")
            ckpts, candidates = open_store(base, retry_s=self.cfg.store_retry_s), [parse_step(name)]
        else:
            candidates = self._bcast(list_published(ckpts) if self.rank == 0 else None)
        if not candidates:
            return 0
        errors = []
        for step in candidates:
            err = self._load_with_retries(ckpts, step, state)
            if err is None:
                if errors:
                    log.warning("resumed from the older checkpoint %s/%s", ckpts.uri, step_dir(step))
                    if self.rank == 0 and mode == "auto":
                        self._reject([s for s in candidates if s > step], ckpts)
                return step
            errors.append(f"{step_dir(step)}: {err}")
            log.warning("WARNING: checkpoint %s/%s is unusable (%s); falling back to the previous one", ckpts.uri, step_dir(step), err)
        raise CheckpointError(
            f"no usable checkpoint under {ckpts.uri} ({len(candidates)} published): " + "; ".join(errors),
            hint="set checkpoint.resume: never to start over (new checkpoints replace these)",
        )

    def _load_with_retries(self, ckpts, step: int, state: Mapping[str, Any]) -> str | None:
        """None once ``step`` is loaded; its integrity failure otherwise. A transient failure is retried and,
        if it persists, fails the run: the checkpoint stays published for the next attempt."""
        where = f"{ckpts.uri.rstrip('/')}/{step_dir(step)}"
        delays = list(ckpt_faults.LOAD_RETRY_DELAYS_S)
        while True:
            kind, err = self._try_load(ckpts, step, state)
            if kind != ckpt_faults.TRANSIENT:
                return err
            if not delays:
                raise CheckpointError(
                    f"{where}: loading failed {len(ckpt_faults.LOAD_RETRY_DELAYS_S) + 1} times with a transient "
                    f"error ({err}); the checkpoint stays published and the next attempt retries it",
                    hint="check the node's memory, disk and network, then restart the run")
            delay = delays.pop(0)
            log.warning("loading %s failed with a transient error (%s); retrying in %.0fs", where, err, delay)
            time.sleep(delay)

    def _reject(self, steps: list[int], ckpts) -> None:
        """Unpublish checkpoints every rank found unusable, so this run's next saves replace them.

        The manifest is kept aside as manifest.rejected.json (evidence of corruption or tampering)."""
        for s in steps:
            key = f"{step_dir(s)}/{MANIFEST}"
            try:
                ckpts.write_bytes(f"{step_dir(s)}/manifest.rejected.json", ckpts.read_bytes(key))
            except StoreNotFound:
                continue
            ckpts.delete(key)
            log.warning("unpublished the unusable checkpoint %s/%s (its manifest is kept as manifest.rejected.json)",
                        ckpts.uri, step_dir(s))

    def _try_load(self, ckpts, step: int, state: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(None, None) once loaded, else (ckpt_faults.INTEGRITY or TRANSIENT, why), agreed by every rank."""
        where = f"{ckpts.uri.rstrip('/')}/{step_dir(step)}"
        # A local store is read in place; S3 checkpoints are fetched into the local folder.
        folder = (Path(ckpts.root) if isinstance(ckpts, LocalStore) else self.local_root) / step_dir(step)
        manifest = None
        fetch = None
        try:  # phase 1: the manifest, DCP metadata and this rank's small files
            manifest = read_manifest(ckpts, step, self.key)
            fetch = self._fetcher(ckpts, step, folder, manifest, where)
            fetch([".metadata"])
            safe_load_metadata((folder / ".metadata").read_bytes(), f"{where}/.metadata")
            same_world = manifest.world_size == self.world
            if same_world:  # this rank vouches for its own shards: verified whole, before any rank reads them
                fetch(sorted(rel for rel in manifest.files if rel.startswith(f"__{self.rank}_") and rel.endswith(".distcp")))
            src_rank = self.rank if self.rank < manifest.world_size else 0
            fetch([f"extra/rank-{src_rank}.json"])
            extras = ckpt_state.loads((folder / "extra" / f"rank-{src_rank}.json").read_bytes())
            failure = None
        except Exception as e:  # noqa: BLE001 - classified, then agreed on by every rank
            failure = (ckpt_faults.kind(e), _reason(e))
        if (failure := self._agree(failure)) is not None:
            return failure
        if manifest.world_size != self.world:
            log.warning("resharding checkpoint %s from %d to %d processes", where, manifest.world_size, self.world)
        if self.spec_hash and manifest.spec_hash and manifest.spec_hash != self.spec_hash and self.rank == 0:
            log.warning("the run spec changed since %s was saved; continuing with the new spec", where)
        try:  # phase 2: tensors (DCP reports any rank's failure on every rank)
            sd = self._model_state(state)
            if sd:
                # Same world size: another rank's shard is only read for the few replicated entries DCP stored
                # there once; fetch those byte ranges, not the file (its owner verified it whole). Resharding:
                # whole files, each verified by the rank that reads it.
                remote = not isinstance(ckpts, LocalStore)

                def ranged(rel: str) -> bool:
                    return (remote and same_world and rel.endswith(".distcp") and not rel.startswith(f"__{self.rank}_")
                            and not (folder / rel).exists())

                reader = FetchingReader(str(folder), fetch, where, ranged=ranged,
                                        read_range=lambda rel, off, n: ckpts.read_range(f"{step_dir(step)}/{rel}", off, n))
                dcp.load(sd, storage_reader=reader, planner=SafeLoadPlanner(), process_group=self.pg)
                self._set_model_state(state, sd)
            # Everything else, then RNG last: restoring RNG first would let later restores draw from it.
            names = [k for k in state if k not in MODEL_KEYS]
            for k in sorted(names, key=lambda k: bool(getattr(state[k], "restore_last", False))):
                if k not in extras:
                    raise CheckpointError(f"{where}: no saved state for {k!r}")
                state[k].load_state_dict(extras[k])
            failure = None
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on below, then a fallback reason
            failure = (ckpt_faults.kind(e), _reason(e))
        if (failure := self._agree(failure)) is None:
            log.info("rank %d restored %s; downloaded %s", self.rank, where, sorted(fetch.downloaded) or "nothing (local copy)")
            return None, None
        return failure

    def _fetcher(self, ckpts, step: int, folder: Path, manifest: Manifest, where: str):
        return make_fetcher(ckpts, step, folder, manifest, where, threads=self.threads)

    # ------------------------------------------------------------------------------- model + optim
    def _options(self, model) -> StateDictOptions:
        # LoRA: only the adapter (trainable) weights; the frozen base comes from the base model.
        return StateDictOptions(ignore_frozen_params=_has_frozen(model), strict=not _has_frozen(model))

    def _model_state(self, state: Mapping[str, Any]) -> dict:
        model = state.get("model")
        if model is None:
            return {}
        opt = state.get("optimizer")
        if opt is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return {"model": get_model_state_dict(model, options=self._options(model))}
        msd, osd = get_state_dict(model, _unwrap_optimizer(opt), options=self._options(model))
        return {"model": msd, "optimizer": osd}

    def _set_model_state(self, state: Mapping[str, Any], sd: dict) -> None:
        model, opt = state["model"], state.get("optimizer")
        if opt is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, sd["model"], options=self._options(model))
        else:
            set_state_dict(model, _unwrap_optimizer(opt), model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                           options=self._options(model))

    def _write_adapter_config(self, model, folder: Path) -> None:
        cfg = getattr(language_model(model), "peft_config", None)
        if not cfg:
            return
        import json

        d = cfg["default"].to_dict()
        (folder / "adapter_config.json").write_text(json.dumps(d, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

    # ------------------------------------------------------------------------------- collectives
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
