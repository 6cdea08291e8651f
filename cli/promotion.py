"""Gated promotion: decide whether a finished run replaces the promoted one, and the recurring tick.

``promote_run`` finds the run's evaluation on the spec's ``promote.eval_data``, compares it with the
promoted run's through the gate (contract/promoted.py ``judge``) and records the decision, promoted
or refused, with its reason. ``tick`` is what a scheduled CronJob runs: submit the spec (dataset
templates filled from the tick's time), wait for the run to end, evaluate it, promote. One command
rather than three chained in a shell: the run id passes from step to step in memory, a failure at
any step still ends in a recorded decision, and the manifest stays a plain argument list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from gptoss_cloud.contract.errors import GptossError
from gptoss_cloud.contract.merged import MERGED_MARKER, published_key
from gptoss_cloud.contract.promoted import (
    EvalNumbers, PromotionError, Record, judge, now_stamp, read_history, read_record, write_decision,
)
from gptoss_cloud.contract.store.objects import StoreNotFound, join, open_store

TERMINAL = ("Succeeded", "Failed", "Cancelled")
MAX_EVAL_BYTES = 16 * 1024 * 1024   # an eval file holds every reply (each cut to 2,000 characters)
PROMOTED_ANNOTATION = "gptoss-cloud.dev/promoted-run"
FIELD_MANAGER = "gptoss-cloud-tick"


def store_of(home: str) -> str:
    return home.rstrip("/").rsplit("/", 1)[0]


# ------------------------------------------------------------------------------------- the eval
def find_eval(home: str, data: str, step: int | None) -> EvalNumbers | None:
    """The newest evaluation in ``<home>/evals/`` of ``data`` at ``step`` (the final model), or None."""
    st = open_store(home)
    keys = sorted(k for k in st.list("evals") if k.endswith(".json"))
    for key in reversed(keys):   # evals/<yyyymmdd-hhmmss>-step-<N>.json: newest last
        try:
            res = json.loads(st.read_range(key, 0, MAX_EVAL_BYTES + 1))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(res, dict) or res.get("data") != data:
            continue
        if step is not None and res.get("step") != step:
            continue
        gen = res.get("generation") if isinstance(res.get("generation"), dict) else {}
        return EvalNumbers.from_json({"data": data, "step": res.get("step"), "loss": res.get("loss"), "tokens": res.get("tokens"),
                                      "format_valid_rate": gen.get("format_valid_rate"), "saved": join(home, key)}, join(home, key))
    return None


# --------------------------------------------------------------------------------------- promote
@dataclass
class Decision:
    record: Record
    key: str               # its history entry
    store: str

    @property
    def promoted(self) -> bool:
        return self.record.decision == "promoted"


def promote_run(run_id: str, home: str, *, force: bool = False) -> Decision:
    """Decide and record. ``force`` skips the gate (a rollback to an older run, a first run that the
    absolute checks would refuse) but never promotes a run that did not succeed or has nothing to serve."""
    from gptoss_cloud.contract.progress import read_summary, summary_state
    from gptoss_cloud.contract.runs import read_run_spec

    spec = read_run_spec(home)
    gate = spec.promote
    if gate is None:
        raise GptossError(f"run {run_id} has no promote: section in its spec", hint="add promote: {name, eval_data} (docs/gitops-promotion.md)")
    store = store_of(home)
    summary = read_summary(home)
    state = summary_state(summary) if summary is not None else None
    step = summary.get("steps") if summary is not None and isinstance(summary.get("steps"), int) else None
    problem, current = None, None
    try:
        candidate = find_eval(home, gate.eval_data, step)
    except PromotionError as e:   # a diverged run's NaN loss, a rewritten file: a refusal, never a crash
        candidate, unusable = None, e.message
    else:
        unusable = None
    try:
        current = read_record(store, gate.name)
    except PromotionError as e:
        problem = f"the current record is unusable ({e.message})"

    def decide(ok: bool, reason: str, checks=()) -> Decision:
        rec = Record(name=gate.name, run_id=run_id, time=now_stamp(), decision="promoted" if ok else "refused",
                     reason=reason, forced=force and ok, eval=candidate, previous=current.run_id if current else None,
                     checks=tuple(checks))
        return Decision(rec, write_decision(store, rec), store)

    if state != "Succeeded":
        return decide(False, f"the run did not succeed (state {state or 'unknown: no summary.json'})")
    if published_key(open_store(home)) is None:
        return decide(False, f"no published merged folder to serve (no {MERGED_MARKER} in merged/ or merged-mxfp4/)")
    if current is not None and current.run_id == run_id:
        return decide(False, "already the promoted run")
    if unusable is not None:
        return decide(False, f"the evaluation is unusable: {unusable}")
    if candidate is None:
        missing = f"no evaluation on {gate.eval_data} of step {step}"
        if force:
            return decide(True, f"forced without an evaluation ({missing})")
        return decide(False, f"{missing}: gptoss-cloud eval {run_id} --data {gate.eval_data}")
    if problem is not None and not force:
        return decide(False, f"{problem}; promote --force replaces it")
    verdict = judge(gate, candidate, current.eval if current else None, current.run_id if current else None)
    if verdict.ok:
        return decide(True, verdict.reason, verdict.checks)
    if force:
        return decide(True, f"forced past the gate: {verdict.reason}", verdict.checks)
    return decide(False, verdict.reason, verdict.checks)


def restart_deployment(spec, run_id: str, log: Callable[[str], None]) -> None:
    """Roll Deployment vllm-<name> (``serve --promoted``) so its init container reads the new record.

    A patch of one pod-template annotation, like ``kubectl rollout restart``: the only write the
    CronJob's Role allows on Deployments, and only on that one name. No Deployment yet is not an error."""
    from gptoss_cloud.kube.client import connect
    from gptoss_cloud.kube.objects import annotate_pod_template

    name, ns = f"vllm-{spec.promote.name}", spec.cluster.namespace
    if not annotate_pod_template(connect(ns, spec.cluster.context), name, {PROMOTED_ANNOTATION: run_id}, FIELD_MANAGER):
        log(f"no Deployment {name} in {ns} to restart (serve --promoted {spec.promote.name} renders it)")
        return
    log(f"restarted Deployment {name}: it serves {run_id}")


# ------------------------------------------------------------------------------------------ tick
def wait_for_end(be, run_id: str, home: str, *, timeout_s: float, poll_s: float, log: Callable[[str], None]) -> str:
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        state = be.status(run_id, home).state
        if state in TERMINAL:
            return state
        if state != last:
            log(f"{run_id}: {state}")
            last = state
        if time.monotonic() >= deadline:
            raise GptossError(f"run {run_id} did not end within {timeout_s:.0f}s (state {state})",
                              hint=f"it keeps running; promote it later with: gptoss-cloud promote {run_id}")
        time.sleep(poll_s)


def tick(spec, *, launch: Callable[[Any, str, str], Any], timeout_s: float, poll_s: float = 30.0,
         log: Callable[[str], None] = print) -> Decision:
    """Submit ``spec`` as a new run, wait for it, evaluate it, promote it (or record why not).

    ``launch(spec, run_id, home)`` is ``submit``'s own path (plan check, spec.yaml, backend), so a tick
    starts a run exactly as ``submit`` would."""
    from gptoss_cloud.backends.base import get_backend
    from gptoss_cloud.contract.runs import new_run_id, run_home
    from gptoss_cloud.contract.templates import expand_for_run

    if spec.promote is None:
        raise GptossError("tick needs a promote: section in the spec (name, eval_data and the gate)",
                          hint="docs/gitops-promotion.md; without it, `submit` runs the spec")
    run_id = new_run_id(spec.name)
    spec = expand_for_run(spec, run_id)
    be = get_backend(spec.cluster.backend)
    spec = be.prepare(spec)
    home = run_home(spec.output.store, run_id)
    log(f"tick: run {run_id} on {be.name}, home {home}")
    try:
        launch(spec, run_id, home)
        state = wait_for_end(be, run_id, home, timeout_s=timeout_s, poll_s=poll_s, log=log)
    except GptossError as e:
        if not _home_exists(home):
            raise   # refused before it started: there is no run to decide about
        log(f"tick: {e.message}")
        state = "Failed"
    log(f"tick: {run_id} ended {state}")
    if state == "Succeeded":
        from gptoss_cloud.trainer.evaluation.run_home import run_eval

        p = spec.promote
        try:
            res = run_eval(run_id, home, spec, p.eval_data, samples=p.samples, max_new_tokens=p.max_new_tokens)
            log(f"tick: eval loss {res['loss']:.4f}, format valid {res['generation'].get('format_valid_rate')}")
        except Exception as e:   # no evaluation: promote_run records the refusal and says why
            from gptoss_cloud.failure import one_line

            log(f"tick: evaluation failed: {e.message if isinstance(e, GptossError) else one_line(e)}")
    decision = promote_run(run_id, home)
    if decision.promoted and spec.cluster.backend == "k8s" and spec.promote.restart_deployment:
        restart_deployment(spec, run_id, log)
    return decision


def _home_exists(home: str) -> bool:
    try:
        from gptoss_cloud.contract.runs import SPEC_FILE

        return open_store(home).exists(SPEC_FILE)
    except StoreNotFound:
        return False


# ------------------------------------------------------------------------------------------ runs
def promotion_by_run(store_uri: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """For ``runs``: each run's latest decision (per name) and whether it is the one promoted now."""
    history, bad = read_history(store_uri)
    current: dict[str, str] = {}
    for name in {r.name for r in history}:
        try:
            rec = read_record(store_uri, name)
        except PromotionError as e:
            bad.append(e.message)
            continue
        if rec is not None:
            current[name] = rec.run_id
    out: dict[str, dict[str, Any]] = {}
    for r in history:   # oldest first: a later decision about the same run replaces an earlier one
        out[r.run_id] = {"name": r.name, "decision": r.decision, "reason": r.reason, "forced": r.forced,
                         "time": r.time, "current": current.get(r.name) == r.run_id}
    return out, bad


def describe(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    if p["current"]:
        return f"PROMOTED as {p['name']}" + (" (forced)" if p["forced"] else "")
    if p["decision"] == "promoted":
        return f"was promoted as {p['name']}, since replaced"
    return f"refused for {p['name']}: {p['reason']}"
