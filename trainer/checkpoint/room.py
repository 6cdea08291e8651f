"""How big a checkpoint is, and whether the local checkpoint folder can hold two of them.

The size is the planner's (``contract.plan.disk``), so the preflight and ``plan`` agree. The local folder must
hold two checkpoints: the newest stays while the next is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gptoss_cloud.contract.errors import PlanError
from gptoss_cloud.contract.shapes import ModelShape, shape_for

GiB = 1024**3


def checkpoint_bytes(spec, shape: ModelShape | None = None) -> float:
    """Bytes of one checkpoint of this run, all ranks together: the planner's formula (master weights and
    both moments per trainable parameter, as ``optim`` chooses them)."""
    from gptoss_cloud.contract.plan.disk import checkpoint_bytes as planned

    return planned(shape or shape_for(spec.model.name, spec.model.layers), spec)


def check_local_room(spec, folder: str | Path, shape: ModelShape | None = None, nodes: int | None = None) -> int:
    """Fail early, with the numbers, unless ``folder`` has room for two checkpoints (this node's share)."""
    nodes = nodes or spec.parallelism.nodes
    need = int(2 * checkpoint_bytes(spec, shape) // nodes)
    p = Path(folder)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise PlanError(
            f"checkpoint folder {p} has {free / GiB:.1f} GiB free; two checkpoints of this run need "
            f"{need / GiB:.1f} GiB on this node (2 x {need / 2 / GiB:.1f} GiB, {spec.method.kind} on "
            f"{spec.model.name}, {nodes} node(s))",
            hint="point checkpoint.local_dir at a larger volume (or give the pod a bigger ephemeral disk)",
        )
    return need


def local_checkpoint_dir(spec, home: str, run_id: str | None = None) -> Path:
    """Where shards are written before upload: checkpoint.local_dir, the store itself when it is a folder,
    else a temporary folder per run."""
    import tempfile

    from gptoss_cloud.contract.store.objects import is_remote, join

    if spec.checkpoint.local_dir:
        return Path(spec.checkpoint.local_dir)
    if not is_remote(home):
        return Path(join(home.removeprefix("file://"), "checkpoints"))
    run_id = run_id or home.rstrip("/").rsplit("/", 1)[-1]
    return Path(tempfile.gettempdir()) / "gptoss-cloud" / run_id / "checkpoints"


def preflight(spec, home: str, *, write: bool = True) -> None:
    """Before training (and before submit): the run home is reachable and writable, and the local
    checkpoint folder can hold two checkpoints. Each failure is one line naming the URI / folder."""
    from gptoss_cloud.contract.store.objects import open_store

    open_store(home).check_access(write=write)
    check_local_room(spec, local_checkpoint_dir(spec, home))
