"""How big a checkpoint is, and whether the local checkpoint folder can hold two of them.

Pure arithmetic on the model shape (no torch), so the planner can reuse it. The local folder must
hold two checkpoints: the newest stays while the next is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gptoss_cloud.contract.errors import PlanError
from gptoss_cloud.contract.shapes import ModelShape, shape_for

GiB = 1024**3
_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def lora_params(shape: ModelShape, lora) -> int:
    """Trainable LoRA parameters: r x (in + out) per adapted matrix (x experts for the 3-D expert weights)."""
    h, q, kv = shape.hidden_size, shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    per_layer = sum(lora.r * sum(dims[m]) for m in lora.target_modules if m in dims)
    total = per_layer * shape.num_hidden_layers
    if lora.experts:
        layers = len(lora.expert_layers) if lora.expert_layers is not None else shape.num_hidden_layers
        i, e = shape.intermediate_size, shape.num_local_experts
        total += layers * e * lora.r * ((h + 2 * i) + (i + h))
    if lora.router:
        total += shape.num_hidden_layers * lora.r * (h + shape.num_local_experts)
    return total


def checkpoint_bytes(spec, shape: ModelShape | None = None) -> int:
    """Bytes of one checkpoint of this run, all ranks together.

    Full fine-tuning: parameters plus AdamW's two moments, all in the training dtype. LoRA: the adapter
    in fp32 with its two moments (the frozen base is not checkpointed).
    """
    shape = shape or shape_for(spec.model.name, spec.model.layers)
    if spec.method.kind == "full":
        return 3 * _DTYPE_BYTES[spec.model.dtype] * shape.total_params
    return 3 * 4 * lora_params(shape, spec.method.lora)


def check_local_room(spec, folder: str | Path, shape: ModelShape | None = None, nodes: int | None = None) -> int:
    """Fail early, with the numbers, unless ``folder`` has room for two checkpoints (this node's share)."""
    nodes = nodes or spec.parallelism.nodes
    need = 2 * checkpoint_bytes(spec, shape) // nodes
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
