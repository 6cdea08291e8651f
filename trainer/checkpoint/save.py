"""Saving: the state written as DCP shards (sync, or async with background staging) to a local folder.

Each save goes into a new ``step-N`` folder; when its files are written, ``Publishing`` hashes,
uploads and publishes them. Part of ``Checkpointer``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from gptoss_cloud.trainer.checkpoint import faults as ckpt_faults, state as ckpt_state
from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError, list_published, step_dir
from gptoss_cloud.trainer.checkpoint.train_state import MODEL_KEYS, as_state, language_model, model_config, model_state

log = logging.getLogger("gptoss_cloud.checkpoint")
_reason = ckpt_faults.reason


class Saving:
    """The save half of ``Checkpointer`` (its attributes: ``cfg``, ``local_root``, ``rank``, ``threads`` ...)."""

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
        sd = model_state(state)
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

    def _write_adapter_config(self, model, folder: Path) -> None:
        cfg = getattr(language_model(model), "peft_config", None)
        if not cfg:
            return
        import json

        d = cfg["default"].to_dict()
        (folder / "adapter_config.json").write_text(json.dumps(d, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
