"""The report's plots: a run's series (``report.Series``) -> PNG bytes, one figure per question.

Matplotlib's object API (``Figure`` with its own Agg canvas), never ``pyplot``: no global state, no GUI
backend, so it runs in a CronJob or a CI job as well as on a laptop. Each function returns None when
the run recorded nothing for it; the report says so in words instead of drawing an empty frame.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from gptoss_cloud.contract.errors import GptossError

if TYPE_CHECKING:
    from gptoss_cloud.report.html import Series

SIZE = (8.0, 3.2)
DPI = 100


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise GptossError("report draws its plots with matplotlib, which is not installed",
                          hint="pip install 'gptoss-cloud[report]'") from e
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _checkpoint_marks(ax, s: "Series") -> None:
    for i, step in enumerate(sorted({c["step"] for c in s.checkpoints})):
        ax.axvline(step, color="0.6", linestyle=":", linewidth=1, label="checkpoint" if i == 0 else None)


def loss(s: "Series") -> bytes | None:
    train = [(r["step"], r["loss"]) for r in s.steps if "loss" in r]
    if not train and not s.evals:
        return None
    fig, ax = _figure()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if s.evals:
        ax.plot(*zip(*s.evals), label="eval loss", color="tab:orange", marker="o", markersize=4)
    _checkpoint_marks(ax, s)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return _png(fig)


def _line(s: "Series", keys: list[tuple[str, str]], title: str, ylabel: str) -> bytes | None:
    lines = [(label, [(r["step"], r[k]) for r in s.steps if k in r]) for k, label in keys]
    lines = [(label, pts) for label, pts in lines if pts]
    if not lines:
        return None
    fig, ax = _figure()
    for label, pts in lines:
        ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)
    _checkpoint_marks(ax, s)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)  # rates and sizes: a flat 31% MFU must not look like a swing
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _png(fig)


def learning_rate(s: "Series") -> bytes | None:
    return _line(s, [("lr", "learning rate")], "Learning rate", "lr")


def throughput(s: "Series") -> bytes | None:
    return _line(s, [("tokens_per_s", "tokens/s (all GPUs)"), ("tokens_per_s_per_gpu", "tokens/s per GPU")],
                 "Throughput", "tokens / s")


def mfu(s: "Series") -> bytes | None:
    return _line(s, [("mfu", "model FLOPs utilisation")], "MFU", "fraction of peak bf16")


def memory(s: "Series") -> bytes | None:
    return _line(s, [("mem_allocated_gib", "peak allocated"), ("mem_reserved_gib", "peak reserved")],
                 "GPU memory (rank 0)", "GiB")


def checkpoints(s: "Series") -> bytes | None:
    rows = [c for c in s.checkpoints if "total_s" in c or "blocking_s" in c]
    if not rows:
        return None
    fig, ax = _figure()
    steps = [str(c["step"]) for c in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [c.get("total_s", 0.0) for c in rows], width=0.4, label="until published")
    ax.bar([i + 0.2 for i in x], [c.get("blocking_s", 0.0) for c in rows], width=0.4, label="training blocked")
    ax.set_xticks(list(x), steps)
    ax.set(xlabel="checkpoint step", ylabel="seconds", title="Checkpoint saves")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best")
    return _png(fig)


# name (the PNG's file name), heading, function, what the report says when there is nothing to draw
PLOTS = [
    ("loss", "Loss (train and eval)", loss, "no loss recorded yet"),
    ("lr", "Learning rate", learning_rate, "no learning rate recorded"),
    ("throughput", "Throughput", throughput, "no throughput recorded"),
    ("mfu", "Model FLOPs utilisation", mfu, "not recorded: MFU needs a GPU whose peak is known"),
    ("memory", "GPU memory", memory, "not recorded: the run did not train on a GPU"),
    ("checkpoints", "Checkpoint saves", checkpoints, "no checkpoint saved"),
]
