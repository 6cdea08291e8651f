"""A one-line picture of a series (``status`` shows the loss this way)."""

from __future__ import annotations

import math

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    """``values`` as at most ``width`` bars, each the mean of its share of the series; the lowest value
    is the shortest bar. Non-finite values are left out (a diverged step must not flatten the rest)."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        edges = [round(i * len(vals) / width) for i in range(width + 1)]
        vals = [sum(vals[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return BARS[0] * len(vals)
    top = len(BARS) - 1
    return "".join(BARS[round((v - lo) / (hi - lo) * top)] for v in vals)


def loss_line(records: list[dict]) -> str:
    """``status``'s loss line: the train loss of every step record as a sparkline, first and last value."""
    pts = [(r["step"], r["loss"]) for r in records
           if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float)) and not isinstance(r.get("loss"), bool)
           and math.isfinite(r["loss"])]
    if not pts:
        return ""
    pts.sort()
    return f"{sparkline([v for _, v in pts])}  {pts[0][1]:.4g} -> {pts[-1][1]:.4g} (steps {pts[0][0]}-{pts[-1][0]})"
