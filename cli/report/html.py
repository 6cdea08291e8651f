"""``gptoss-cloud report``: a run home -> one self-contained HTML page of plots and tables.

Everything comes from the store (``metrics.jsonl``, ``summary.json``, ``spec.yaml``), whatever backend
trained the run, and all of it is untrusted: only finite numbers are plotted, a step is a whole number,
and every text is escaped before it reaches the page. The PNGs are embedded (base64), so the file reads
without a server or a network; ``write_report`` also leaves them beside it.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_cloud.contract.errors import GptossError

# The step-record keys the report reads (written by trainer/metrics.py).
STEP_KEYS = ("loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
             "mem_allocated_gib", "mem_reserved_gib", "epoch")
SUMMARY_KEYS = ("steps", "first_loss", "final_loss", "eval_loss", "trained_tokens", "train_seconds", "tokens_per_s",
                "world_size", "device", "method", "shape", "output", "merged")


def number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _step(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _numbers(row: dict[str, Any], keys=None) -> dict[str, float]:
    return {k: n for k, v in row.items() if (keys is None or k in keys) and (n := number(v)) is not None}


@dataclass
class Series:
    """What a run recorded, cleaned: step rows with a loss, (step, eval loss) points, and each event."""

    steps: list[dict[str, float]] = field(default_factory=list)       # each with "step"
    evals: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    merges: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)   # "eval" events (gptoss-cloud eval)
    ignored: int = 0                                                  # records without a usable step


def series(records: list[dict[str, Any]], events: list[dict[str, Any]]) -> Series:
    s = Series()
    for r in records:
        step = _step(r.get("step"))
        if step is None:
            s.ignored += 1
            continue
        vals = _numbers(r, STEP_KEYS)
        if "eval_loss" in vals:
            s.evals.append((step, vals.pop("eval_loss")))
        if "loss" in vals:
            s.steps.append({"step": step, **vals})
    kinds = {"checkpoint": s.checkpoints, "merge": s.merges, "eval": s.evaluations}
    for e in events:
        step = _step(e.get("step"))
        bucket = kinds.get(e.get("event"))
        if bucket is None or (step is None and e.get("event") == "checkpoint"):
            s.ignored += 1
            continue
        bucket.append({"step": step, **{k: v for k, v in e.items() if k not in ("event", "step")}})
    s.steps.sort(key=lambda r: r["step"])
    s.evals.sort()
    s.checkpoints.sort(key=lambda c: c["step"])
    for c in s.checkpoints:  # only numbers reach the bars and the table's sums
        for k in ("total_s", "blocking_s", "bytes"):
            n = number(c.get(k))
            if n is None:
                c.pop(k, None)
            else:
                c[k] = n
    return s


# --------------------------------------------------------------------------------------------- page
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def _table(rows: list[list[Any]], head: list[str] | None = None) -> str:
    e = html.escape
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def _eval_table(evaluations: list[dict[str, Any]]) -> str:
    """One column per evaluation, one row per number: the breakdowns make many numbers, few evaluations."""
    keys: list[str] = []
    for ev in evaluations:
        keys += [k for k, v in ev.items() if k != "step" and number(v) is not None and k not in keys]
    head = ["evaluation"] + [f"#{i + 1} at step {_fmt(ev.get('step'))}" for i, ev in enumerate(evaluations)]
    return _table([[k] + [number(ev.get(k)) for ev in evaluations] for k in keys], head)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
img{max-width:100%}.none{color:#777;font-style:italic}"""


def render_html(run_id: str, home: str, s: Series, summary: dict[str, Any] | None, pngs: dict[str, bytes | None],
                headings: dict[str, tuple[str, str]]) -> str:
    """The page (pure): ``pngs`` maps each plot's name to its PNG (None: nothing to draw), ``headings``
    its name to (heading, what to say when there is nothing)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(run_id)}</title><style>{CSS}</style></head><body>",
             f"<h1>Run {e(run_id)}</h1>", f"<p>home: <code>{e(home)}</code></p>"]
    if summary:
        parts += ["<h2>Summary</h2>", _table([[k, summary[k]] for k in SUMMARY_KEYS if summary.get(k) is not None])]
    else:
        parts.append("<p class='none'>no summary.json yet: the run has not finished</p>")
    for name, png in pngs.items():
        heading, none = headings[name]
        parts.append(f"<h2>{e(heading)}</h2>")
        if png is None:
            parts.append(f"<p class='none'>{e(none)}</p>")
        else:
            parts.append(f"<img alt='{e(heading)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if s.evaluations:
        parts += ["<h2>Evaluations</h2>", _eval_table(s.evaluations)]
    if s.checkpoints:
        parts += ["<h2>Checkpoints</h2>", _table(
            [[c["step"], c.get("mode"), c.get("blocking_s"), c.get("total_s"),
              c["bytes"] / 2**30 if "bytes" in c else None] for c in s.checkpoints],
            ["step", "mode", "blocked (s)", "published after (s)", "GiB"])]
    if s.merges:
        parts += ["<h2>Merge</h2>", _table([[k, v] for m in s.merges for k, v in m.items() if number(v) is not None or k == "step"])]
    if s.ignored:
        parts.append(f"<p class='none'>{s.ignored} record(s) of metrics.jsonl had no usable step and are not shown</p>")
    return "\n".join(parts + ["</body></html>\n"])


def write_report(run_id: str, home: str, out: Path) -> tuple[Path, list[Path]]:
    """Read the run, draw, write ``out`` and ``<out stem>-<plot>.png`` beside it; returns what it wrote."""
    from gptoss_cloud.report import plots as report_plots
    from gptoss_cloud.contract.progress import read_metrics, read_summary

    records, events = read_metrics(home), read_metrics(home, events=True)
    if not records and not events:
        raise GptossError(f"run {run_id} has no metrics yet (no records in {home}/metrics.jsonl)",
                          hint="wait for the first logged step (optim.log_every), then run report again")
    s = series(records, events)
    pngs = {name: fn(s) for name, _, fn, _ in report_plots.PLOTS}
    headings = {name: (heading, none) for name, heading, _, none in report_plots.PLOTS}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(run_id, home, s, read_summary(home), pngs, headings))
    written = []
    for name, png in pngs.items():
        if png is not None:
            p = out.with_name(f"{out.stem}-{name}.png")
            p.write_bytes(png)
            written.append(p)
    return out, written
