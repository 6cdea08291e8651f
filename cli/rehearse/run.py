"""Rehearse a multi-node run on one host: the rendered JobSet's pods as local torchrun node groups.

Each node group is started with the trainer container's own ``command`` and ``env`` taken from the
rendered JobSet (``render/k8s.py``), ``$(VAR)`` references expanded as Kubernetes expands them and
NODE_RANK taken from the completion index. Only what cannot exist on one host is substituted, and
every substitution is listed in the report: the headless-service DNS name of rank 0 (127.0.0.1),
the pod's volumes (per group and per attempt temp folders, fresh on each attempt as a recreated
pod's emptyDirs are), the GPUs the device plugin would hand out (CUDA_VISIBLE_DEVICES), Secret
references (taken from the caller's environment) and a busy rendezvous port.

With a kill, the rehearsal watches the run's checkpoint store until step K's checkpoint is published
(its manifest exists), SIGKILLs one group's whole process tree, then does what JobSet's failure
policy does: tears every other group down (SIGTERM, SIGKILL after a grace period) and starts all
groups again with the same run id, so ``checkpoint.resume: auto`` continues from the last published
checkpoint. With a reference, the same spec first runs uninterrupted under another run id and the
per-step losses after the resume are compared with it.

Control plane: no torch import here (the GPU count is asked lazily through the local backend).
The pods' env and command: ``rehearse_pods``; the processes and attempts: ``rehearse_procs``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from gptoss_cloud.contract.errors import GptossError, SpecError
from gptoss_cloud.rehearse.pods import base_environ, plan_groups, render
from gptoss_cloud.rehearse.procs import Attempt, now_iso, attempt_output, drop_folder, published_steps, run_attempt
from gptoss_cloud.contract.runs import check_run_id, new_run_id, run_home
from gptoss_cloud.contract.spec import RunSpec
from gptoss_cloud.contract.store.objects import is_remote, open_store

_PROGRESS = re.compile(r"^step (\d+)/(\d+)\b", re.M)


# ------------------------------------------------------------------------------------------ options
@dataclass
class RehearseOptions:
    nodes: int = 2
    gpus_per_node: int = 1
    kill_node: int | None = None
    kill_at_step: int | None = None
    reference: bool = False
    run_id: str | None = None
    out_dir: Path = Path("rehearse")
    timeout_s: float = 1800.0
    grace_s: float = 10.0
    tolerance: float = 1e-4  # relative, per step
    keep_reference: bool = False  # keep the reference run's checkpoints (only its metrics are compared)
    # Where the reference run keeps its home (default: the spec's store). Only its metrics are read, so a
    # local folder spares a slow S3 server the reference's checkpoints (tens of GB for a 20b full fine-tune).
    reference_store: str | None = None

    @property
    def kill(self) -> bool:
        return self.kill_node is not None


def prepare_spec(spec: RunSpec, opts: RehearseOptions) -> RunSpec:
    """The spec with the flags' topology, checked for what a kill-and-resume rehearsal needs."""
    if opts.nodes < 1 or opts.gpus_per_node < 1:
        raise SpecError("--nodes and --gpus-per-node must be at least 1")
    if (opts.kill_node is None) != (opts.kill_at_step is None):
        raise SpecError("--kill-node and --kill-at-step go together: which group to kill, and after which checkpoint")
    if opts.kill:
        if opts.nodes < 2:
            raise SpecError(f"--kill-node needs at least 2 node groups (--nodes is {opts.nodes}): "
                            "killing the only group rehearses nothing a restart of one process would not")
        if not 0 <= opts.kill_node < opts.nodes:
            raise SpecError(f"--kill-node {opts.kill_node} is out of range: node groups are 0..{opts.nodes - 1}")
        every = spec.checkpoint.every_steps
        if every is None:
            raise SpecError("checkpoint.every_steps is not set in the spec: there would be no checkpoint to resume from",
                            hint="set checkpoint.every_steps (e.g. 2) in the spec")
        if spec.checkpoint.resume != "auto":
            raise SpecError(f"checkpoint.resume is {spec.checkpoint.resume!r}: restarted groups would not resume",
                            hint="set checkpoint.resume: auto")
        k = opts.kill_at_step
        if k < 1 or k % every:
            raise SpecError(f"--kill-at-step {k} is not a checkpoint step: checkpoint.every_steps is {every}",
                            hint=f"pick a multiple of {every}")
        max_steps = spec.optim.max_steps
        if max_steps is None:
            raise SpecError("--kill-at-step needs optim.max_steps in the spec, so the kill lands before the end")
        if k >= max_steps:
            raise SpecError(f"--kill-at-step {k} is not before the end: optim.max_steps is {max_steps}",
                            hint=f"pick a checkpoint step below {max_steps}")
    if opts.tolerance < 0:
        raise SpecError(f"--tolerance must be >= 0, not {opts.tolerance}")
    data = spec.model_dump(mode="json")
    data["parallelism"]["nodes"] = opts.nodes
    data["parallelism"]["gpus_per_node"] = opts.gpus_per_node
    data["output"]["store"] = host_store(data["output"]["store"])
    return RunSpec.model_validate(data)


def host_store(store: str) -> str:
    """One host stands in for a shared store: every group and this process must find the same folder."""
    return store if is_remote(store) else str(Path(store.removeprefix("file://")).expanduser().resolve())


def reference_spec(spec: RunSpec, opts: RehearseOptions) -> RunSpec:
    """The spec the uninterrupted reference runs: the same, in ``--reference-store`` when given."""
    if not opts.reference_store:
        return spec
    data = spec.model_dump(mode="json")
    data["output"]["store"] = host_store(opts.reference_store)
    return RunSpec.model_validate(data)


# ----------------------------------------------------------------------------------------- losses
def read_losses(home: str) -> dict[int, float]:
    """Per-step loss from ``<home>/metrics.jsonl``; a step logged twice (before a kill and after the
    resume) keeps its last value, the resumed attempt's."""
    st = open_store(home)
    try:
        text = st.read_bytes("metrics.jsonl").decode()
    except GptossError:
        return {}
    out: dict[int, float] = {}
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("loss") is not None and "eval_loss" not in rec and "event" not in rec:
                out[int(rec["step"])] = float(rec["loss"])
    return out


def first_step_logged(log_text: str) -> int | None:
    """The first step rank 0's progress line reports in one attempt's output."""
    m = _PROGRESS.search(log_text)
    return int(m.group(1)) if m else None


def compare_losses(reference: dict[int, float], resumed: dict[int, float], after: int, tolerance: float) -> dict:
    steps = sorted(s for s in resumed if s > after and s in reference)
    rows = []
    for s in steps:
        a, b = reference[s], resumed[s]
        rows.append({"step": s, "reference": a, "resumed": b, "abs_diff": abs(a - b),
                     "rel_diff": abs(a - b) / max(abs(a), 1e-12)})
    max_abs = max((r["abs_diff"] for r in rows), default=None)
    max_rel = max((r["rel_diff"] for r in rows), default=None)
    ok = bool(rows) and max_rel is not None and max_rel <= tolerance
    return {"steps": rows, "max_abs_diff": max_abs, "max_rel_diff": max_rel, "tolerance_rel": tolerance, "ok": ok,
            **({} if rows else {"problem": f"no step after {after} was logged by both runs"})}


# -------------------------------------------------------------------------------------------- run
def gpu_count() -> int:
    from gptoss_cloud.backends.local import local_gpu_count  # lazy: torch

    return local_gpu_count()


def rehearse(spec: RunSpec, opts: RehearseOptions, *, environ: Mapping[str, str] | None = None,
             echo: Callable[[str], None] = lambda s: None, gpus: int | None = None) -> dict:
    """Run the rehearsal; return the report (``report["pass"]`` says whether it passed)."""
    environ = dict(os.environ if environ is None else environ)
    spec = prepare_spec(spec, opts)
    run_id = check_run_id(opts.run_id) if opts.run_id else new_run_id(spec.name)
    ref_id = f"{run_id[:K_RUN_ID_ROOM].rstrip('-')}-ref" if opts.reference else None
    ref_spec = reference_spec(spec, opts)
    rendered = render(spec, run_id)  # refuses bad names / specs before anything starts
    ref_rendered = render(ref_spec, ref_id) if ref_id else None
    ref_home = run_home(ref_spec.output.store, ref_id) if ref_id else None
    for rid, rhome in ((run_id, run_home(spec.output.store, run_id)), (ref_id, ref_home)):
        if rid is None:
            continue
        used = open_store(rhome).list("")
        if used:  # its checkpoints would be resumed from, and its metrics mixed into the comparison
            raise SpecError(f"run id {rid} is already used: {rhome} holds {len(used)} file(s)",
                            hint="pick another --run-id (or leave it out for a new one)")
    gpus = gpu_count() if gpus is None else gpus
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_env = base_environ(environ)
    deadline = time.monotonic() + opts.timeout_s
    home = run_home(spec.output.store, run_id)
    report: dict[str, Any] = {
        "spec_name": spec.name, "run_id": run_id, "home": home, "nodes": opts.nodes, "gpus_per_node": opts.gpus_per_node,
        "device": f"{gpus} GPU(s)" if gpus else "cpu", "kill": ({"node": opts.kill_node, "after_step": opts.kill_at_step}
                                                               if opts.kill else None),
        "out_dir": str(out_dir), "attempts": [], "substitutions": [], "pass": False,
    }
    with tempfile.TemporaryDirectory(prefix="gptoss-rehearse-") as work:
        work = Path(work)
        if ref_rendered is not None:
            plans, subs = plan_groups(ref_rendered, work / ref_id / "attempt-1", gpus=gpus, environ=environ)
            echo(f"reference run {ref_id}: {opts.nodes} node groups, uninterrupted")
            a = run_attempt(plans, base_env, out_dir / "reference", Attempt(ref_id, 1, now_iso(), time.monotonic()),
                            home=ref_home, deadline=deadline, grace_s=opts.grace_s, echo=echo)
            drop_folder(work / ref_id)
            report["reference"] = {"run_id": ref_id, "home": ref_home, "attempt": a.to_json()}
            if a.state != "Succeeded":
                report["problem"] = f"the reference run failed: {a.note}; see {out_dir / 'reference'}"
                return report
            if not opts.keep_reference:  # only its metrics.jsonl is compared: free the store for the rehearsed run
                n = open_store(ref_home).delete("checkpoints")
                report["reference"]["checkpoints_removed"] = n
        attempt_no = 1
        plans, subs = plan_groups(rendered, work / run_id / "attempt-1", gpus=gpus, environ=environ)
        report["substitutions"] = [s.to_json() for s in subs]
        report["group_commands"] = [p.command for p in plans]
        echo(f"run {run_id}: {opts.nodes} node groups x {opts.gpus_per_node} process(es)")
        kill = (opts.kill_node, opts.kill_at_step) if opts.kill else None
        a = run_attempt(plans, base_env, out_dir, Attempt(run_id, attempt_no, now_iso(), time.monotonic()), home=home,
                        deadline=deadline, grace_s=opts.grace_s, kill=kill, echo=echo)
        report["attempts"].append(a.to_json())
        drop_folder(work / run_id / "attempt-1")
        if kill is not None and a.state == "Killed":
            published = published_steps(home)
            report["published_at_restart"] = published
            attempt_no += 1
            # JobSet recreates every pod: fresh volumes, the same run id; the port as rendered (unless busy).
            plans, subs2 = plan_groups(rendered, work / run_id / f"attempt-{attempt_no}", gpus=gpus, environ=environ)
            report["substitutions"] += [s.to_json() | {"attempt": attempt_no} for s in subs2 if s.what == "MASTER_PORT"]
            echo(f"restarting all {opts.nodes} node groups (attempt {attempt_no}); last published checkpoint: "
                 f"step {published[0] if published else None}")
            a = run_attempt(plans, base_env, out_dir, Attempt(run_id, attempt_no, now_iso(), time.monotonic()), home=home,
                            deadline=deadline, grace_s=opts.grace_s, echo=echo)
            report["attempts"].append(a.to_json())
            drop_folder(work / run_id / f"attempt-{attempt_no}")
            first = first_step_logged(attempt_output(out_dir / "node-0.log", f"{run_id} attempt {attempt_no} "))
            report["resumed_from"] = first - 1 if first is not None else None
            expected = published[0] if published else 0
            report["expected_resume"] = expected
            if a.state != "Succeeded":
                report["problem"] = f"the restarted run failed: {a.note}; see {out_dir}/node-*.log"
                return report
            if report["resumed_from"] != expected or expected == 0:
                report["problem"] = (f"the restarted run began at step {first} instead of {expected + 1} "
                                     f"(the last published checkpoint was step {expected})")
                return report
        elif a.state != "Succeeded" or kill is not None:
            report["problem"] = f"the run failed: {a.note}; see {out_dir}/node-*.log"
            return report
        if ref_id:
            after = report.get("resumed_from") or 0
            report["loss_comparison"] = compare_losses(read_losses(ref_home), read_losses(home),
                                                       after, opts.tolerance)
            if not report["loss_comparison"]["ok"]:
                report["problem"] = report["loss_comparison"].get("problem") or (
                    f"losses after the resume differ from the uninterrupted run by up to "
                    f"{report['loss_comparison']['max_rel_diff']:.3g} (relative; tolerance {opts.tolerance:g})")
                return report
    report["pass"] = True
    return report


# The reference run id is the run id's first characters + "-ref": still a valid JobSet name.
K_RUN_ID_ROOM = 40


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
