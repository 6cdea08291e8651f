"""Benchmark arithmetic: FLOPs per token, TFLOP/s, MFU, medians, card names (pure, no torch).

FLOPs per token come from ``gptoss_cloud.contract.plan.flops`` (the one formula the planner and the trainer use
too): the dense products on the active parameters for what ran (LoRA or full, recomputation as
each variant resolved it) plus the attention scores. The formula travels in every JSON report.
"""

from __future__ import annotations

import re
import statistics
from typing import Sequence

# Dense bf16 peak per card (TFLOP/s, no sparsity), matched by substring of the CUDA device name.
# Order matters: "H100 NVL"/"H100 PCIe" before the SXM default, "GH200" before "H200".
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    ("GH200", "GH200", 989.0),
    ("H200", "H200", 989.0),
    ("H100 NVL", "H100", 835.0),
    ("H100 PCIe", "H100", 756.0),
    ("H100", "H100", 989.0),
    ("B200", "B200", 2250.0),
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.0),
]


def model_tflops(flops_per_token: float, tokens_per_s: float) -> float:
    """Achieved model TFLOP/s for ``tokens_per_s`` tokens per second (per GPU if the rate is per GPU)."""
    return flops_per_token * tokens_per_s / 1e12


def mfu(tflops: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak (None where the card's peak is unknown, e.g. CPU)."""
    if not peak_tflops or peak_tflops <= 0:
        return None
    return tflops / peak_tflops


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no timed steps to take the median of")
    return float(statistics.median(values))


def ratio(ours: float | None, baseline: float | None) -> float | None:
    """ours / baseline throughput, or None when either is missing (a variant ran out of memory)."""
    if not ours or not baseline:
        return None
    return ours / baseline


def card_family(device_name: str) -> tuple[str | None, float | None]:
    """(planner GPU type, dense bf16 peak TFLOP/s) for a CUDA device name; (None, None) when unknown."""
    for needle, family, peak in PEAK_BF16_TFLOPS:
        if needle.lower() in device_name.lower():
            return family, peak
    return None, None


def card_slug(device_name: str) -> str:
    """A file-name-safe card name: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3', 'cpu' -> 'cpu'."""
    name = re.sub(r"^nvidia\s+", "", device_name.strip(), flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def oom_label(reserved_gib: float | None) -> str:
    return f"OOM at {reserved_gib:.1f} GiB" if reserved_gib is not None else "OOM"
