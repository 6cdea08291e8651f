"""Promotion records: which run a name serves, the gate that moves it, and every decision made.

In the run store (the folder or bucket prefix that holds the run homes)::

    promoted/<name>.json                        the current record: run id, its eval numbers, time, why
    promoted/<name>.history/<time>-<run>.json   one object per decision, promoted or refused, with its reason

Each object is written once with the store's whole-object write (a local file is replaced atomically,
an S3 PUT is all or nothing), so a crash never leaves half a record: a reader finds the old record or
the new one. History entries are separate objects rather than lines appended to one file, because S3
cannot append and a read-modify-write of a shared log could lose a decision. The history entry is
written before the current record: a crash between them leaves a decision whose promotion did not
take effect, never a promotion nobody can explain.

Records are untrusted input (anyone who can write to the bucket can write one): read with a size
bound, every field checked, the run id validated before it becomes a path. The serve fetcher reads
the current record through ``read_record`` too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import Field, field_validator

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.runs import check_run_id
from gptoss_cloud.contract.sections import Section
from gptoss_cloud.contract.store.objects import StoreNotFound, join, open_store

FORMAT = 1
PREFIX = "promoted"
MAX_RECORD_BYTES = 64 * 1024   # a record is ~1 KiB; anything far larger is not one of ours
HISTORY_READ_MAX = 500         # `runs` shows the newest decisions; older ones stay in the store
_EPS = 1e-9                    # losses equal to the last printed digit count as equal, not as a regression


class PromotionError(GptossError):
    """A promotion record that cannot be used (missing, malformed, or not ours)."""


NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")


def check_name(name: str) -> str:
    """A promotion name becomes a store key and a Deployment name: only the DNS-label form passes."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PromotionError(f"invalid promotion name {str(name)[:60]!r}: 1-40 lowercase letters, digits or '-', "
                             "starting and ending with a letter or digit")
    return name


def record_key(name: str) -> str:
    return f"{PREFIX}/{check_name(name)}.json"


def history_prefix(name: str) -> str:
    return f"{PREFIX}/{check_name(name)}.history"


# ------------------------------------------------------------------------------------ eval numbers
@dataclass(frozen=True)
class EvalNumbers:
    """What the gate compares: one evaluation of one run's final model on one held-out file."""

    data: str
    step: int | None
    loss: float
    tokens: int
    format_valid_rate: float | None
    saved: str | None = None   # the evaluation's file in the run home

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "step": self.step, "loss": self.loss, "tokens": self.tokens,
                "format_valid_rate": self.format_valid_rate, "saved": self.saved}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "EvalNumbers":
        if not isinstance(d, dict):
            raise PromotionError(f"{where}: eval is not an object")
        data, step, loss, tokens, rate = (d.get(k) for k in ("data", "step", "loss", "tokens", "format_valid_rate"))
        if not isinstance(data, str) or not data:
            raise PromotionError(f"{where}: eval.data is not a text")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise PromotionError(f"{where}: eval.step is not a whole number")
        if not _finite(loss) or loss < 0:
            raise PromotionError(f"{where}: eval.loss is not a finite non-negative number")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise PromotionError(f"{where}: eval.tokens is not a whole number")
        if rate is not None and (not _finite(rate) or not 0 <= rate <= 1):
            raise PromotionError(f"{where}: eval.format_valid_rate is not a fraction 0..1")
        saved = d.get("saved")
        return cls(data=data, step=step, loss=float(loss), tokens=tokens,
                   format_valid_rate=None if rate is None else float(rate), saved=saved if isinstance(saved, str) else None)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# -------------------------------------------------------------------------------------------- gate
@dataclass
class Verdict:
    ok: bool
    checks: list[dict[str, Any]] = field(default_factory=list)   # {"check", "ok", "detail"}

    @property
    def reason(self) -> str:
        failed = [c["detail"] for c in self.checks if not c["ok"]]
        return "; ".join(failed) if failed else "; ".join(c["detail"] for c in self.checks)

    def add(self, check: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": check, "ok": ok, "detail": detail})
        self.ok = self.ok and ok


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def judge(gate, candidate: EvalNumbers, current: EvalNumbers | None, current_run: str | None = None) -> Verdict:
    """Does ``candidate`` pass ``gate`` (a PromoteSection) against the ``current`` promoted run's numbers?

    The absolute checks (enough tokens, loss ceiling, format-valid floor) apply to every run, the
    first one included; the regression check needs a current run evaluated on the same data.
    ``current_run`` names a promoted run that has no numbers (promoted with --force, unevaluated)."""
    v = Verdict(ok=True)
    v.add("min_eval_tokens", candidate.tokens >= gate.min_eval_tokens,
          f"evaluated over {candidate.tokens} token(s)" + ("" if candidate.tokens >= gate.min_eval_tokens
                                                          else f", fewer than min_eval_tokens {gate.min_eval_tokens}"))
    if gate.max_eval_loss is not None:
        ok = candidate.loss <= gate.max_eval_loss + _EPS
        v.add("max_eval_loss", ok, f"eval loss {candidate.loss:.4f} {'<=' if ok else '>'} max_eval_loss {gate.max_eval_loss:.4f}")
    if gate.min_format_valid_rate is not None:
        rate = candidate.format_valid_rate
        ok = rate is not None and rate + _EPS >= gate.min_format_valid_rate
        v.add("min_format_valid_rate", ok, f"format valid {_pct(rate)} {'>=' if ok else '<'} "
              f"min_format_valid_rate {_pct(gate.min_format_valid_rate)}")
    if current is None:
        v.add("first", True, f"promoted run {current_run} has no evaluation: the absolute checks decide" if current_run
              else "no run promoted yet: the absolute checks decide")
        return v
    if current.data != candidate.data:
        v.add("same_eval_data", False, f"the promoted run was evaluated on {current.data!r}, this run on "
              f"{candidate.data!r}: losses on different data do not compare")
        return v
    delta = candidate.loss - current.loss
    ok = delta <= gate.max_eval_loss_regression + _EPS
    v.add("max_eval_loss_regression", ok,
          f"eval loss {candidate.loss:.4f} vs promoted {current.loss:.4f} ({delta:+.4f}; "
          f"{'within' if ok else 'beyond'} max_eval_loss_regression {gate.max_eval_loss_regression:g})")
    return v


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """The current record of a name (``promoted/<name>.json``) or one decision of its history."""

    name: str
    run_id: str
    time: str
    decision: str                      # promoted | refused
    reason: str
    forced: bool = False
    eval: EvalNumbers | None = None
    previous: str | None = None        # the run promoted before (current record) / at the decision (history)
    checks: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "run_id": self.run_id, "time": self.time,
                "decision": self.decision, "reason": self.reason, "forced": self.forced,
                "eval": None if self.eval is None else self.eval.to_json(), "previous": self.previous,
                "checks": list(self.checks)}


def parse_record(raw: bytes, where: str, *, name: str | None = None) -> Record:
    """A record from untrusted bytes: bounded, JSON, every field checked; PromotionError naming ``where``."""
    if len(raw) > MAX_RECORD_BYTES:
        raise PromotionError(f"{where}: more than {MAX_RECORD_BYTES} bytes; not a promotion record")
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromotionError(f"{where}: not JSON ({e})") from None
    if not isinstance(d, dict):
        raise PromotionError(f"{where}: not a JSON object")
    if d.get("format") != FORMAT:
        raise PromotionError(f"{where}: format {d.get('format')!r}, expected {FORMAT}",
                             hint="written by a newer gptoss-cloud? upgrade, or promote again with --force")
    if name is not None and d.get("name") != name:
        raise PromotionError(f"{where}: record names {d.get('name')!r}, not {name!r}")
    rid = _run_id(d.get("run_id"), "run_id", where)
    for k in ("name", "time", "decision", "reason"):
        if not isinstance(d.get(k), str):
            raise PromotionError(f"{where}: {k} is not a text")
    if d["decision"] not in ("promoted", "refused"):
        raise PromotionError(f"{where}: decision {d['decision']!r} is neither promoted nor refused")
    prev = d.get("previous")
    if prev is not None:
        _run_id(prev, "previous", where)
    ev = d.get("eval")
    checks = d.get("checks") or []
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise PromotionError(f"{where}: checks is not a list of objects")
    return Record(name=d["name"], run_id=rid, time=d["time"], decision=d["decision"], reason=d["reason"],
                  forced=d.get("forced") is True, eval=None if ev is None else EvalNumbers.from_json(ev, where),
                  previous=prev, checks=tuple(checks))


def _run_id(value: Any, what: str, where: str) -> str:
    """A run id from a record: it becomes part of a URI (the served folder), so only the generated form."""
    if not isinstance(value, str):
        raise PromotionError(f"{where}: {what} is not a text")
    try:
        return check_run_id(value, generated=True)
    except GptossError as e:
        raise PromotionError(f"{where}: {what}: {e.message}") from None


def read_record(store_uri: str, name: str) -> Record | None:
    """The current record of ``name``, None when nothing was ever promoted under it."""
    st = open_store(store_uri)
    key = record_key(name)
    try:
        raw = st.read_range(key, 0, MAX_RECORD_BYTES + 1)
    except StoreNotFound:
        return None
    rec = parse_record(raw, join(store_uri, key), name=name)
    if rec.decision != "promoted":
        raise PromotionError(f"{join(store_uri, key)}: the current record says {rec.decision!r}")
    return rec


def now_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_decision(store_uri: str, rec: Record) -> str:
    """Record one decision: its history entry, then (when promoted) the current record. Returns the entry's key."""
    st = open_store(store_uri)
    stamp = rec.time.replace(":", "").replace("-", "").replace(".", "")
    key = f"{history_prefix(rec.name)}/{stamp}-{rec.run_id}.json"
    body = json.dumps(rec.to_json(), indent=1, sort_keys=True).encode()
    st.write_bytes(key, body)
    if rec.decision == "promoted":
        st.write_bytes(record_key(rec.name), body)
    return key


def read_history(store_uri: str, name: str | None = None, limit: int = HISTORY_READ_MAX) -> tuple[list[Record], list[str]]:
    """The newest ``limit`` decisions (oldest first) of ``name`` or of every name, and one line per
    entry that could not be read: a bad entry is reported, never allowed to hide the others."""
    st = open_store(store_uri)
    keys = [k for k in st.list(PREFIX) if ".history/" in k and k.endswith(".json")]
    if name is not None:
        keys = [k for k in keys if k.startswith(history_prefix(name) + "/")]
    keys.sort(key=lambda k: k.rsplit("/", 1)[-1])   # entries are named by time first
    out, bad = [], []
    for k in keys[-limit:]:
        owner = k[len(PREFIX) + 1:].split(".history/", 1)[0]
        try:
            out.append(parse_record(st.read_range(k, 0, MAX_RECORD_BYTES + 1), join(store_uri, k), name=owner))
        except GptossError as e:
            bad.append(e.message)
    return out, bad


# ------------------------------------------------------------------------------------- the spec section
class PromoteSection(Section):
    """Gated promotion (docs/gitops-promotion.md): after each run, evaluate it on a fixed held-out set and
    move the record ``<store>/promoted/<name>.json`` to it only when the gate holds."""

    name: str = Field(..., description="the promotion record's name (promoted/<name>.json; the served model's name)")
    eval_data: str = Field(..., description="held-out file every candidate is evaluated on (the same for every tick)")
    samples: int = Field(8, ge=1, le=10_000, description="replies generated for the harmony checks")
    max_new_tokens: int = Field(256, ge=1, le=1 << 16, description="token limit of each generated reply")
    max_eval_loss_regression: float = Field(
        0.0, ge=0, le=100, description="eval loss may be worse than the promoted run's by at most this much (nats per token)")
    max_eval_loss: float | None = Field(None, gt=0, le=1000, description="absolute ceiling on eval loss (also for the first run)")
    min_format_valid_rate: float | None = Field(
        None, ge=0, le=1, description="fraction of generated replies that must pass every harmony check (also for the first run)")
    min_eval_tokens: int = Field(1, ge=1, le=10**12, description="refuse an evaluation over fewer trained tokens than this")
    restart_deployment: bool = Field(
        True, description="k8s: after a promotion, restart Deployment vllm-<name> (serve --promoted) so it loads the new run")

    @field_validator("name")
    @classmethod
    def _record_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError("promote.name must be 1-40 lowercase letters, digits or '-', starting and ending with a "
                             "letter or digit (it names a store key and the Deployment vllm-<name>)")
        return v

    @field_validator("eval_data")
    @classmethod
    def _fixed_data(cls, v: str) -> str:
        if "{" in v or "}" in v:
            raise ValueError("promote.eval_data must be one fixed held-out file, not a template: "
                             "ticks are compared on the same data")
        if not v.strip():
            raise ValueError("promote.eval_data is empty")
        return v
