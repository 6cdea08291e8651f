"""What every plan counts from: bytes per element, the model shape, and the one count of trainable parameters."""

from __future__ import annotations

from gptoss_cloud.contract.errors import SpecError
from gptoss_cloud.contract.shapes import ModelShape, shape_for
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.sections import LoraSection

GiB = 1024**3
GB = 1000**3
BF16 = 2
FP32 = 4
MXFP4_BYTES_PER_EXPERT_PARAM = 4.25 / 8    # the published checkpoints store experts in MXFP4 (4-bit + scales)


def lora_params(shape: ModelShape, lora: LoraSection) -> int:
    """Trainable LoRA parameters for ``method.lora``'s targets (A: r x in, B: out x r; x experts for the 3-D
    expert weights): the one count the planner, the checkpoint preflight and the docs use."""
    r, h = lora.r, shape.hidden_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    per_layer = sum(r * (i + o) for name, (i, o) in dims.items() if name in lora.target_modules)
    total = shape.num_hidden_layers * per_layer
    if lora.experts:
        layers = len(lora.expert_layers) if lora.expert_layers is not None else shape.num_hidden_layers
        i = shape.intermediate_size
        per_expert = r * (h + 2 * i) + r * (i + h)
        total += layers * shape.num_local_experts * per_expert
    if lora.router:
        total += shape.num_hidden_layers * r * (h + shape.num_local_experts)
    return total


def trainable_params(shape: ModelShape, spec: RunSpec) -> int:
    return lora_params(shape, spec.method.lora) if spec.method.kind == "lora" else shape.total_params


def resolve_shape(spec: RunSpec, shape: ModelShape | None = None) -> ModelShape:
    if shape is not None:
        return shape
    try:
        return shape_for(spec.model.name, spec.model.layers)
    except ValueError as e:
        raise SpecError(f"model.name: {e}") from None


def local_shape(model: str, layers: int | None) -> ModelShape | None:
    """The shape of a local model folder from its config.json (presets need no file)."""
    import json
    from pathlib import Path

    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return shape_for(model, layers, config=json.loads(cfg.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"cannot read the model shape from {cfg}: {e}") from None
