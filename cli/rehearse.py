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
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import BackendError, GptossError, SpecError
from .render import k8s as K
from .runs import check_run_id, new_run_id, run_home
from .spec import RunSpec
from .store import is_remote, open_store

LOCALHOST = "127.0.0.1"
# Caller variables a pod would never see: they would change the topology or the spec the trainer loads.
_TOPOLOGY_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                  "NODE_RANK", "NNODES", "NPROC", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "GPTOSS_CONFIG"}
_DROPPED_PREFIXES = ("TORCHELASTIC_", "GPTOSS_")
_PROGRESS = re.compile(r"^step (\d+)/(\d+)\b", re.M)
_EXPANSION = re.compile(r"\$(\$|\(([^)]*)\))")


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
    store = data["output"]["store"]
    if not is_remote(store):
        # One host stands in for a shared store: every group and this process must find the same folder.
        data["output"]["store"] = str(Path(store.removeprefix("file://")).expanduser().resolve())
    return RunSpec.model_validate(data)


# ---------------------------------------------------------------------------------- env and command
def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes variable expansion: ``$(VAR)`` becomes its value when VAR is defined (else stays as
    written), ``$$`` becomes ``$``; an unterminated ``$(`` is left alone."""
    def sub(m: re.Match) -> str:
        if m.group(1) == "$":
            return "$"
        name = m.group(2)
        return env[name] if name in env else m.group(0)

    return _EXPANSION.sub(sub, text)


@dataclass
class Substitution:
    what: str
    rendered: str | None
    here: str
    why: str

    def to_json(self) -> dict:
        return {"what": self.what, "rendered": self.rendered, "here": self.here, "why": self.why}


@dataclass
class GroupPlan:
    """One node group (one pod) ready to start."""
    index: int
    command: list[str]
    env: dict[str, str]  # what the container's env sets (after substitution); started on top of the base env
    root: Path


@dataclass
class Rendered:
    run_id: str
    configmap: dict
    pod: dict          # the pod spec of the replicated job's template
    container: dict    # the trainer container


def render(spec: RunSpec, run_id: str) -> Rendered:
    """The JobSet and ConfigMap `submit --backend k8s` would apply for this spec and run id."""
    cm, js = K.render_run(spec, run_id)
    pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "trainer")
    if pod.get("initContainers"):
        names = ", ".join(c["name"] for c in pod["initContainers"])
        raise BackendError(f"the pods of this spec run init containers ({names}) that fetch the weights per node; "
                           "rehearse does not run them",
                           hint="rehearse with model.init: random (a reduced-depth shape) or a model folder on this host")
    return Rendered(run_id, cm, pod, container)


def _mount_dirs(r: Rendered, root: Path) -> dict[str, Path]:
    """Each volume mount of the trainer container -> a folder of this group (device mounts stay the host's)."""
    out = {}
    for m in r.container.get("volumeMounts", []):
        path = m["mountPath"]
        if path.startswith("/dev/"):
            continue
        out[path] = root / path.strip("/").replace("/", "-")
    return out


def _map_path(value: str, mounts: Mapping[str, Path]) -> str | None:
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount:
            return str(local)
        if value.startswith(mount + "/"):
            return str(local / value[len(mount) + 1:])
        if "=" in value and value.split("=", 1)[1].startswith(mount):  # --flag=/path
            flag, rest = value.split("=", 1)
            mapped = _map_path(rest, mounts)
            if mapped is not None:
                return f"{flag}={mapped}"
    return None


def _write_volumes(r: Rendered, mounts: Mapping[str, Path]) -> None:
    """Create the group's folders; fill the ConfigMap volume with the ConfigMap's data, as the kubelet does."""
    volumes = {v["name"]: v for v in r.pod.get("volumes", [])}
    for m in r.container.get("volumeMounts", []):
        local = mounts.get(m["mountPath"])
        if local is None:
            continue
        local.mkdir(parents=True, exist_ok=True)
        cm = volumes.get(m["name"], {}).get("configMap")
        if cm:
            assert cm["name"] == r.configmap["metadata"]["name"], (cm, r.configmap["metadata"])
            data = r.configmap["data"]
            for item in cm.get("items") or [{"key": k, "path": k} for k in data]:
                (local / item["path"]).write_text(data[item["key"]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the TCPStore server binds it
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def base_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment as the image's: without topology, torchelastic or GPTOSS_* settings."""
    return {k: v for k, v in environ.items()
            if k not in _TOPOLOGY_VARS and not k.startswith(_DROPPED_PREFIXES)}


def plan_groups(r: Rendered, root: Path, *, gpus: int, environ: Mapping[str, str],
                port: int | None = None) -> tuple[list[GroupPlan], list[Substitution]]:
    """Every node group's command and env from the rendered pod template; the substitutions made.

    ``gpus``: GPUs on this host (0: CPU; no CUDA_VISIBLE_DEVICES). ``port``: the rendezvous port to use
    instead of the rendered one (None: the rendered one, or a free one when that is busy).
    """
    c = r.container
    nodes = int(_literal_env(c, "NNODES"))
    per_node = int(_literal_env(c, "NPROC"))
    if gpus and nodes * per_node > gpus:
        raise BackendError(f"{nodes} node groups x {per_node} GPUs need {nodes * per_node} GPUs; this host has {gpus}",
                           hint="lower --nodes or --gpus-per-node")
    subs: list[Substitution] = []
    seen: set[str] = set()

    def note(what: str, rendered: str | None, here: str, why: str) -> None:
        if what not in seen:
            seen.add(what)
            subs.append(Substitution(what, rendered, here, why))

    rendered_port = _literal_env(c, "MASTER_PORT")
    if port is None:
        port = int(rendered_port) if port_free(int(rendered_port)) else free_port()
    if str(port) != rendered_port:
        note("MASTER_PORT", rendered_port, str(port), f"port {rendered_port} is busy on this host")
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [str(i) for i in range(gpus)]
    exe_dir = Path(sys.executable).parent
    plans = []
    for i in range(nodes):
        groot = root / f"node-{i}"
        mounts = _mount_dirs(r, groot)
        _write_volumes(r, mounts)
        env: dict[str, str] = {}
        for e in c.get("env", []):
            name = e["name"]
            if "value" in e:
                value = e["value"]
                if name == "MASTER_ADDR" and value == K.master_addr(r.run_id):
                    note("MASTER_ADDR", value, LOCALHOST, "the JobSet headless-service name of rank 0's pod resolves only in the cluster")
                    value = LOCALHOST
                elif name == "MASTER_PORT":
                    value = str(port)
                else:
                    mapped = _map_path(value, mounts)
                    if mapped is not None:
                        note(name, value, _pattern(mapped), "a pod volume: a folder per group (fresh each attempt)")
                        value = mapped
                env[name] = expand(value, env)
                continue
            src = e.get("valueFrom", {})
            ref = src.get("fieldRef", {}).get("fieldPath", "")
            if K.COMPLETION_INDEX_ANNOTATION in ref:
                env[name] = str(i)  # the Indexed Job's completion index
            elif "secretKeyRef" in src:
                sk = src["secretKeyRef"]
                got = environ.get(name)
                note(name, f"Secret {sk['name']} key {sk['key']}", "caller's environment" + ("" if got else " (unset)"),
                     "Secrets live in the cluster")
                if got:
                    env[name] = got
            else:
                raise BackendError(f"env {name} of the trainer container comes from {src}; rehearse cannot provide it")
        for ef in c.get("envFrom", []):
            sec = ef.get("secretRef", {}).get("name")
            if sec:
                names = sorted(k for k in environ if k.startswith("AWS_"))
                note(f"envFrom Secret {sec}", f"Secret {sec}", ", ".join(names) or "(no AWS_* set here)",
                     "Secrets live in the cluster; the store credentials come from the caller's environment")
        tmp = mounts.get("/tmp")
        if tmp is not None:
            env["TMPDIR"] = str(tmp)
            note("TMPDIR", None, _pattern(str(tmp)), "/tmp is each pod's own emptyDir; the host's /tmp is shared")
        if gpus:
            ids = visible[i * per_node:(i + 1) * per_node]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            note(f"CUDA_VISIBLE_DEVICES (node {i})", f"nvidia.com/gpu: {per_node}", env["CUDA_VISIBLE_DEVICES"],
                 "the device plugin's GPUs for this pod")
        elif "OMP_NUM_THREADS" not in environ:
            threads = max(1, (os.cpu_count() or 1) // (nodes * per_node))
            env["OMP_NUM_THREADS"] = str(threads)
            note("OMP_NUM_THREADS", None, str(threads), "CPU groups share this host's cores; pods would each have their own")
        env.setdefault("PYTHONUNBUFFERED", "1")

        command = [expand(a, env) for a in c["command"] + c.get("args", [])]
        for j, arg in enumerate(command):
            mapped = _map_path(arg, mounts)
            if mapped is not None:
                note(f"argument {arg}", arg, _pattern(mapped), "the spec ConfigMap, mounted in this group's folder")
                command[j] = mapped
            elif arg in ("torchrun", "gptoss-cloud") and (exe_dir / arg).is_file():
                note(f"executable {arg}", arg, str(exe_dir / arg), "the image's console script: this environment's")
                command[j] = str(exe_dir / arg)
        plans.append(GroupPlan(i, command, env, groot))
    return plans, subs


def _literal_env(container: dict, name: str) -> str:
    for e in container.get("env", []):
        if e["name"] == name and "value" in e:
            return e["value"]
    raise BackendError(f"the rendered trainer container sets no {name}")


def _pattern(path: str) -> str:
    """A per-group path as a pattern, e.g. <work>/attempt-1/node-{i}/tmp."""
    return re.sub(r"/node-\d+(?=/|$)", "/node-{i}", path)


# ------------------------------------------------------------------------------------- processes
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of ``pid`` and all its descendants. torchrun starts each worker in its own
    session, so a process-group kill would miss them; the tree is what a pod's container holds."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        start = _proc_start(p)
        if start is not None:
            out.append((p, start))
            todo += children.get(p, [])
    return out


def kill_tree(tree: list[tuple[int, str]], sig: int) -> None:
    for pid, start in tree:
        if _proc_start(pid) == start:  # still the process we started, not a reused pid
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _tree_alive(tree: list[tuple[int, str]]) -> bool:
    for pid, start in tree:
        st = _proc_start(pid)
        if st == start:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
            except OSError:
                pass
    return False


@dataclass
class Group:
    plan: GroupPlan
    proc: subprocess.Popen
    log: Any
    tree: list[tuple[int, str]] = field(default_factory=list)

    def snapshot(self) -> list[tuple[int, str]]:
        now = process_tree(self.proc.pid)
        known = {p for p, _ in self.tree}
        self.tree += [t for t in now if t[0] not in known]
        return self.tree


def start_group(plan: GroupPlan, base_env: Mapping[str, str], log_path: Path, header: str) -> Group:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    log.write(f"===== {header} =====\n$ {' '.join(plan.command)}\n".encode())
    log.flush()
    env = {**base_env, **plan.env}
    proc = subprocess.Popen(plan.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return Group(plan, proc, log)


def teardown(groups: list[Group], grace_s: float) -> None:
    """What deleting the pods does: SIGTERM to each container's first process, SIGKILL to all after the grace."""
    live = [g for g in groups if g.proc.poll() is None or _tree_alive(g.snapshot())]
    for g in live:
        g.snapshot()
        try:
            os.kill(g.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_tree_alive(g.tree) for g in live):
        time.sleep(0.1)
    for g in live:
        kill_tree(g.tree, signal.SIGKILL)
    for g in groups:
        try:
            g.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        g.log.close()


# --------------------------------------------------------------------------------------- attempts
@dataclass
class Attempt:
    run_id: str
    number: int
    started: str
    t0: float
    ended: str | None = None
    seconds: float | None = None
    state: str = "Running"   # Succeeded | Failed | Killed | TimedOut
    returncodes: list[int | None] = field(default_factory=list)
    killed_node: int | None = None
    kill_time: str | None = None
    kill_after_s: float | None = None
    published_at_kill: list[int] | None = None
    teardown_s: float | None = None
    master_port: str | None = None
    note: str | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "t0"}
        return {k: v for k, v in d.items() if v is not None}


def published_steps(home: str) -> list[int]:
    from gptoss_cloud.trainer.ckpt_manifest import list_published  # torch-free

    return list_published(open_store(home).child("checkpoints"))


def run_attempt(plans: list[GroupPlan], base_env: Mapping[str, str], log_dir: Path, attempt: Attempt, *,
                home: str, deadline: float, grace_s: float,
                kill: tuple[int, int] | None = None, echo: Callable[[str], None] = lambda s: None) -> Attempt:
    """Start every group; return when all succeed, one fails (the rest are torn down), the kill fires
    or the deadline passes."""
    attempt.master_port = plans[0].env.get("MASTER_PORT")
    groups = [start_group(p, base_env, log_dir / f"node-{p.index}.log", f"{attempt.run_id} attempt {attempt.number} "
                          f"node {p.index} {_now()}") for p in plans]
    try:
        last_poll = last_snap = 0.0
        while True:
            codes = [g.proc.poll() for g in groups]
            if time.monotonic() - last_snap > 1.0:  # know the workers before a dead torchrun orphans them
                last_snap = time.monotonic()
                for g in groups:
                    g.snapshot()
            if kill is not None and time.monotonic() - last_poll > 0.25:
                last_poll = time.monotonic()
                node, step = kill
                steps = published_steps(home)
                if steps and steps[0] >= step:
                    victim = groups[node]
                    kill_tree(victim.snapshot(), signal.SIGKILL)
                    attempt.kill_time, attempt.killed_node = _now(), node
                    attempt.kill_after_s = round(time.monotonic() - attempt.t0, 2)
                    attempt.published_at_kill = steps
                    echo(f"step {step}'s checkpoint is published (published: {steps}); SIGKILL node group {node}")
                    t = time.monotonic()
                    teardown(groups, grace_s)
                    attempt.teardown_s = round(time.monotonic() - t, 2)
                    attempt.state = "Killed"
                    break
            if all(c == 0 for c in codes):
                attempt.state = "Succeeded"
                if kill is not None:
                    attempt.state, attempt.note = "Failed", f"the run ended before step {kill[1]}'s checkpoint was seen"
                break
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                attempt.state = "Failed"
                attempt.note = f"node group {failed[0]} exited with code {codes[failed[0]]}" + _first_error(
                    log_dir / f"node-{failed[0]}.log", f"{attempt.run_id} attempt {attempt.number} ")
                teardown(groups, grace_s)
                break
            if time.monotonic() > deadline:
                attempt.state, attempt.note = "TimedOut", "the rehearsal's --timeout passed"
                teardown(groups, grace_s)
                break
            time.sleep(0.1)
    finally:
        if any(g.proc.poll() is None for g in groups):
            teardown(groups, grace_s)
        for g in groups:
            g.log.close()
    attempt.returncodes = [g.proc.returncode for g in groups]
    attempt.ended = _now()
    attempt.seconds = round(time.monotonic() - attempt.t0, 2)
    return attempt


def attempt_output(log_path: Path, marker: str) -> str:
    """One attempt's part of a group log (the logs of all attempts go to the same file)."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    parts = text.split(f"===== {marker}")
    return parts[-1] if len(parts) > 1 else ""


def _first_error(log_path: Path, marker: str) -> str:
    for line in attempt_output(log_path, marker).splitlines():
        if line.startswith("error:"):
            return f" ({line.strip()})"
    return ""


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
            if rec.get("loss") is not None and "eval_loss" not in rec:
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
    from .backends.local import local_gpu_count  # lazy: torch

    return local_gpu_count()


def rehearse(spec: RunSpec, opts: RehearseOptions, *, environ: Mapping[str, str] | None = None,
             echo: Callable[[str], None] = lambda s: None, gpus: int | None = None) -> dict:
    """Run the rehearsal; return the report (``report["pass"]`` says whether it passed)."""
    environ = dict(os.environ if environ is None else environ)
    spec = prepare_spec(spec, opts)
    run_id = check_run_id(opts.run_id) if opts.run_id else new_run_id(spec.name)
    ref_id = f"{run_id[:K_RUN_ID_ROOM].rstrip('-')}-ref" if opts.reference else None
    rendered = render(spec, run_id)  # refuses bad names / specs before anything starts
    ref_rendered = render(spec, ref_id) if ref_id else None
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
            a = run_attempt(plans, base_env, out_dir / "reference", Attempt(ref_id, 1, _now(), time.monotonic()),
                            home=run_home(spec.output.store, ref_id), deadline=deadline, grace_s=opts.grace_s, echo=echo)
            report["reference"] = {"run_id": ref_id, "home": run_home(spec.output.store, ref_id), "attempt": a.to_json()}
            if a.state != "Succeeded":
                report["problem"] = f"the reference run failed: {a.note}; see {out_dir / 'reference'}"
                return report
        attempt_no = 1
        plans, subs = plan_groups(rendered, work / run_id / "attempt-1", gpus=gpus, environ=environ)
        report["substitutions"] = [s.to_json() for s in subs]
        report["group_commands"] = [p.command for p in plans]
        echo(f"run {run_id}: {opts.nodes} node groups x {opts.gpus_per_node} process(es)")
        kill = (opts.kill_node, opts.kill_at_step) if opts.kill else None
        a = run_attempt(plans, base_env, out_dir, Attempt(run_id, attempt_no, _now(), time.monotonic()), home=home,
                        deadline=deadline, grace_s=opts.grace_s, kill=kill, echo=echo)
        report["attempts"].append(a.to_json())
        if kill is not None and a.state == "Killed":
            published = published_steps(home)
            report["published_at_restart"] = published
            attempt_no += 1
            # JobSet recreates every pod: fresh volumes, the same run id; the port as rendered (unless busy).
            plans, subs2 = plan_groups(rendered, work / run_id / f"attempt-{attempt_no}", gpus=gpus, environ=environ)
            report["substitutions"] += [s.to_json() | {"attempt": attempt_no} for s in subs2 if s.what == "MASTER_PORT"]
            echo(f"restarting all {opts.nodes} node groups (attempt {attempt_no}); last published checkpoint: "
                 f"step {published[0] if published else None}")
            a = run_attempt(plans, base_env, out_dir, Attempt(run_id, attempt_no, _now(), time.monotonic()), home=home,
                            deadline=deadline, grace_s=opts.grace_s, echo=echo)
            report["attempts"].append(a.to_json())
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
            report["loss_comparison"] = compare_losses(read_losses(run_home(spec.output.store, ref_id)), read_losses(home),
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
