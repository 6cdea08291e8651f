"""Bytes per trainable parameter for each optimizer choice (``optim.name`` x ``optim.master_weights``).

The one table the planner (GPU, host, checkpoint sizes) and the docs use. Gradients live in the
master weights' dtype (FSDP2 casts the reduced gradient to the sharded parameter's dtype). adamw_8bit
is torchao's AdamW8bit: each moment is one uint8 code per element plus one fp32 scale per block of
256 elements (parameters under 4,096 elements keep fp32 moments: too few to matter here).
"""

from __future__ import annotations

from gptoss_cloud.contract.sections import OptimSection

FP32, BF16 = 4, 2
QUANT_BLOCK = 256
MASTER_BYTES = {"fp32": FP32, "bf16": BF16}
MOMENT_BYTES = {"adamw": 2 * FP32, "adamw_8bit": 2 * (1 + FP32 / QUANT_BLOCK)}  # Adam's m and v


def trainable_bytes(optim: OptimSection) -> float:
    """Resident bytes per trainable parameter: master weight + gradient + both moments."""
    master = MASTER_BYTES[optim.master_weights]
    return master + master + MOMENT_BYTES[optim.name]


def checkpoint_bytes_per_param(optim: OptimSection) -> float:
    """What a checkpoint stores per trainable parameter: the master weight and both moments."""
    return MASTER_BYTES[optim.master_weights] + MOMENT_BYTES[optim.name]


def label(optim: OptimSection) -> str:
    """``adamw_8bit, bf16 masters`` — how plan tables and messages name a choice."""
    return f"{optim.name}, {optim.master_weights} masters"
