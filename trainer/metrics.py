"""Rank-0 progress and ``<home>/metrics.jsonl``.

Every ``log_every`` steps one JSON object is appended to ``metrics.jsonl`` with the keys
``step, loss, lr, grad_norm, tokens, tokens_per_s, tokens_per_s_per_gpu, mfu, mem_allocated_gib,
mem_reserved_gib`` (+ ``eval_loss`` when computed, ``aux_loss`` when the router loss is on, ``epoch``).
``tokens`` is trained tokens so far (labels != -100, all ranks); ``tokens_per_s`` counts every packed
position processed per second, all ranks; ``mfu`` = the FLOPs the window's steps executed
(``gptoss_cloud.contract.plan.flops``: LoRA or full, recomputation as resolved, the attention pairs of the packed
documents) / its seconds / (peak bf16 FLOP/s x GPUs), None on CPU or an unknown GPU. For an s3:// home the file is kept locally and the
whole (small) file is uploaded at each log.

With ``optim.step_split`` each record also has that step's ``step_s, data_s, fwd_bwd_s,
optimizer_s, optimizer_share`` (see ``Loop.step_split``). Other events share the file, told apart by
an ``event`` key: ``"checkpoint"`` (one per save, see ``trainer/checkpoint/checkpointer.py``) and ``"merge"`` (the
end-of-run merge: ``wall_s, bytes_written, peak_rss_gib, peak_rss_scope``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gptoss_cloud.contract.store.objects import is_remote, join, open_store

GiB = 1024**3

# Dense bf16 peak FLOP/s by GPU name (substring, checked in order).
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def memory_gib(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


class MetricsWriter:
    """Appends JSON lines to ``<home>/metrics.jsonl`` (local folder or s3://)."""

    def __init__(self, home: str):
        self.home = home
        self.remote = is_remote(home)
        if self.remote:
            self._tmp = tempfile.TemporaryDirectory(prefix="gptoss-metrics-")
            self.path = Path(self._tmp.name) / "metrics.jsonl"
            self.store = open_store(home)
            if self.store.exists("metrics.jsonl"):
                # A resumed attempt appends to what earlier attempts logged (each upload replaces the object).
                self.store.download_file("metrics.jsonl", self.path)
        else:
            self.path = Path(home) / "metrics.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)

        self._lock = threading.Lock()  # step records (loop) and checkpoint events (an async save's thread)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # the experiment trackers (trainer/tracking.py)

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.remote:
                self.store.upload_file(self.path, "metrics.jsonl")
            for listen in self.listeners:
                listen(record)

    @property
    def uri(self) -> str:
        return join(self.home, "metrics.jsonl")


_WRITERS: dict[str, MetricsWriter] = {}
_WRITERS_LOCK = threading.Lock()


def writer_for(home: str) -> MetricsWriter:
    """The one writer of this process for ``home``: an s3:// home keeps a single local copy, so every
    writer of the run (the loop's metrics, the checkpointer) must append to the same one."""
    with _WRITERS_LOCK:
        w = _WRITERS.get(home)
        if w is None:
            w = _WRITERS[home] = MetricsWriter(home)
        return w


class Progress:
    """A rich bar when attached to a terminal, plain log lines otherwise."""

    def __init__(self, total: int, interactive: bool | None = None):
        self.total = total
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None
        self._start = time.perf_counter()
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("train", total=total, info="")
            self._bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None = None) -> None:
        info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s" + (f"  eval {eval_loss:.4f}" if eval_loss is not None else "")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / max(step, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {info}  eta {eta:,.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Metrics:
    """What the loop calls on rank 0 after each step (``on_step``) and after the final evaluation."""

    def __init__(self, home: str, *, total_steps: int, log_every: int, step_flops: Callable[[Any], float],
                 num_gpus: int, device: torch.device, interactive: bool | None = None):
        self.writer = writer_for(home)
        self.progress = Progress(total_steps, interactive)
        self.log_every = log_every
        self.step_flops = step_flops  # StepStats -> FLOPs the step executed, all ranks (flops.flops_from_pairs)
        self.num_gpus = num_gpus
        self.device = device
        self.peak = peak_flops(device)
        self._window_tokens = 0
        self._window_seconds = 0.0
        self._window_flops = 0.0
        self.last: dict[str, Any] = {}

    def record(self, stats, tokens_total: int, epoch: float | None = None) -> dict[str, Any]:
        self._window_tokens += stats.processed_tokens
        self._window_seconds += stats.seconds
        self._window_flops += self.step_flops(stats)
        tps = self._window_tokens / self._window_seconds if self._window_seconds > 0 else 0.0
        alloc, reserved = memory_gib(self.device)
        rec: dict[str, Any] = {
            "step": stats.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "tokens": tokens_total, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / max(1, self.num_gpus),
            "mfu": (self._window_flops / self._window_seconds / (self.peak * self.num_gpus))
                   if self.peak and self.num_gpus and self._window_seconds > 0 else None,
            "mem_allocated_gib": alloc, "mem_reserved_gib": reserved,
        }
        if stats.eval_loss is not None:
            rec["eval_loss"] = stats.eval_loss
        if stats.aux_loss is not None:
            rec["aux_loss"] = stats.aux_loss
        if epoch is not None:
            rec["epoch"] = round(epoch, 4)
        if getattr(stats, "optimizer_s", None) is not None:  # the loop's step split (optim.step_split)
            rec.update(step_s=round(stats.seconds, 4), data_s=stats.data_s, fwd_bwd_s=stats.fwd_bwd_s,
                       optimizer_s=stats.optimizer_s,
                       optimizer_share=round(stats.optimizer_s / stats.seconds, 4) if stats.seconds > 0 else None)
        return rec

    def on_merge(self, stats: dict) -> None:
        """The end-of-run merge's wall time, bytes written and peak host memory."""
        self.writer.write({"event": "merge", "step": self.last.get("step"), **stats})

    def on_step(self, stats, state) -> None:
        rec = self.record(stats, state.tokens, state.data.epochs_done)
        self.last = rec
        self.progress.update(stats.step, stats.loss, rec["tokens_per_s"], stats.eval_loss)
        if stats.step % self.log_every == 0 or stats.eval_loss is not None:
            self.writer.write(rec)
            self._window_tokens, self._window_seconds, self._window_flops = 0, 0.0, 0.0

    def on_final_eval(self, step: int, eval_loss: float) -> None:
        rec = dict(self.last, step=step, eval_loss=eval_loss)
        self.last = rec
        self.writer.write(rec)

    def close(self) -> None:
        self.progress.close()
