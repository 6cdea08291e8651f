"""What a run home says about a run: its spec, its metrics, its summary — whatever backend trained it.

``status`` and ``runs`` read these so every backend reports progress the same way, from the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import LocalStore, S3Store, open_store


def read_metrics(home: str, events: bool = False) -> list[dict[str, Any]]:
    """The step records of ``metrics.jsonl`` (a line being written right now is skipped); with
    ``events``, the event records instead (``"event": "checkpoint" | "merge"``)."""
    st = open_store(home)
    if not st.exists("metrics.jsonl"):
        return []
    out = []
    for line in st.read_bytes("metrics.jsonl").decode(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and ("event" in row) == events:
            out.append(row)
    return out


def read_summary(home: str) -> dict[str, Any] | None:
    st = open_store(home)
    if not st.exists("summary.json"):
        return None
    try:
        data = json.loads(st.read_bytes("summary.json"))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def progress(metrics: list[dict[str, Any]], spec: RunSpec | None = None) -> dict[str, Any]:
    """Last step, loss, eval loss and throughput; ``max_steps`` when the spec fixes it."""
    out: dict[str, Any] = {}
    steps = [m["step"] for m in metrics if isinstance(m.get("step"), int)]
    if steps:
        out["step"] = max(steps)
    # An eval-only line (step + eval_loss) must not hide the last training line's loss and throughput.
    train_rows = [m for m in metrics if m.get("loss") is not None]
    if train_rows:
        last = train_rows[-1]
        for k in ("loss", "lr", "tokens", "tokens_per_s", "mfu", "epoch"):
            if last.get(k) is not None:
                out[k] = last[k]
    evals = [m for m in metrics if m.get("eval_loss") is not None]
    if evals:
        out["eval_loss"] = evals[-1]["eval_loss"]
    if spec is not None and spec.optim.max_steps:
        out["max_steps"] = spec.optim.max_steps
    return out


def format_progress(p: dict[str, Any]) -> str:
    if "step" not in p:
        return "no metrics yet"
    parts = [f"step {p['step']}" + (f"/{p['max_steps']}" if p.get("max_steps") else "")
             + (f" (epoch {p['epoch']:.2f})" if p.get("epoch") is not None and not p.get("max_steps") else "")]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4g}")
    if p.get("eval_loss") is not None:
        parts.append(f"eval {p['eval_loss']:.4g}")
    if p.get("tokens_per_s") is not None:
        parts.append(f"{p['tokens_per_s']:,.0f} tok/s")
    return ", ".join(parts)


def list_run_ids(store_uri: str) -> list[str]:
    """Run ids in a store: the top-level folders holding a ``spec.yaml``. Lists one level only, so a
    store full of checkpoints answers quickly."""
    st = open_store(store_uri)
    if isinstance(st, LocalStore):
        root = Path(st.root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "spec.yaml").is_file())
    assert isinstance(st, S3Store)
    names: list[str] = []
    prefix = f"{st.prefix}/" if st.prefix else ""
    paginator = st.client.get_paginator("list_objects_v2")
    pages = st._call("list", "", lambda: list(paginator.paginate(Bucket=st.bucket, Prefix=prefix, Delimiter="/")))
    for page in pages:
        for cp in page.get("CommonPrefixes", []):
            name = cp["Prefix"][len(prefix):].strip("/")
            if name:
                names.append(name)
    return sorted(n for n in names if st.exists(f"{n}/spec.yaml"))


@dataclass
class RunRow:
    run_id: str
    home: str
    backend: str
    state: str
    model: str = ""
    method: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    promotion: dict[str, Any] | None = None   # the latest promotion decision about this run (promotion.py)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def summary_state(summary: dict[str, Any] | None) -> str | None:
    """The final state a trainer recorded in summary.json, normalised to RunStatus states."""
    if summary is None:
        return None
    raw = str(summary.get("state") or summary.get("status") or "").lower()
    return {"succeeded": "Succeeded", "success": "Succeeded", "completed": "Succeeded", "done": "Succeeded",
            "failed": "Failed", "error": "Failed", "cancelled": "Cancelled", "canceled": "Cancelled"}.get(raw, "Succeeded" if not raw else None)


