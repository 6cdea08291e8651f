"""Publishing: a written checkpoint hashed, uploaded, folded into its manifest, older ones removed.

Each rank uploads its own files and writes its part; rank 0 writes the manifest once every rank of
this attempt has reported (``checkpoint.peer_timeout_s``), then prunes beyond ``keep_last``. Each
save's measurements are recorded here. Part of ``Checkpointer``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from gptoss_cloud.contract.store.objects import upload_files

from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError, Manifest, file_entries, parse_step, parts_status, prune, publish, step_dir, write_part
from gptoss_cloud.trainer.checkpoint.stats import checkpoint_line

log = logging.getLogger("gptoss_cloud.checkpoint")


class Publishing:
    """The publish half of ``Checkpointer`` (its attributes: ``ckpts``, ``rank``, ``world``, ``attempt`` ...)."""

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
