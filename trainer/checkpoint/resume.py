"""Resuming: the newest usable published checkpoint, verified file by file, loaded on every rank.

Each rank fetches (or finds locally) and verifies what it reads against the manifest; every rank
agrees on each phase's outcome, so all fall back to an older checkpoint together (an integrity
failure) or retry together (a transient one). Part of ``Checkpointer``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from gptoss_cloud.contract.store.keys import contained
from gptoss_cloud.contract.store.objects import LocalStore, StoreNotFound, open_store

from gptoss_cloud.trainer.checkpoint import faults as ckpt_faults, state as ckpt_state
from gptoss_cloud.trainer.checkpoint.manifest import MANIFEST, CheckpointError, Manifest, list_published, parallel_map, parse_step, read_manifest, step_dir
from gptoss_cloud.trainer.checkpoint.safety import FetchingReader, SafeLoadPlanner, safe_load_metadata
from gptoss_cloud.trainer.checkpoint.train_state import MODEL_KEYS, model_state, set_model_state

log = logging.getLogger("gptoss_cloud.checkpoint")
_reason = ckpt_faults.reason


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


class Resuming:
    """The restore half of ``Checkpointer`` (its attributes: ``cfg``, ``ckpts``, ``rank``, ``world`` ...)."""

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
            metadata = safe_load_metadata((folder / ".metadata").read_bytes(), f"{where}/.metadata")
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
        _same_expert_units(metadata.state_dict_metadata, state.get("model"), where)
        if manifest.world_size != self.world:
            log.warning("resharding checkpoint %s from %d to %d processes", where, manifest.world_size, self.world)
        if self.spec_hash and manifest.spec_hash and manifest.spec_hash != self.spec_hash and self.rank == 0:
            log.warning("the run spec changed since %s was saved; continuing with the new spec", where)
        try:  # phase 2: tensors (DCP reports any rank's failure on every rank)
            sd = model_state(state)
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
                set_model_state(state, sd)
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


def _same_expert_units(saved: Iterable[str], model, where: str) -> None:
    """A checkpoint holds a layer's experts as the FSDP2 units it was trained with (parallelism.expert_units):
    resuming under another split is a spec change, not a damaged checkpoint, so it stops the run here (on
    every rank alike, before any tensor is read) and every checkpoint stays published."""
    from gptoss_cloud.contract.errors import GptossError
    from gptoss_cloud.trainer.kernels.expert_units import SplitExperts, unit_key

    if model is None:
        return
    keys = [unit_key(k.removeprefix("model.")) for k in saved]
    was = 1 + max((k[1] for k in keys if k), default=0)
    now = max((len(m.units) for m in model.modules() if isinstance(m, SplitExperts)), default=1)
    if was != now:
        raise GptossError(f"{where} was trained with parallelism.expert_units: {was}, this run has {now}",
                          hint=f"set parallelism.expert_units: {was} to resume it (the checkpoint is kept)")
