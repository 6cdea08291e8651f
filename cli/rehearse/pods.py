"""A rendered JobSet pod as a local node group: its trainer container's command and env, expanded as
Kubernetes expands them, with only what cannot exist on one host substituted (and each substitution
recorded): rank 0's headless-service name, the pod's volumes, the GPUs, Secret references, a busy port."""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from gptoss_cloud.contract.errors import BackendError
from gptoss_cloud.render.k8s import jobset as K
from gptoss_cloud.contract.spec import RunSpec

LOCALHOST = "127.0.0.1"
# Caller variables a pod would never see: they would change the topology or the spec the trainer loads.
_TOPOLOGY_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                  "NODE_RANK", "NNODES", "NPROC", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "GPTOSS_CONFIG"}
_DROPPED_PREFIXES = ("TORCHELASTIC_", "GPTOSS_")
_EXPANSION = re.compile(r"\$(\$|\(([^)]*)\))")


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
