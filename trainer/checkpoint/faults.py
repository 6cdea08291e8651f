"""What a failed checkpoint load or save means, and what it costs (docs/checkpoints.md has the table).

Only an integrity failure says anything about the checkpoint itself: a hash or size mismatch, a
signature that does not verify, an unsafe pickle, a missing part or file, content that does not fit the
model. Such a checkpoint is unusable and the restore falls back to an older one (and unpublishes the
newer ones once an older one loads). A transient failure (out of memory, a dropped connection, an
S3 outage that outlasted the store's retries, a disk error) says nothing about the checkpoint: it is
retried, and if it persists the run fails and the checkpoint stays published for the next attempt.
"""

from __future__ import annotations

import errno

from gptoss_cloud.contract.errors import StoreError
from gptoss_cloud.contract.store.objects import StoreNotFound

from gptoss_cloud.trainer.checkpoint.manifest import CheckpointError

TRANSIENT, INTEGRITY = "transient", "integrity"
LOAD_RETRY_DELAYS_S = (1.0, 2.0)  # a transient load failure is tried 1 + len(...) times in all

# Local-disk failures that mean "the checkpoint's files are not what they should be" rather than "try again".
_INTEGRITY_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR}


def cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (which carries one per failed rank)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = getattr(inner, "exc", inner[0] if isinstance(inner, tuple) else inner)  # (exception, traceback)
        return inner if isinstance(inner, BaseException) else e
    return e


def kind(e: BaseException) -> str:
    e = cause(e)
    if isinstance(e, (CheckpointError, StoreNotFound)):
        return INTEGRITY
    if isinstance(e, (MemoryError, TimeoutError, StoreError)):
        return TRANSIENT
    if isinstance(e, OSError):
        return INTEGRITY if e.errno in _INTEGRITY_ERRNOS else TRANSIENT
    return INTEGRITY  # a shape, key or type mismatch: this checkpoint does not fit, another may


def reason(e: BaseException) -> str:
    """One line: the message of a GptossError, else ``Type: text`` (first line only)."""
    e = cause(e)
    msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
    return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: torch.save reports a full disk as a RuntimeError about a zip
    position, raised while handling the OSError that said so."""
    seen: set[int] = set()
    todo = [e, cause(e)]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo += [x.__cause__, x.__context__]
    return False
