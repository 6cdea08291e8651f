"""Measure one benchmark variant: build it, warm up, time steps, read peak memory.

Run in-process (``measure_variant``) or as its own process, so each variant's peak memory starts
from zero: ``python -m gptoss_cloud.trainer.bench.worker --job JOB.json --out DIR`` (under torchrun
for several GPUs). Every rank writes ``DIR/rank<N>.json``; the parent merges them. A CUDA
out-of-memory error — while building or stepping — is a result (``status: "oom"``), not a crash.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from gptoss_cloud.trainer.bench.variants import Prepared, Setup, Variant, build, join_process_group
from gptoss_cloud.trainer.parallel import DistInfo

GiB = 1024**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
    }


def _progress(what: str, t_start: float, rank: DistInfo, device: torch.device) -> None:
    """One line on stderr per finished phase (rank 0): a variant stopped at its timeout still shows how far
    it got and what memory it had reached, since the parent keeps the partial log."""
    if rank.rank != 0:
        return
    mem = _memory(device)
    peaks = "" if mem["peak_reserved_gib"] is None else (
        f"; peak allocated {mem['peak_allocated_gib']:.1f} GiB, reserved {mem['peak_reserved_gib']:.1f} GiB")
    print(f"[bench] {what} done at {time.perf_counter() - t_start:.1f} s{peaks}", file=sys.stderr, flush=True)


def free_memory(device: torch.device) -> None:
    """Drop cached blocks and peak counters so the next variant in this process starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_variant(
    setup: Setup, variant: Variant, rank: DistInfo, warmup: int, steps: int,
    prepare: Callable[[Setup, Variant, DistInfo], Prepared] = build, profile: bool = False,
) -> dict:
    """Build ``variant`` and time ``steps`` optimizer steps after ``warmup`` untimed ones.

    Times are wall-clock between device synchronisations around each step (the step itself ends
    with the optimizer update). ``prepare`` is the builder; tests pass a double here.
    """
    free_memory(rank.device)
    result: dict = {"variant": variant.to_dict(), "rank": rank.rank, "world_size": rank.world_size, "status": "ok",
                    "error": None, "step_times_s": [], "losses": [], "build_s": None,
                    "trainable_params": None, "total_params": None, "tokens_per_step": setup.seq}
    prepared = None
    phase = "build"
    try:
        t_start = t0 = time.perf_counter()
        prepared = prepare(setup, variant, rank)
        _sync(rank.device)
        result["build_s"] = time.perf_counter() - t0
        _progress("build", t_start, rank, rank.device)
        result.update(trainable_params=prepared.trainable_params, total_params=prepared.total_params,
                      tokens_per_step=prepared.tokens_per_step, recompute=prepared.recompute)
        for i in range(warmup + steps):
            phase = f"step {i + 1}"
            _sync(rank.device)
            t0 = time.perf_counter()
            loss = prepared.step()
            _sync(rank.device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                result["step_times_s"].append(dt)
            result["losses"].append(float(loss))
            _progress(f"{phase} ({dt:.1f} s)", t_start, rank, rank.device)
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        if profile:
            from gptoss_cloud.trainer.bench.profile import profile_step

            phase = "profiled step"
            result["profile"] = profile_step(prepared.step, rank.device)
    except torch.OutOfMemoryError as e:
        result.update(status="oom", error=f"CUDA out of memory during {phase}: {_first_line(e)}")
    except Exception as e:  # a variant that cannot run (an unsupported kernel, ...) must not end the benchmark
        result.update(status="error", error=f"{type(e).__name__} during {phase}: {_first_line(e)}")
        result["traceback"] = traceback.format_exc(limit=8)
    result.update(_memory(rank.device))
    del prepared
    free_memory(rank.device)
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="measure one benchmark variant (started by `gptoss-cloud bench`)")
    ap.add_argument("--job", required=True, help="JSON file: setup, variant, warmup, steps")
    ap.add_argument("--out", required=True, help="folder for rank<N>.json")
    args = ap.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    setup = Setup(**job["setup"])
    variant = Variant.from_dict(job["variant"])
    rank = join_process_group()
    result = measure_variant(setup, variant, rank, int(job["warmup"]), int(job["steps"]), profile=bool(job.get("profile")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank.rank}.json").write_text(json.dumps(result))
    if result["status"] != "ok":
        # Other ranks may be blocked in a collective: leave at once and let torchrun stop them.
        sys.stdout.flush()
        sys.stderr.flush()
        import os

        os._exit(3)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
