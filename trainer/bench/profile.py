"""Where a training step's time goes: one step under ``torch.profiler``, device time by category.

Each kernel's time is attributed to the host op that launched it (``self_device_time_total`` of
the profiler's per-op averages), so the categories add up to the GPU's busy time without counting a
kernel twice. Ops are put in categories by name (first match wins); the report keeps the top ops
and kernels by name too, so nothing depends on the categories being complete. Kernels on different
streams (communication beside compute) can overlap: their sum may exceed the step's wall time.
On CPU (tests) the same summary is made of host time instead.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

# (category, substrings of the lower-cased op or kernel name); the first category that matches wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("communication", ("nccl", "c10d::", "record_param_comms", "all_gather", "reduce_scatter", "allreduce", "all_reduce", "broadcast")),
    ("optimizer", ("adam", "_foreach", "multi_tensor", "optimizer.")),
    # Our MXFP4-decoding grouped GEMM is an expert GEMM (its decode is inside it), before "MXFP4 dequantise".
    ("expert GEMMs", ("grouped_mm", "groupedmm", "grouped_gemm", "groupproblemshape", "mxfp4_gmm")),
    ("MXFP4 dequantise", ("dequant", "mxfp4")),
    ("attention", ("flex_attention", "triton_tem", "flash", "sdpa", "attention")),
    ("dense GEMMs", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "gemm", "nvjet", "cublas", "xmma",
                     "cutlass")),
    ("loss (cross-entropy)", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("routing + permutation", ("sort", "scatter", "gather", "index", "cumsum", "topk")),
    ("compiled elementwise", ("triton_poi", "triton_red", "triton_per", "compiled")),
    ("copies + casts", ("copy_", "memcpy", "memset", "aten::to", "_to_copy", "clone", "aten::cat", "contiguous")),
    ("elementwise + norms", ("add", "mul", "sigmoid", "silu", "rsqrt", "pow", "mean", "sum", "clamp", "neg", "div",
                             "where", "exp", "norm", "sub", "fill", "zero", "softmax", "max", "min", "ge", "le")),
]
OTHER = "other"
TOP = 20


def categorise(name: str) -> str:
    low = name.lower()
    for category, needles in CATEGORIES:
        if any(n in low for n in needles):
            return category
    return OTHER


def summarise(averages: Iterable, wall_s: float, on_device: bool) -> dict:
    """Per-category and top-op device (or host) milliseconds from profiler per-op averages."""
    ops: list[tuple[str, float, int]] = []
    kernels: list[tuple[str, float, int]] = []
    host_ranges: dict[str, float] = {}
    for e in averages:
        key, dtype = e.key, str(e.device_type)
        if key.startswith("Optimizer.step") or key.startswith("Optimizer.zero_grad"):
            host_ranges[key] = host_ranges.get(key, 0.0) + e.cpu_time_total / 1e3
        if not dtype.endswith("CPU"):
            if on_device:
                kernels.append((key, e.self_device_time_total / 1e3, e.count))
            continue
        ms = (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e3
        if ms > 0:
            ops.append((key, ms, e.count))
    total = sum(ms for _, ms, _ in ops)
    by_cat: dict[str, float] = {}
    for name, ms, _ in ops:
        cat = categorise(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    share = (lambda ms: ms / total) if total else (lambda ms: None)
    return {
        "measure": "device time of the kernels each op launched" if on_device else "host time per op",
        "wall_ms": wall_s * 1e3,
        "busy_ms": total,
        "by_category": [{"category": c, "ms": ms, "share": share(ms)}
                        for c, ms in sorted(by_cat.items(), key=lambda kv: -kv[1])],
        "top_ops": [{"name": n, "ms": ms, "calls": c, "category": categorise(n)}
                    for n, ms, c in sorted(ops, key=lambda t: -t[1])[:TOP]],
        "top_kernels": [{"name": n[:160], "ms": ms, "calls": c}
                        for n, ms, c in sorted(kernels, key=lambda t: -t[1])[:TOP]],
        "host_ranges_ms": host_ranges,
    }


def profile_step(step: Callable[[], object], device: torch.device) -> dict:
    """Run ``step`` once under the profiler and summarise it (every rank must call this together)."""
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    if on_device:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if on_device:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    return summarise(prof.key_averages(), wall, on_device)
